"""The manifest: what a prepared dataset holds, written last so it marks completion."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.atomic import atomic_write_json
from cluster.storage import is_url, join
from cluster.storage.objects import read_text

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 3
# Version 2 had no orientation record: its volumes were sliced in stored voxel order.
LEGACY_ORIENTATION = {"frame": "as_stored", "slice_axis": 2, "recorded": False,
                      "display": "stored voxel order (prepared before orientation records)"}


@dataclass
class Manifest:
    name: str
    modality: str
    source_format: str
    classes: dict[str, str]  # class id (as text, JSON keys are strings) -> name
    image_size: int
    channels: int  # 1 for medical data; 3 for natural images kept in colour
    normalization: dict[str, Any]
    splits: dict[str, list[str]]  # split -> patient names
    patient_meta: dict[str, dict[str, Any]]  # patient -> reader metadata (e.g. ACDC group)
    counts: dict[str, Any]
    spacing_stats: dict[str, list[float]]
    shards: list[dict[str, Any]]  # name, samples, bytes, sha256
    labeled_store: dict[str, Any]  # path and slices per split
    slice_index: str
    pretrain_splits: list[str]
    source_files: dict[str, str]  # path relative to the source root -> sha256
    warnings: list[dict[str, str]]  # bad input skipped with skip_bad: patient, problem
    # How slices are laid out: frame (RAS+ or as_stored), plane, rows/columns/slices axis
    # codes, display convention, the source voxel orders seen, obliquity (orientation.py)
    orientation: dict[str, Any] = field(default_factory=lambda: dict(LEGACY_ORIENTATION))
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [self.classes[k] for k in sorted(self.classes, key=int)]

    def write(self, folder: str | Path) -> Path:
        return atomic_write_json(Path(folder) / MANIFEST_NAME, asdict(self))

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """The manifest of the prepared dataset at ``folder`` (a path or an ``s3://`` URL)."""
        path = join(folder, MANIFEST_NAME)
        absent = FileNotFoundError(
            f"{path} does not exist: {folder} is not a prepared dataset "
            "(run `python -m data_prep prepare` first, or it was interrupted)")
        if not is_url(folder) and not Path(path).is_file():
            raise absent
        try:
            data = json.loads(read_text(path))
        except FileNotFoundError:
            raise absent from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        version = data.get("format_version")
        if version == 2 and "orientation" not in data:
            data = {**data, "orientation": dict(LEGACY_ORIENTATION),
                    "format_version": FORMAT_VERSION}
        elif version != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {version!r} is not supported (expected "
                             f"{FORMAT_VERSION}, or 2 from before orientation records)")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key {unknown[0]!r}")
        missing = sorted(k for k in known - set(data) if k not in ("extra",))
        if missing:
            raise ValueError(f"{path}: missing key {missing[0]!r}")
        return cls(**data)
