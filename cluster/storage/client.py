"""The fsspec filesystem behind object-store URLs, one per process.

s3fs reads endpoint, region and credentials from the standard AWS places. Its own retry
loops are turned off (one attempt per call): :mod:`cluster.storage.retry` retries every
call itself, so one policy and one error message hold for all of them. Instances are kept
per process id: a DataLoader worker forked from a process that used one builds its own
(an s3fs client's connections and event loop belong to the process that opened them).
"""

from __future__ import annotations

import os
from typing import Any

from cluster.storage.retry import RetryPolicy
from cluster.storage.urls import scheme_of

_FILESYSTEMS: dict[tuple[Any, ...], Any] = {}
# what a client is built from: a change (a test's proxy endpoint) gets a new client
_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_REGION")


def filesystem(url: str) -> Any:
    """The fsspec filesystem for ``url``'s scheme (``s3``), made on first use here."""
    scheme = scheme_of(url)
    policy = RetryPolicy.from_env()
    key = (os.getpid(), scheme, policy, *(os.environ.get(name) for name in _SETTINGS))
    if key not in _FILESYSTEMS:
        _FILESYSTEMS[key] = _build(scheme, policy)
    return _FILESYSTEMS[key]


def _build(scheme: str, policy: RetryPolicy) -> Any:
    if scheme != "s3":
        raise ValueError(f"no object-store client for {scheme}://")
    import s3fs

    config = {"connect_timeout": policy.timeout, "read_timeout": policy.timeout,
              "retries": {"max_attempts": 1, "mode": "standard"}}
    # skip_instance_cache: fsspec's own cache would hand a forked child its parent's client;
    # no listings cache: other processes write the same prefixes (ranks, trials, drivers)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False,
                           config_kwargs=config)
    fs.retries = 1  # s3fs's own retry loop: one attempt (a class attribute, not an argument)
    return fs


def strip_scheme(url: str) -> str:
    """``s3://bucket/key`` -> ``bucket/key``, the path form fsspec calls take."""
    return url.split("://", 1)[1] if "://" in url else url
