"""Atomic file writes: a reader never sees a file that looks complete but is not.

Every artifact medssl writes goes through these helpers: the content lands in a
temporary file in the destination folder and is renamed into place, which is atomic on
POSIX file systems. An interrupted command therefore leaves either the old file, no
file, or a stray ``*.tmp-*`` file that no reader looks at.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARKER = ".tmp-"


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; rename it into place on success.

    Works for files and for folders (a zarr store, a shard set): whatever the body
    creates at the yielded path replaces ``destination`` as a whole.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(
        prefix=destination.name + TMP_MARKER, dir=destination.parent
    )
    os.close(handle)
    tmp = Path(tmp_name)
    tmp.unlink()  # the body decides whether it is a file or a folder
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {destination}")
        if tmp.is_file():
            _fsync(tmp)
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(tmp, destination)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_bytes(destination: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(destination) as tmp:
        tmp.write_bytes(data)
    return Path(destination)


def atomic_write_text(destination: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(destination, text.encode("utf-8"))


def atomic_write_json(destination: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(destination, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
