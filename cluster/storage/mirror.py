"""A run folder that lives at a URL, worked on in a node-local folder.

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

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from cluster.storage.objects import delete, download, list_files, upload
from cluster.storage.urls import join, normalize

LOCAL_ROOT_ENV = "MEDSSL_LOCAL_RUNS"  # where node-local copies of URL run folders live

Skip = Callable[[str], bool]


def _keep_all(name: str) -> bool:
    return False


def local_folder_for(url: str, local_root: str = "") -> Path:
    """The node-local working folder of the run folder at ``url``: under ``local_root``,
    else ``$MEDSSL_LOCAL_RUNS``, else the system temp folder; named by the URL."""
    root = local_root or os.environ.get(LOCAL_ROOT_ENV) or \
        os.path.join(tempfile.gettempdir(), "medssl-runs")
    digest = hashlib.sha256(normalize(url).encode()).hexdigest()[:12]
    return Path(root) / f"{normalize(url).rsplit('/', 1)[-1]}-{digest}"


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
            if skip(name) or ".tmp-" in name:
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
                if p.is_file() and ".tmp-" not in p.name]

    def _stat(self, name: str) -> tuple[int, int]:
        stat = (self.local / name).stat()
        return stat.st_size, stat.st_mtime_ns

    def _changed(self, name: str) -> bool:
        return self._pushed.get(name) != self._stat(name)
