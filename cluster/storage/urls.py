"""Telling object-store URLs from local paths, and joining either.

A URL is ``scheme://...`` with a scheme other than ``file``; ``file:///x`` is the local
path ``/x``. Paths keep every behaviour they had; URLs are joined with ``/`` only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# schemes medssl reads and writes through fsspec (s3fs); others are refused by name
REMOTE_SCHEMES = ("s3",)

PathOrUrl = str | os.PathLike[str]


def scheme_of(location: PathOrUrl) -> str:
    """``s3`` for ``s3://b/k``, ``file`` for ``file:///x`` and for plain paths."""
    match = _SCHEME.match(str(location))
    return match.group(1).lower() if match else "file"


def is_url(location: PathOrUrl) -> bool:
    """Whether ``location`` is an object-store URL (not a local path or ``file://``)."""
    scheme = scheme_of(location)
    if scheme == "file":
        return False
    if scheme not in REMOTE_SCHEMES:
        raise ValueError(f"{location}: unsupported URL scheme {scheme!r} (medssl reads local "
                         f"paths, file:// and {', '.join(s + '://' for s in REMOTE_SCHEMES)})")
    return True


def local_path(location: PathOrUrl) -> Path:
    """The local path of a path or ``file://`` URL; a remote URL is a programming error."""
    text = str(location)
    if is_url(text):
        raise ValueError(f"{text} is an object-store URL, not a local path")
    if scheme_of(text) == "file":
        text = _SCHEME.sub("", text, count=1) if _SCHEME.match(text) else text
    return Path(text)


def normalize(location: PathOrUrl) -> str:
    """A URL without a trailing slash, or a local path as text (``file://`` stripped)."""
    return str(location).rstrip("/") if is_url(location) else str(local_path(location))


def absolute(location: PathOrUrl) -> str:
    """A URL as is (normalised), a path made absolute: what a record of where something
    is keeps, so that it still resolves from another working directory."""
    return normalize(location) if is_url(location) else str(local_path(location).resolve())


def join(base: PathOrUrl, *parts: str) -> str:
    """``base/part/...`` for a URL or a path (``file://`` becomes a path)."""
    if not is_url(base):
        return str(local_path(base).joinpath(*parts))
    text = str(base).rstrip("/")
    for part in parts:
        text += "/" + str(part).strip("/")
    return text


def parent_of(location: PathOrUrl) -> str:
    if not is_url(location):
        return str(local_path(location).parent)
    scheme, rest = str(location).rstrip("/").split("://", 1)
    return f"{scheme}://{PurePosixPath(rest).parent}"


def name_of(location: PathOrUrl) -> str:
    return PurePosixPath(str(location).rstrip("/")).name
