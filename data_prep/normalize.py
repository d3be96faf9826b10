"""Intensity normalisation, stored as parameters rather than applied on disk.

Prepared data keeps voxels in their source dtype; each slice carries
``[offset, scale, low, high]`` and readers compute ``(clip(raw, low, high) - offset) /
scale`` in float32 (``low``/``high`` are ``None`` when nothing is clipped). Nothing is
wrapped or truncated on disk (no uint16 -> uint8 casts), so any scheme can be changed
later without re-reading the scans.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NormParams:
    offset: float
    scale: float
    low: float | None = None  # clip bounds applied before offset/scale
    high: float | None = None

    def as_list(self) -> list[float | None]:
        return [self.offset, self.scale, self.low, self.high]

    def as_array(self) -> list[float]:
        """For numeric stores: missing bounds become -inf / inf."""
        return [self.offset, self.scale, -math.inf if self.low is None else self.low,
                math.inf if self.high is None else self.high]

    @classmethod
    def from_values(cls, values: Sequence[float | None]) -> NormParams:
        """From ``as_list``/``as_array`` output (or the older ``[offset, scale]``)."""
        if len(values) not in (2, 4):
            raise ValueError(f"normalisation parameters must have 2 or 4 values, got {values}")
        low = values[2] if len(values) == 4 else None
        high = values[3] if len(values) == 4 else None
        offset, scale = values[0], values[1]
        if offset is None or scale is None:
            raise ValueError(f"normalisation offset and scale must be numbers, got {values}")
        finite = lambda v: None if v is None or not math.isfinite(float(v)) else float(v)  # noqa: E731
        return cls(float(offset), float(scale), finite(low), finite(high))


def _zscore(values: np.ndarray, low: float | None = None,
            high: float | None = None) -> NormParams:
    clipped = values.astype(np.float64, copy=False)
    if low is not None or high is not None:
        clipped = np.clip(clipped, low, high)
    std = float(clipped.std())
    return NormParams(offset=float(clipped.mean()), scale=std if std > 0 else 1.0,
                      low=low, high=high)


def zscore_params(volume: np.ndarray) -> NormParams:
    """Per-image z-score over the whole volume (nnU-Net's scheme for MRI)."""
    return _zscore(volume)


def fixed_params(mean: float, std: float) -> NormParams:
    """Dataset-wide constants (the reference study used 67.27 / 84.66 on ACDC)."""
    if std <= 0:
        raise ValueError(f"normalisation std must be positive, got {std}")
    return NormParams(offset=mean, scale=std)


def ct_window_params(volume: np.ndarray, window: tuple[float, float]) -> NormParams:
    """Clip to a Hounsfield window (e.g. soft tissue -160..240), then z-score the volume."""
    low, high = window
    if not low < high:
        raise ValueError(f"CT window must satisfy low < high, got {window}")
    return _zscore(volume, float(low), float(high))


def percentile_params(volume: np.ndarray, percentiles: tuple[float, float]) -> NormParams:
    """Clip to the volume's own percentiles (robust to outliers), then z-score."""
    low_p, high_p = percentiles
    if not 0 <= low_p < high_p <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    low, high = np.percentile(volume, [low_p, high_p])
    return _zscore(volume, float(low), float(high))


def apply_norm(raw: np.ndarray, params: NormParams | Sequence[float | None]) -> np.ndarray:
    """float32 ``(clip(raw, low, high) - offset) / scale``."""
    if not isinstance(params, NormParams):
        params = NormParams.from_values(params)
    values = raw.astype(np.float32)
    if params.low is not None or params.high is not None:
        values = np.clip(values, params.low, params.high)
    return ((values - np.float32(params.offset)) / np.float32(params.scale)).astype(np.float32)
