"""Staged units: what one worker made of one patient, kept until the dataset is assembled.

``prepare`` converts patients in parallel; each finished patient lands atomically as one
folder (``meta.json`` plus one ``.npy`` per volume image and mask, in the source dtype, no
pickles). A re-run after an interruption skips every patient whose unit exists, and the
final assembly reads only these folders, memory-mapped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cluster.atomic import atomic_path, atomic_write_json
from data_prep.slices import SliceRecord, staged_slices

STAGING_DIR = "staging"
_IDENTITY = "config.json"
_META = "meta.json"


def unit_path(staging: Path, patient: str) -> Path:
    return staging / "units" / re.sub(r"[^A-Za-z0-9_-]", "_", patient)


def write_unit(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    # The folder appears under its final name only once complete. Units are not fsynced:
    # one lost to a power cut reads as unreadable and is simply converted again.
    with atomic_path(path) as tmp:
        tmp.mkdir()
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)
        (tmp / _META).write_text(json.dumps(meta))


def read_unit_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / _META).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: staged unit is unreadable ({exc})") from None


def read_unit_array(path: Path, name: str) -> np.ndarray:
    try:
        return np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: staged array {name} is unreadable ({exc}); delete the "
                         "unit and re-run to convert that patient again") from None


def claim_staging(staging: Path, identity: dict[str, Any]) -> None:
    """Start or continue staging; refuse units made with another configuration."""
    marker = staging / _IDENTITY
    if marker.is_file():
        if json.loads(marker.read_text()) != identity:
            raise FileExistsError(f"{staging} holds an interrupted preparation made with "
                                  "another config; re-run with that config to finish it, or "
                                  "delete the folder")
        return
    staging.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, identity)


@dataclass
class StagedVolume:
    """One volume of a staged unit, as the assembly sees it."""

    unit: Path
    index: int  # position in the unit: arrays image_<index>, mask_<index>
    patient: str
    split: str
    info: dict[str, Any]  # the unit's description of the volume

    def images(self) -> np.ndarray:
        return read_unit_array(self.unit, f"image_{self.index}")

    def masks(self) -> np.ndarray | None:
        return read_unit_array(self.unit, f"mask_{self.index}") if self.info["labeled"] \
            else None

    def records(self, slices: range | None = None) -> Iterator[SliceRecord]:
        return staged_slices(self.patient, self.split, self.info, self.images(),
                             self.masks(), slices)


Piece = tuple[StagedVolume, int, int]  # a volume and a [start, stop) range of its slices
