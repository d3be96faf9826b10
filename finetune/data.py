"""Labeled slices for fine-tuning, read from the prepared zarr store into memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.manifest import Manifest
from data_prep.zarr_store import LabeledSlices


@dataclass
class SliceSet:
    images: torch.Tensor  # (N, 1, H, W) float32, normalised
    masks: torch.Tensor  # (N, H, W) int64 class ids
    volumes: list[str]  # "patientNNN_frameYY" per slice, for per-volume metrics

    def __len__(self) -> int:
        return len(self.volumes)


def load_slices(prepared_dir: str | Path, split: str,
                indices: np.ndarray | None = None) -> SliceSet:
    manifest = Manifest.read(prepared_dir)
    store = LabeledSlices(Path(prepared_dir) / manifest.labeled_store["path"], split)
    chosen = np.arange(len(store)) if indices is None else indices
    if len(chosen) == 0:
        raise ValueError(f"{prepared_dir}: split {split!r} has no labeled slices")
    images, masks = zip(*(store[int(i)] for i in chosen))
    return SliceSet(
        images=torch.from_numpy(np.stack(images))[:, None],
        masks=torch.from_numpy(np.stack(masks).astype(np.int64)),
        volumes=[store.volume_of(int(i)) for i in chosen],
    )


def random_flips(images: torch.Tensor, masks: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip image and mask together, independently per sample and axis."""
    for image_axis in (2, 3):
        flip = torch.rand(images.shape[0], generator=generator) < 0.5
        if flip.any():
            images = images.clone()
            masks = masks.clone()
            images[flip] = images[flip].flip(image_axis)
            masks[flip] = masks[flip].flip(image_axis - 1)
    return images, masks
