"""Segmentation metrics per 3D volume (slices reassembled by patient and frame).

Dice follows MONAI's ``DiceMetric`` conventions (``include_background=False``,
``ignore_empty=True``): a class absent from a volume's ground truth gives NaN for that
volume and is left out of the mean.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np


class VolumeDice:
    """Accumulates per-volume, per-class overlap counts from batches of 2D slices."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._counts: dict[str, np.ndarray] = defaultdict(
            lambda: np.zeros((3, num_classes), dtype=np.int64))

    def update(self, prediction: np.ndarray, target: np.ndarray, volume_ids: list[str]) -> None:
        """``prediction`` and ``target``: (B, H, W) integer class maps."""
        classes = np.arange(self.num_classes)[:, None, None]
        for pred, true, volume in zip(prediction, target, volume_ids):
            pred_hot = pred[None] == classes
            true_hot = true[None] == classes
            counts = self._counts[volume]
            counts[0] += (pred_hot & true_hot).sum(axis=(1, 2))
            counts[1] += pred_hot.sum(axis=(1, 2))
            counts[2] += true_hot.sum(axis=(1, 2))

    def per_volume(self) -> dict[str, np.ndarray]:
        """Dice per foreground class for each volume (NaN where the class is absent)."""
        result = {}
        for volume, (inter, pred, true) in self._counts.items():
            with np.errstate(invalid="ignore", divide="ignore"):
                dice = 2 * inter / (pred + true)
            dice = np.where(true > 0, dice, np.nan)
            result[volume] = dice[1:]
        return result

    def per_class(self) -> np.ndarray:
        values = np.array(list(self.per_volume().values()))
        if values.size == 0:
            return np.full(self.num_classes - 1, np.nan)
        return _nanmean(values, axis=0)

    def mean(self) -> float:
        return float(_nanmean(self.per_class()))


def _nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``np.nanmean`` that returns NaN for all-NaN slices without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)
