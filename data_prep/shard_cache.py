"""A node-local copy of shards read from an object store, bounded in size.

With ``data.cache_dir`` set, the first time a process reads from a remote shard it
queues the whole shard for download in the background; reads go on as ranged GETs until
the copy is complete, and from then on (later epochs, other workers and ranks of the
node) come from local disk. Copies are named by the shard's SHA-256 from the manifest,
checked before they are renamed into place, so a copy is either whole and right or
absent, and a re-prepared dataset never meets a stale one. When the folder outgrows its
bound the least recently used copies are deleted (a process that has one open keeps
reading it; one that finds it gone reads remotely again).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

from cluster.atomic import TMP_MARKER, atomic_path
from cluster.storage.client import filesystem, strip_scheme
from cluster.storage.retry import retrying

_SUFFIX = ".tar"


@dataclass(frozen=True)
class ShardEntry:
    """A remote shard and what the manifest says of its bytes."""

    url: str
    size: int
    sha256: str


class ShardCache:
    """Whole-shard copies in ``folder``, at most ``max_bytes`` together."""

    def __init__(self, folder: str | os.PathLike[str], max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._queued: set[str] = set()
        self._queue: queue.Queue[ShardEntry] | None = None
        self._owner = 0  # pid whose thread serves the queue (a forked worker starts its own)
        self.failures: list[str] = []

    def path_of(self, entry: ShardEntry) -> Path:
        return self.folder / f"{entry.sha256}{_SUFFIX}"

    def lookup(self, entry: ShardEntry) -> Path | None:
        """The local copy of ``entry`` if complete (marked as used); otherwise None, and
        the shard is queued for download."""
        path = self.path_of(entry)
        try:
            os.utime(path)  # least recently used goes first
            return path
        except FileNotFoundError:
            pass
        if entry.size <= self.max_bytes and entry.sha256 not in self._queued:
            self._queued.add(entry.sha256)
            self._start().put(entry)
        return None

    def _start(self) -> queue.Queue[ShardEntry]:
        if self._queue is None or self._owner != os.getpid():
            self._queue, self._owner = queue.Queue(), os.getpid()
            threading.Thread(target=self._serve, args=(self._queue,), daemon=True,
                             name="shard-cache").start()
        return self._queue

    def _serve(self, work: queue.Queue[ShardEntry]) -> None:
        while True:
            entry = work.get()
            try:
                self.fill(entry)
            except Exception as exc:  # the reads go on remotely; a cache is never required
                self.failures.append(f"{entry.url}: {exc}")

    def fill(self, entry: ShardEntry) -> Path | None:
        """Download ``entry`` now unless another process is at it; returns the copy."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path_of(entry)
        with open(self.folder / f"{entry.sha256}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # another process of this node is downloading it
            if not path.exists():
                retrying(lambda: self._download(entry, path), entry.url, "cache download")
                self.evict(keep=path)
        return path

    def _download(self, entry: ShardEntry, path: Path) -> None:
        fs = filesystem(entry.url)
        with atomic_path(path) as tmp:
            fs.get_file(strip_scheme(entry.url), str(tmp))
            digest = hashlib.sha256()
            with open(tmp, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            if tmp.stat().st_size != entry.size or digest.hexdigest() != entry.sha256:
                raise ValueError(f"{entry.url}: downloaded copy differs from the manifest's "
                                 f"size/sha256 (changed since it was prepared?)")

    def evict(self, keep: Path | None = None) -> None:
        """Delete least recently used copies until the folder fits its bound."""
        copies = [p for p in self.folder.glob(f"*{_SUFFIX}") if TMP_MARKER not in p.name]
        stats = {p: p.stat() for p in copies}
        total = sum(s.st_size for s in stats.values())
        for path in sorted(copies, key=lambda p: stats[p].st_mtime):
            if total <= self.max_bytes:
                break
            if path != keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                total -= stats[path].st_size
