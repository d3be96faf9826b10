"""Zarr stores in an object store: zarr's own ``FsspecStore`` over the project's s3fs client.

``FsspecStore`` awaits the file system's coroutines on zarr's event loop, so it needs an
``asynchronous=True`` instance; the shared client (:func:`cluster.storage.client.filesystem`)
is a sync one whose aiohttp session belongs to fsspec's loop and fails when awaited from
zarr's. So each shared client gets an async twin built from its own options (endpoint,
timeouts, s3fs's retry loop off: readers retry whole reads with
:mod:`cluster.storage.retry`). Twins are kept per process and per client, as clients are:
a forked child builds its own (zarr resets its loop in a fork; sessions do not carry over).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
from typing import Any

from zarr.core.sync import sync as zarr_sync
from zarr.storage import FsspecStore

from cluster.storage.client import filesystem, strip_scheme
from cluster.storage.urls import normalize

# (pid, id(client)) -> (client, twin): the client is held so that its id is never reused
_TWINS: dict[tuple[int, int], tuple[Any, Any]] = {}


def fsspec_store(url: str) -> FsspecStore:
    """A read-only zarr store at ``url`` (``s3://bucket/prefix/name.zarr``)."""
    url = normalize(url)
    return FsspecStore(_async_twin(filesystem(url)), read_only=True, path=strip_scheme(url))


def _async_twin(client: Any) -> Any:
    key = (os.getpid(), id(client))
    if key not in _TWINS:
        options = {**copy.deepcopy(client.storage_options), "asynchronous": True}
        twin = type(client)(**options, skip_instance_cache=True)
        twin.retries = client.retries  # a class attribute, not an argument (see client.py)
        _TWINS[key] = (client, twin)
    return _TWINS[key][1]


@atexit.register
def _close_sessions() -> None:
    """Close this process's sessions on zarr's loop before zarr stops it (atexit runs
    last-registered first, and zarr registered its shutdown on import, above), so that
    exiting prints no "Unclosed client session" warning."""
    for (pid, _), (_, twin) in list(_TWINS.items()):
        session = getattr(twin, "_s3", None)  # None until the twin's first request
        if pid == os.getpid() and session is not None:
            with contextlib.suppress(Exception):
                zarr_sync(session.close(), timeout=5)
