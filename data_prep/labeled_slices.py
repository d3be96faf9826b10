"""Labeled slices for fine-tuning, read from the prepared zarr store into memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cluster.storage import join
from data_prep.manifest import Manifest
from data_prep.normalize import apply_norm
from data_prep.zarr_store import LabeledSlices


@dataclass
class SliceSet:
    """Slices of one split with what 3D metrics need to rebuild their volumes."""

    images: torch.Tensor  # (N, 1, H, W) float32, normalised
    masks: torch.Tensor  # (N, H, W) int64 class ids
    volumes: list[str]  # "patientNNN_frameYY" per slice, for per-volume metrics
    patients: list[str]  # patient name per slice
    positions: np.ndarray  # (N,) int64: the slice's index within its volume (z order)
    spacing: np.ndarray  # (N, 3) float32 mm (x, y, slice), for HD95 in millimetres

    def __len__(self) -> int:
        return len(self.volumes)


def open_split(prepared_dir: str | Path, split: str) -> LabeledSlices:
    """The labeled store of ``split`` in a prepared dataset (a folder or an ``s3://`` URL)."""
    manifest = Manifest.read(prepared_dir)
    return LabeledSlices(join(prepared_dir, manifest.labeled_store["path"]), split)


def slice_patients(prepared_dir: str | Path, split: str) -> np.ndarray:
    """Each slice's patient name in ``split`` (what patient budgets choose from)."""
    store = open_split(prepared_dir, split)
    return np.asarray(store.patients, dtype=object)[store.patient_index]


def load_slices(prepared_dir: str | Path, split: str,
                indices: np.ndarray | None = None) -> SliceSet:
    """Slices ``indices`` of ``split`` (all when None), in the order given."""
    store = open_split(prepared_dir, split)
    chosen = np.arange(len(store)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(chosen) == 0:
        raise ValueError(f"{prepared_dir}: no labeled slices chosen from split {split!r} "
                         f"({len(store)} there)")
    if chosen.min() < 0 or chosen.max() >= len(store):
        raise IndexError(f"{prepared_dir}: slice indices must lie in [0, {len(store)}) for "
                         f"split {split!r}, got {chosen.min()}..{chosen.max()}")
    images, masks = _read_bulk(store, chosen)
    return SliceSet(
        images=torch.from_numpy(images)[:, None],
        masks=torch.from_numpy(masks.astype(np.int64)),
        volumes=[store.volumes[i] for i in store.volume_index[chosen]],
        patients=[store.patients[i] for i in store.patient_index[chosen]],
        positions=store.slices[chosen].astype(np.int64),
        spacing=store.spacing[chosen].astype(np.float32),
    )


def _read_bulk(store: LabeledSlices, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised images and masks of ``chosen`` with one orthogonal read per array.

    Reading slice by slice costs a store round trip (and shard-index lookup) each; one
    sorted, de-duplicated selection lets zarr decode each needed chunk once.
    """
    unique, inverse = np.unique(chosen, return_inverse=True)
    raw, masks = store.read(lambda: (np.asarray(store.column("image").oindex[unique]),
                                     np.asarray(store.column("mask").oindex[unique])),
                            f"read of {len(unique)} {store.split} slices")
    norm = store.norm
    images = np.stack([apply_norm(raw[k], norm[i]) for k, i in enumerate(unique)])
    return images[inverse], masks[inverse]


def require_whole_volumes(slices: SliceSet, split: str) -> SliceSet:
    """``slices`` unchanged if every volume's slice positions run without a gap (HD95 in
    3D stacks them: a missing slice would shorten distances along the slice axis)."""
    by_volume: dict[str, list[int]] = {}
    for volume, position in zip(slices.volumes, slices.positions.tolist()):
        by_volume.setdefault(volume, []).append(position)
    for volume, positions in by_volume.items():
        if sorted(positions) != list(range(min(positions), max(positions) + 1)):
            raise ValueError(f"split {split!r}: volume {volume} has slices "
                             f"{sorted(positions)} with gaps; 3D metrics need whole volumes")
    return slices
