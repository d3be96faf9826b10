"""2D slice records: the unit stored in shards and in the zarr store."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data_prep.geometry import center_pad_crop
from data_prep.normalize import NormParams
from data_prep.volume import Volume


@dataclass
class SliceRecord:
    """One in-plane slice in its source dtype, with what a reader needs to use it."""

    key: str  # WebDataset sample key: letters, digits and underscores, no dots
    patient: str
    frame: int
    slice_index: int
    image: np.ndarray  # (H, W), source dtype
    mask: np.ndarray | None  # (H, W) uint8 class ids
    spacing: tuple[float, float, float]
    norm: NormParams
    split: str

    def meta(self) -> dict[str, object]:
        return {
            "patient": self.patient,
            "volume": f"{self.patient}_frame{self.frame:02d}",
            "frame": self.frame,
            "slice": self.slice_index,
            "spacing": list(self.spacing),
            "norm": self.norm.as_list(),
            "split": self.split,
            "labeled": self.mask is not None,
        }


def volume_slices(volume: Volume, norm: NormParams, split: str, size: int) -> Iterator[SliceRecord]:
    """Cut a volume along its third axis into fixed-size slices."""
    image = center_pad_crop(volume.image, size, fill=_background(volume.image))
    mask = center_pad_crop(volume.mask, size, fill=0) if volume.mask is not None else None
    for z in range(volume.n_slices):
        yield SliceRecord(
            key=_safe_key(f"{volume.patient}_frame{volume.frame:02d}_slice{z:03d}"),
            patient=volume.patient, frame=volume.frame, slice_index=z,
            image=np.ascontiguousarray(image[:, :, z]),
            mask=None if mask is None else np.ascontiguousarray(mask[:, :, z]),
            spacing=volume.spacing, norm=norm, split=split,
        )


def _safe_key(key: str) -> str:
    """WebDataset splits a file name at its first dot: keys keep only [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


def _background(image: np.ndarray) -> float | int:
    """Pad with the volume's minimum so padding looks like air, not like tissue."""
    low = image.min()
    return low.item() if hasattr(low, "item") else low
