"""2D slice records: the unit stored in shards and in the zarr store."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_prep.normalize import NormParams


@dataclass
class SliceRecord:
    """One in-plane slice in its source dtype, with what a reader needs to use it."""

    key: str  # WebDataset sample key: letters, digits, underscores, hyphens; no dots
    patient: str
    volume: str
    frame: int
    slice_index: int
    image: np.ndarray  # (H, W), or (C, H, W) for multi-channel data; source dtype
    mask: np.ndarray | None  # (H, W) uint8 class ids
    spacing: tuple[float, float, float]
    norm: NormParams
    split: str
    info: dict[str, object] | None = None  # the reader's metadata (pathology group, series)

    def meta(self) -> dict[str, object]:
        return {
            "patient": self.patient,
            "volume": self.volume,
            "frame": self.frame,
            "slice": self.slice_index,
            "spacing": list(self.spacing),
            "norm": self.norm.as_list(),
            "split": self.split,
            "labeled": self.mask is not None,
            "info": self.info or {},
        }


def staged_slices(patient: str, split: str, volume: dict[str, Any], images: np.ndarray,
                  masks: np.ndarray | None, slices: range | None = None
                  ) -> Iterator[SliceRecord]:
    """The slices of one staged volume: ``images`` is (slice, [C,] H, W), slices first."""
    norm = NormParams(*volume["norm"])
    spacing = tuple(float(s) for s in volume["spacing"])
    for z in slices if slices is not None else range(images.shape[0]):
        yield SliceRecord(
            key=safe_key(f"{volume['volume']}_slice{z:03d}"),
            patient=patient, volume=volume["volume"], frame=int(volume["frame"]),
            slice_index=z, image=np.asarray(images[z]),
            mask=None if masks is None else np.asarray(masks[z]),
            spacing=spacing, norm=norm, split=split,  # type: ignore[arg-type]
            info=volume.get("meta") or {},
        )


def safe_key(key: str) -> str:
    """WebDataset splits a file name at its first dot: keys keep only [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)
