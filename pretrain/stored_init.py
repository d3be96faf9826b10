"""Encoder inits given as object-store URLs: told apart by a listing, fetched into a
node-local cache, loaded by the local code.

An ``s3://`` init names what its local form would (an export folder, a run folder, an
export's ``backbone.json`` or weights, a pretraining checkpoint, a weights file) and means
the same. What it is comes from a listing of the URL (and the export description, when
there is one), as the local code tells it from the file system; only the files that
loading it reads are downloaded. The copy keeps the URL's layout below the folder holding
it (``export/``, ``checkpoints/epochNNNN.pt``), so that the local readers (weights-only
torch loads, safetensors: nothing is unpickled) take it as they take a path.

The copy's folder is named by the URL and the versions (size, ETag) of those files: a
changed object is fetched again into a new folder, and no reader sees a copy change under
it. Downloads are atomic (temp file and rename), so the processes of a node share it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from cluster.storage import join, name_of, parent_of
from cluster.storage.mirror import local_folder_for, node_local_root
from cluster.storage.objects import download, read_bytes, versions
from cluster.storage.urls import normalize
from pretrain.export_meta import EXPORT_DIR, EXPORT_META, EXPORT_WEIGHTS

CACHE_DIR = "inits"  # below the node-local root ($MEDSSL_LOCAL_RUNS or the temp folder)
# where a folder's export description lies: an export folder's own, a run's export's
_DESCRIPTIONS = (EXPORT_META, f"{EXPORT_DIR}/{EXPORT_META}")


@dataclass(frozen=True)
class StoredInit:
    """The init at ``url``: found in the folder ``base`` (``target`` below it; "" for
    ``base`` itself), with the files below ``base`` that loading it reads and their
    versions (None: named by its export description, but missing)."""

    url: str
    base: str
    target: str
    files: dict[str, str | None]
    description: str | None = None  # its backbone.json among the files: an export or run

    @property
    def kind(self) -> Literal["export", "run", "unresolved"] | None:
        """``export``, ``run`` or ``unresolved`` (a folder holding no export) as the
        listing tells; None for a file whose contents tell (checkpoint or weights)."""
        if self.description is not None:
            return "run" if not self.target and "/" in self.description else "export"
        return None if self.files else "unresolved"

    def local(self, description_only: bool = False) -> Path:
        """The init's local form, its files fetched (its export description alone, if
        asked); a file its description names but the store lacks raises here."""
        folder = self._folder()
        folder.mkdir(parents=True, exist_ok=True)
        for name, version in self.files.items():
            if description_only and name != self.description:
                continue
            if version is None:
                raise FileNotFoundError(f"{join(self.base, name)}: encoder weights file "
                                        "does not exist")
            if not (folder / name).is_file():  # a whole file of this version: fetched before
                download(join(self.base, name), folder / name)
        return folder / self.target

    def url_of(self, path: Path) -> str:
        """The URL of a file of the local copy."""
        try:
            return join(self.base, path.relative_to(self._folder()).as_posix())
        except ValueError:
            return str(path)

    @contextlib.contextmanager
    def naming_urls(self) -> Iterator[None]:
        """Errors raised inside name the store's URLs instead of the local copy's paths."""
        try:
            yield
        except (ValueError, OSError) as exc:
            if len(exc.args) == 1 and isinstance(exc.args[0], str):
                exc.args = (exc.args[0].replace(str(self._folder()), self.base),)
            raise

    def _folder(self) -> Path:
        key = json.dumps(sorted(self.files.items()))
        cache = local_folder_for(self.url, str(node_local_root() / CACHE_DIR), key)
        return cache / name_of(self.base)  # kept epochs need their "checkpoints" parent


def locate(url: str) -> StoredInit | None:
    """What the init at ``url`` is, from a listing; None when nothing is there."""
    url = normalize(url)
    found = versions(url)
    below = {name: version for name, version in found.items() if name}
    if below:  # a folder: an export, a run holding one, or neither
        description = next((d for d in _DESCRIPTIONS if d in below), None)
        if description is None:
            return StoredInit(url, url, "", {})
        return _export(url, url, "", description, below)
    if not found:
        return None
    base, name = parent_of(url), name_of(url)
    files: dict[str, str | None] = {name: found[""]}
    suffix = PurePosixPath(name).suffix
    if suffix == ".json":
        return _export(url, base, name, name, files)
    if suffix == ".safetensors":  # an export's weights, when its description lies beside
        meta = versions(join(base, EXPORT_META)).get("")
        if meta is not None:
            return StoredInit(url, base, name, {**files, EXPORT_META: meta}, EXPORT_META)
    return StoredInit(url, base, name, files)


def require(url: str) -> StoredInit:
    """:func:`locate`, with an error naming ``url`` when nothing is there."""
    stored = locate(url)
    if stored is None:
        raise FileNotFoundError(f"{normalize(url)}: encoder weights file or folder does not "
                                "exist")
    return stored


def _export(url: str, base: str, target: str, description: str,
            listed: Mapping[str, str | None]) -> StoredInit:
    """An export found by its description: the description and the weights it names."""
    weights = PurePosixPath(description).parent / _weights_name(join(base, description))
    version = listed.get(str(weights)) or versions(join(base, str(weights))).get("")
    return StoredInit(url, base, target,
                      {description: listed[description], str(weights): version}, description)


def _weights_name(description: str) -> str:
    """The weights file an export description names (read leniently: the strict reader
    checks the fetched copy and reports what is wrong with it)."""
    try:
        record = json.loads(read_bytes(description))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return EXPORT_WEIGHTS
    name = record.get("weights", EXPORT_WEIGHTS) if isinstance(record, dict) else None
    if not isinstance(name, str):
        return EXPORT_WEIGHTS
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        # a copy must stay inside its cache folder; the local form reads a file beside it
        raise ValueError(f"{description}: weights {name!r} is not a file name")
    return name
