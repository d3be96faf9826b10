"""A lease: one holder at a time for a piece of work (a sweep's driver), on a file system
or an object store, that lapses when its holder stops renewing it.

The lease is one small JSON object: holder, token, a renewal counter and the time to
live. Every change is a compare-and-swap: on an object store a conditional PUT
(``If-None-Match: *`` to create, ``If-Match: ETAG`` to renew or take over), on a file
system a rewrite under an exclusive ``flock`` after checking the content is unchanged.
Nobody compares clocks across machines: a waiter takes over a lease only after seeing it
unchanged for a whole time to live on its own monotonic clock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fsspec.asyn import sync

from cluster.atomic import atomic_write_text
from cluster.storage.client import filesystem, strip_scheme
from cluster.storage.retry import http_status, retrying
from cluster.storage.urls import is_url, local_path, normalize


class LeaseHeld(RuntimeError):
    """Someone else holds the lease and keeps renewing it."""


class _Conflict(Exception):
    """A compare-and-swap found the lease changed under it."""


@dataclass(frozen=True)
class LeaseRecord:
    holder: str  # who, in words: host, process, what it runs
    token: str  # this holding's identity
    beat: int  # renewals so far
    ttl: float  # seconds the lease lasts without a renewal

    def text(self) -> str:
        return json.dumps(asdict(self))


def default_holder() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


class Lease:
    """The lease at ``location`` (a path or a URL), taken by :meth:`acquire`."""

    def __init__(self, location: str, ttl: float, holder: str | None = None) -> None:
        if ttl <= 0:
            raise ValueError(f"a lease's time to live must be > 0, got {ttl}")
        self.location = normalize(location)
        self.mine = LeaseRecord(holder or default_holder(), uuid.uuid4().hex, 0, ttl)
        self._store = _ObjectLease(self.location) if is_url(location) else \
            _FileLease(local_path(location))
        self._version: str | None = None
        self._stop = threading.Event()

    def acquire(self, wait: float, on_wait: Callable[[LeaseRecord], None] | None = None
                ) -> None:
        """Take the lease: at once if free, after it lapses if its holder is gone (seen
        unchanged for its time to live), else ``LeaseHeld`` naming the holder once
        ``wait`` seconds have passed."""
        deadline = time.monotonic() + wait
        seen: tuple[str, LeaseRecord] | None = None
        seen_since = time.monotonic()
        told = False
        while True:
            current = self._store.read()
            try:
                if current is None:
                    self._version = self._store.create(self.mine)
                    return
                if seen is None or current[0] != seen[0]:
                    seen, seen_since = current, time.monotonic()
                elif time.monotonic() - seen_since > current[1].ttl:
                    self._version = self._store.replace(self.mine, current[0])
                    return
            except _Conflict:
                continue  # someone else moved first: look again
            if time.monotonic() > deadline:
                raise LeaseHeld(f"{self.location}: held by {current[1].holder}, who renewed it "
                                f"within the last {current[1].ttl:g} s")
            if on_wait is not None and not told:
                on_wait(current[1])
                told = True
            time.sleep(min(1.0, current[1].ttl / 10))

    def renew(self) -> None:
        """Renew the lease; ``LeaseHeld`` when someone else has taken it meanwhile."""
        if self._version is None:
            raise RuntimeError("renew before acquire")
        renewed = replace(self.mine, beat=self.mine.beat + 1)
        try:
            self._version = self._store.replace(renewed, self._version)
        except _Conflict:
            current = self._store.read()
            holder = current[1].holder if current else "nobody (deleted)"
            raise LeaseHeld(f"{self.location}: lost to {holder}") from None
        self.mine = renewed

    def keep(self, on_lost: Callable[[str], None]) -> None:
        """Renew every quarter of the time to live in a daemon thread; ``on_lost`` gets
        the reason if renewing fails (the lease was taken over, or the store is gone)."""
        def loop() -> None:
            while not self._stop.wait(self.mine.ttl / 4):
                try:
                    self.renew()
                except Exception as exc:
                    on_lost(str(exc))
                    return

        threading.Thread(target=loop, daemon=True, name="lease-renewal").start()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._version is not None:
            with contextlib.suppress(_Conflict):
                self._store.delete(self._version)
            self._version = None


class _ObjectLease:
    """Compare-and-swap on one object through S3's conditional PUT and DELETE."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.bucket, _, self.key = strip_scheme(url).partition("/")

    def _call(self, method: str, what: str, **kwargs: object) -> dict:
        """One S3 call, retried on transient failures; a failed precondition (or a
        concurrent conditional write) is a ``_Conflict``, never retried."""
        fs = filesystem(self.url)

        def call() -> dict | None:
            try:
                return fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
            except Exception as exc:
                if http_status(exc) in (409, 412) or isinstance(exc, FileExistsError):
                    return None
                raise

        response = retrying(call, self.url, what)
        if response is None:
            raise _Conflict()
        return response

    def read(self) -> tuple[str, LeaseRecord] | None:
        try:
            response = self._call("get_object", "lease read")
        except FileNotFoundError:
            return None
        # the body is an aiobotocore stream: read it on the loop s3fs runs its calls on
        data = sync(filesystem(self.url).loop, response["Body"].read)
        return response["ETag"], LeaseRecord(**json.loads(data))

    def create(self, record: LeaseRecord) -> str:
        return self._call("put_object", "lease create", Body=record.text().encode(),
                          IfNoneMatch="*")["ETag"]

    def replace(self, record: LeaseRecord, version: str) -> str:
        return self._call("put_object", "lease renewal", Body=record.text().encode(),
                          IfMatch=version)["ETag"]

    def delete(self, version: str) -> None:
        current = self.read()
        if current is None or current[0] != version:
            raise _Conflict()
        with contextlib.suppress(FileNotFoundError):
            self._call("delete_object", "lease release")


class _FileLease:
    """Compare-and-swap on one file under an exclusive lock of a sidecar lock file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read(self) -> tuple[str, LeaseRecord] | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        record = LeaseRecord(**json.loads(text))
        return f"{record.token}:{record.beat}", record

    def read(self) -> tuple[str, LeaseRecord] | None:
        with self._locked():
            return self._read()

    def create(self, record: LeaseRecord) -> str:
        with self._locked():
            if self._read() is not None:
                raise _Conflict()
            atomic_write_text(self.path, record.text())
        return f"{record.token}:{record.beat}"

    def replace(self, record: LeaseRecord, version: str) -> str:
        with self._locked():
            current = self._read()
            if current is None or current[0] != version:
                raise _Conflict()
            atomic_write_text(self.path, record.text())
        return f"{record.token}:{record.beat}"

    def delete(self, version: str) -> None:
        with self._locked():
            current = self._read()
            if current is None or current[0] != version:
                raise _Conflict()
            self.path.unlink()
