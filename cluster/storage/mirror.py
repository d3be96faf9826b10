"""A run folder that lives at a URL, worked on in a node-local folder (and a folder
written once, staged locally: :func:`staged_folder`).

Training code writes files to a local folder as it always has; the mirror uploads what
changed at each checkpoint and, on a fresh node, downloads the folder before a run
resumes. The object store is the source of truth: a restart never trusts what a local
folder kept from an earlier attempt (it may hold a checkpoint that never reached the
store), so :meth:`FolderMirror.pull` starts from an empty folder.

A push is ordered so that a reader of the store never sees a checkpoint whose parts are
missing: every other file first, then the *commit* files (``last.pt``), each one object
PUT that appears whole or not at all; files deleted locally (optimizer shard folders a
new checkpoint replaced) are deleted remotely only after that.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from cluster.atomic import TMP_MARKER
from cluster.storage.objects import delete, download, list_files, upload
from cluster.storage.urls import is_url, join, local_path, name_of, normalize

LOCAL_ROOT_ENV = "MEDSSL_LOCAL_RUNS"  # where node-local copies of URL run folders live

Skip = Callable[[str], bool]


def _keep_all(name: str) -> bool:
    return False


def node_local_root(given: str = "") -> Path:
    """Where node-local copies live: ``given``, else ``$MEDSSL_LOCAL_RUNS``, else a folder
    in the system temp folder."""
    return Path(given or os.environ.get(LOCAL_ROOT_ENV) or
                os.path.join(tempfile.gettempdir(), "medssl-runs"))


def local_folder_for(url: str, local_root: str = "", key: str = "") -> Path:
    """The node-local working folder of the run folder at ``url``: under
    :func:`node_local_root`, named by the URL (and ``key``, when given)."""
    digest = hashlib.sha256((normalize(url) + key).encode()).hexdigest()[:12]
    return node_local_root(local_root) / f"{name_of(url)}-{digest}"


class FolderMirror:
    """``local`` kept in step with ``url`` by explicit pulls and pushes."""

    def __init__(self, local: Path, url: str) -> None:
        self.local, self.url = Path(local), normalize(url)
        # name -> (size, mtime_ns) of what the store holds from this mirror
        self._pushed: dict[str, tuple[int, int]] = {}

    def pull(self, skip: Skip = _keep_all) -> list[str]:
        """Replace the local folder by the store's files (those ``skip`` leaves); the
        names fetched."""
        if self.local.exists():
            shutil.rmtree(self.local)
        self.local.mkdir(parents=True)
        fetched = []
        for name in sorted(list_files(self.url)):
            if skip(name) or TMP_MARKER in name:
                continue
            download(join(self.url, name), self.local / name)
            self._pushed[name] = self._stat(name)
            fetched.append(name)
        return fetched

    def push(self, commit: Sequence[str] = (), skip: Skip = _keep_all,
             only: Iterable[str] | None = None) -> list[str]:
        """Upload local files that changed since they were last pushed (all of them, or
        ``only``), then ``commit`` in that order, then delete remotely what this mirror
        pushed before and is gone locally. Returns the names uploaded."""
        names = set(only) if only is not None else set(self._local_names())
        changed = sorted(n for n in names - set(commit) if not skip(n) and self._changed(n))
        committed = [n for n in commit if (self.local / n).is_file() and self._changed(n)]
        for name in [*changed, *committed]:
            stat = self._stat(name)
            upload(self.local / name, join(self.url, name))
            self._pushed[name] = stat
        if only is None:
            for name in sorted(set(self._pushed) - set(self._local_names())):
                delete(join(self.url, name))
                del self._pushed[name]
        return [*changed, *committed]

    def _local_names(self) -> list[str]:
        return [p.relative_to(self.local).as_posix() for p in self.local.rglob("*")
                if p.is_file() and TMP_MARKER not in p.name]

    def _stat(self, name: str) -> tuple[int, int]:
        stat = (self.local / name).stat()
        return stat.st_size, stat.st_mtime_ns

    def _changed(self, name: str) -> bool:
        return self._pushed.get(name) != self._stat(name)


@contextlib.contextmanager
def staged_folder(location: str | os.PathLike[str], commit: Sequence[str] = ()) -> Iterator[Path]:
    """A folder to write into for ``location``: the local folder itself, or for a URL a
    temporary one uploaded on success, ``commit`` files last (a reader that looks for
    them finds the rest there already)."""
    if not is_url(location):
        yield local_path(location)
        return
    root = node_local_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="staged-", dir=root) as tmp:
        yield Path(tmp)
        FolderMirror(Path(tmp), str(location)).push(commit=commit)
