"""A real S3-compatible server on loopback for the tests, and a proxy that breaks it.

:class:`S3Server` runs moto's standalone server (a real HTTP S3 API, not a mock of
client calls) on 127.0.0.1 with dummy credentials. :func:`s3_environment` is what every
process that talks to it needs: the endpoint, the credentials, and no instance-metadata
probing (AWS clients otherwise try 169.254.169.254, which these tests must never reach).

:class:`FaultProxy` is a TCP proxy on 127.0.0.1 in front of the server that, on a
schedule, resets a connection in the middle of a response, stalls one (sends nothing for
a while), or adds latency to every request; and it can go away for good.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cluster.environ import environment

__all__ = ["FaultProxy", "FaultSchedule", "S3Server", "environment", "s3_environment",
           "upload_tree"]

LOOPBACK = "127.0.0.1"


def s3_environment(endpoint: str) -> dict[str, str]:
    """Environment for a process that uses the test server at ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        # no user profile or config file is read: only the values above
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


class S3Server:
    """moto's S3 server on an ephemeral loopback port."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        assert host == LOOPBACK, host
        self.port = int(port)
        self.endpoint = f"http://{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        self._server.stop()

    def new_bucket(self) -> str:
        """A fresh bucket's URL (``s3://NAME``); tests never share one."""
        import boto3

        name = f"t-{uuid.uuid4().hex[:16]}"
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=name)
        return f"s3://{name}"


def upload_tree(local: Path, url: str) -> str:
    """Copy every file below ``local`` to ``url`` (the test's way to publish a dataset)."""
    from cluster.storage.objects import upload
    from cluster.storage.urls import join

    for path in sorted(local.rglob("*")):
        if path.is_file():
            upload(path, join(url, path.relative_to(local).as_posix()))
    return url


@dataclass
class FaultSchedule:
    """Which connections (numbered from 1 in accept order) the proxy breaks, and how."""

    reset_after_bytes: dict[int, int] = field(default_factory=dict)  # conn -> reset point
    stall_seconds: dict[int, float] = field(default_factory=dict)  # conn -> pause first
    latency: float = 0.0  # seconds added before every request is forwarded


class FaultProxy:
    """A loopback TCP proxy to ``target_port`` that breaks connections on a schedule.

    A reset closes both sides with RST after the given number of response bytes (the
    client sees "connection reset" mid-transfer); a stall holds the response back. Counts
    of connections and of broken ones are kept for the test to check that faults fired.
    """

    def __init__(self, target_port: int, schedule: FaultSchedule | None = None) -> None:
        self.target_port = target_port
        self.schedule = schedule or FaultSchedule()
        self.connections = 0
        self.resets = 0
        self.stalls = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self._open: set[socket.socket] = set()
        self._gone = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """The server is gone for good: every open connection is reset, and so is every
        new one at once. The port stays taken (a freed port could be handed to another
        test's server, which would then answer for the dead one)."""
        self._gone = True
        with self._lock:
            for sock in list(self._open):
                _reset(sock)
            self._open.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._gone:
                _reset(client)
                continue
            with self._lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._serve, args=(client, number), daemon=True).start()

    def _serve(self, client: socket.socket, number: int) -> None:
        try:
            upstream = socket.create_connection((LOOPBACK, self.target_port))
        except OSError:
            _reset(client)
            return
        with self._lock:
            self._open.update((client, upstream))
        reset_at = self.schedule.reset_after_bytes.get(number)
        stall = self.schedule.stall_seconds.get(number, 0.0)
        threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
        sent = 0
        try:
            if stall:
                with self._lock:
                    self.stalls += 1
                time.sleep(stall)
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if reset_at is not None and sent + len(data) > reset_at:
                    client.sendall(data[:max(0, reset_at - sent)])
                    with self._lock:
                        self.resets += 1
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                if reset_at is not None:
                    _reset(sock)
                else:
                    with contextlib.suppress(OSError):
                        sock.close()
            with self._lock:
                self._open.difference_update((client, upstream))

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client -> server; each chunk that starts a request waits out the latency."""
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                if data[:4] in (b"GET ", b"PUT ", b"HEAD", b"POST", b"DELE"):
                    with self._lock:
                        self.requests += 1
                    if self.schedule.latency:
                        time.sleep(self.schedule.latency)
                upstream.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer or middlebox does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
