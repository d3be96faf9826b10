"""Retrying object-store calls: transient failures back off and try again, others do not.

Transient: connection resets and refusals, timeouts, HTTP 5xx, throttling (429, SlowDown).
Permanent: a missing object or bucket, denied access, a malformed request; these raise at
once, naming the URL. Each call is retried whole, so a ranged read either returns every
byte it asked for or raises: a retry never skips, repeats or reorders data.

The policy comes from the environment so that one setting reaches every process of a
run (torchrun ranks, loader workers, Ray trials): ``MEDSSL_STORAGE_ATTEMPTS`` (default
8), ``MEDSSL_STORAGE_TIMEOUT`` seconds per request (default 60; connect and read),
``MEDSSL_STORAGE_BACKOFF`` first pause in seconds (default 0.25; doubling, at most 20).
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from cluster.storage.errors import StorageError

T = TypeVar("T")

ATTEMPTS_ENV = "MEDSSL_STORAGE_ATTEMPTS"
TIMEOUT_ENV = "MEDSSL_STORAGE_TIMEOUT"
BACKOFF_ENV = "MEDSSL_STORAGE_BACKOFF"
_MAX_PAUSE = 20.0
# errno values s3fs gives error codes that no retry can mend (bad request, too large, ...)
_PERMANENT_ERRNOS = {errno.EINVAL, errno.ENOSYS, errno.EMSGSIZE, errno.ENAMETOOLONG,
                     errno.EPERM, errno.EEXIST, errno.ENOTEMPTY}
_PERMANENT_TYPES = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError,
                    NotADirectoryError)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    timeout: float = 60.0
    backoff: float = 0.25

    @classmethod
    def from_env(cls) -> RetryPolicy:
        def number(name: str, default: float) -> float:
            text = os.environ.get(name, "").strip()
            try:
                return float(text) if text else default
            except ValueError:
                raise ValueError(f"{name}={text!r} is not a number") from None

        policy = cls(attempts=int(number(ATTEMPTS_ENV, cls.attempts)),
                     timeout=number(TIMEOUT_ENV, cls.timeout),
                     backoff=number(BACKOFF_ENV, cls.backoff))
        if policy.attempts < 1 or policy.timeout <= 0 or policy.backoff < 0:
            raise ValueError(f"storage retry settings out of range: {policy}")
        return policy

    def pause(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based): exponential, jittered."""
        return min(_MAX_PAUSE, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status behind an s3fs / botocore error, when the server sent one."""
    for candidate in (exc, exc.__cause__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether trying the same request again may succeed."""
    status = http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(exc, (*_PERMANENT_TYPES, ValueError, TypeError)):
        return False
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return False
    # OSError (resets, refusals, EIO, EBUSY), TimeoutError, aiohttp and botocore network
    # errors: all about the connection, not the request
    return isinstance(exc, Exception)


def retrying(call: Callable[[], T], url: str, what: str,
             policy: RetryPolicy | None = None) -> T:
    """``call()``, retried on transient failures; ``StorageError`` naming ``url`` when they
    outlast the policy, the permanent error (its message naming ``url``) at once."""
    policy = policy or RetryPolicy.from_env()
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise _naming(exc, url, what) from exc
            if attempt == policy.attempts:
                raise StorageError(f"{url}: {what} failed {attempt} times, last with "
                                   f"{type(exc).__name__}: {_short(exc)}") from exc
            time.sleep(policy.pause(attempt))
    raise AssertionError("unreachable")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else "no message"


def _naming(exc: Exception, url: str, what: str) -> Exception:
    """The permanent error again, its message naming the URL (same type, when it can)."""
    message = f"{url}: {what} failed: {_short(exc)}"
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(f"{url} does not exist")
    if isinstance(exc, PermissionError):
        return PermissionError(f"{url}: access denied ({_short(exc)}); check the AWS "
                               "credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID, instance role)")
    if isinstance(exc, ValueError):
        return ValueError(message)
    return StorageError(message)
