"""Reading and writing files that may live in an object store: one call for either place.

Every function takes a local path, a ``file://`` URL or an ``s3://`` URL. Local paths go
through the file system as before (writes atomic by temp file and rename); URLs through
s3fs, each call retried on transient failures (:mod:`cluster.storage.retry`).

What is atomic on an object store: one object. A PUT (single or multipart) becomes
visible whole or not at all, so a reader never sees half an object; a set of objects (a
checkpoint and its optimizer shards) is committed by writing the object that points at
the others last (:mod:`cluster.storage.mirror`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cluster.atomic import atomic_path, atomic_write_bytes
from cluster.storage.client import filesystem, strip_scheme
from cluster.storage.retry import retrying
from cluster.storage.urls import PathOrUrl, is_url, local_path, normalize


def read_bytes(location: PathOrUrl) -> bytes:
    if not is_url(location):
        return local_path(location).read_bytes()
    url = normalize(location)
    fs = filesystem(url)
    # one GET: s3fs would otherwise ask for the size first to split a large read
    return retrying(lambda: fs.cat_file(strip_scheme(url), max_concurrency=1), url, "read")


def read_text(location: PathOrUrl) -> str:
    return read_bytes(location).decode("utf-8")


def read_range(location: PathOrUrl, start: int, end: int) -> bytes:
    """Bytes ``start`` up to ``end`` (exclusive): one ranged GET on a store. Fewer bytes
    than asked means the object is shorter than its index says: a ValueError."""
    if end <= start:
        return b""
    if is_url(location):
        url = normalize(location)
        fs = filesystem(url)
        data = retrying(lambda: fs.cat_file(strip_scheme(url), start=start, end=end), url,
                        f"read of bytes {start}-{end - 1}")
    else:
        url = str(local_path(location))
        with open(url, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
    if len(data) != end - start:
        raise ValueError(f"{url}: holds fewer bytes than asked for ({start + len(data)} < "
                         f"{end}); truncated?")
    return data


def exists(location: PathOrUrl) -> bool:
    """Whether a file (object) exists at ``location``."""
    if not is_url(location):
        return local_path(location).is_file()
    url = normalize(location)
    fs = filesystem(url)
    return bool(retrying(lambda: fs.isfile(strip_scheme(url)), url, "existence check"))


def write_bytes(location: PathOrUrl, data: bytes) -> str:
    """Write a whole file: temp file + rename locally, one PUT on a store."""
    if not is_url(location):
        return str(atomic_write_bytes(local_path(location), data))
    url = normalize(location)
    fs = filesystem(url)
    retrying(lambda: fs.pipe_file(strip_scheme(url), data), url, "write")
    return url


def write_text(location: PathOrUrl, text: str) -> str:
    return write_bytes(location, text.encode("utf-8"))


def upload(local: str | os.PathLike[str], url: str) -> None:
    """Copy a local file to ``url`` (one object, visible only once complete)."""
    fs = filesystem(url)
    retrying(lambda: fs.put_file(str(local), strip_scheme(url)), url, "upload")


def download(url: str, local: str | os.PathLike[str]) -> Path:
    """Copy the object at ``url`` to ``local`` atomically (no partial file on failure)."""
    fs = filesystem(url)
    destination = Path(local)

    def fetch() -> None:
        with atomic_path(destination) as tmp:
            fs.get_file(strip_scheme(url), str(tmp))

    retrying(fetch, url, "download")
    return destination


def list_files(location: PathOrUrl) -> dict[str, int]:
    """Every file below ``location``: relative POSIX name -> size in bytes ({} if none)."""
    return {name: size for name, (size, _) in _entries(location).items() if name}


def versions(location: PathOrUrl) -> dict[str, str]:
    """What is at ``location``, each file with a version that changes when its content
    does (size and ETag on a store, size and mtime locally): ``{"": version}`` for a
    file, relative POSIX name -> version for every file below a folder, {} for nothing.
    One listing on a store."""
    return {name: f"{size}-{stamp}" for name, (size, stamp) in _entries(location).items()}


def _entries(location: PathOrUrl) -> dict[str, tuple[int, str]]:
    """The file at ``location`` (named "") or every file below it (by relative POSIX
    name), each with its size and a stamp that changes with its content (ETag on a
    store, mtime locally): one listing either way."""
    if not is_url(location):
        root = local_path(location)
        if root.is_file():
            return {"": _local_entry(root)}
        return {path.relative_to(root).as_posix(): _local_entry(path)
                for path in sorted(root.rglob("*")) if path.is_file()}
    url = normalize(location)
    fs = filesystem(url)
    prefix = strip_scheme(url)

    def walk() -> dict[str, tuple[int, str]]:
        found = fs.find(prefix, detail=True)  # the object itself, or the keys below it
        return {name[len(prefix) + 1:]: (int(info["size"]), _etag(info))
                for name, info in found.items() if info.get("type") != "directory"
                and (name == prefix or name.startswith(prefix + "/"))}

    return retrying(walk, url, "listing")


def _local_entry(path: Path) -> tuple[int, str]:
    stat = path.stat()
    return stat.st_size, str(stat.st_mtime_ns)


def _etag(info: dict) -> str:
    return str(info.get("ETag") or info.get("etag") or "").strip('"')


def delete(location: PathOrUrl) -> None:
    """Remove one file; a missing one is no error."""
    if not is_url(location):
        local_path(location).unlink(missing_ok=True)
        return
    url = normalize(location)
    fs = filesystem(url)

    def remove() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(strip_scheme(url))

    retrying(remove, url, "delete")


def copy(source: str, destination: str) -> None:
    """Copy one object to another key of the same store, server-side (no download)."""
    fs = filesystem(source)
    retrying(lambda: fs.copy(strip_scheme(normalize(source)),
                             strip_scheme(normalize(destination))), source, "copy")
