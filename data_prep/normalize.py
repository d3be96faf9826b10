"""Intensity normalisation, stored as parameters rather than applied on disk.

Prepared data keeps voxels in their source dtype; each slice carries ``(offset, scale)``
so readers compute ``(raw - offset) / scale`` in float32. Nothing is wrapped or
truncated on the way (no uint16 -> uint8 casts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NormParams:
    offset: float
    scale: float


def zscore_params(volume: np.ndarray) -> NormParams:
    """Per-image z-score over the whole volume (nnU-Net's scheme for MRI)."""
    values = volume.astype(np.float64, copy=False)
    std = float(values.std())
    return NormParams(offset=float(values.mean()), scale=std if std > 0 else 1.0)


def fixed_params(mean: float, std: float) -> NormParams:
    """Dataset-wide constants (the reference study used 67.27 / 84.66 on ACDC)."""
    if std <= 0:
        raise ValueError(f"normalisation std must be positive, got {std}")
    return NormParams(offset=mean, scale=std)


def apply_norm(raw: np.ndarray, offset: float, scale: float) -> np.ndarray:
    return ((raw.astype(np.float32) - np.float32(offset)) / np.float32(scale)).astype(np.float32)
