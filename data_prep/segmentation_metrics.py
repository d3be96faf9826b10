"""Segmentation metrics on 2D slices and on 3D volumes rebuilt per patient and frame.

Definitions (DESIGN.md, "Metrics"), each equal to MONAI's on the same arrays (tested):

- Dice and IoU per foreground class as ``DiceMetric`` / ``MeanIoU`` with
  ``include_background=False, ignore_empty=True``: a class absent from the ground truth
  of a sample gives NaN for that sample, whatever was predicted. A *slice* sample is one
  2D slice; a *volume* sample is one patient and frame ("patientNNN_frameYY") with its
  slices stacked in slice-position order. Computed from overlap counts.
- HD95 in millimetres per volume and foreground class, by MONAI's own
  ``compute_hausdorff_distance(percentile=95, include_background=False, spacing=...)``
  (what ``HausdorffDistanceMetric`` calls) on the stacked 3D volume. With a percentile,
  MONAI (1.6.1) gives NaN whenever the class is missing from the prediction *or* the
  ground truth (the 95th percentile of infinite distances interpolates to NaN); only a
  class present in both gets a number. A structure the model misses entirely therefore
  drops out of the HD95 mean; it still counts as Dice 0.

Aggregation: per class, the NaN-ignoring mean over samples (slices or volumes); overall,
the NaN-ignoring mean of those per-class values over foreground classes. A value that is
undefined (no sample has the class) is NaN in arrays and ``None`` in :meth:`summary`,
which stays strict JSON.

Axes and spacing: converters hold volumes as (x, y, slice) with spacing (x, y, slice) mm
(``data_prep.volume.Volume``, DICOM maps x to columns and y to rows before that), and
store slices as (slice, x, y) (``data_prep.convert._slices_first``). So a stored slice's
H axis is x and its W axis is y, and stacking slices on a last axis gives an (x, y,
slice) volume whose spacing is the stored (x, y, slice) triple unchanged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import torch

HD95_PERCENTILE = 95


@dataclass
class _Volume:
    """What one volume's slices leave behind: counts for overlap, masks for HD95."""

    spacing: np.ndarray  # (3,) mm (x, y, slice)
    counts: np.ndarray  # (3, C) summed over slices: intersection, predicted, true
    masks: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


class SegmentationMetrics:
    """Accumulates batches of predicted and true 2D class maps; reports slice and
    volume metrics once all slices of each volume have been seen."""

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        if not 2 <= num_classes <= 256:  # masks are kept as uint8
            raise ValueError(f"num_classes must be in [2, 256], got {num_classes}")
        names = list(class_names) if class_names is not None else [
            "background", *(f"class{c}" for c in range(1, num_classes))]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for {num_classes} classes "
                             "(the names include background)")
        self.num_classes = num_classes
        self.foreground_names = names[1:]
        self._slice_counts: list[np.ndarray] = []  # (3, C) per slice, in update order
        self._volumes: dict[str, _Volume] = {}

    def update(self, prediction: np.ndarray, target: np.ndarray, volume_ids: Sequence[str],
               slice_positions: Sequence[int] | np.ndarray, spacings: np.ndarray) -> None:
        """Add a batch: ``prediction`` and ``target`` are (B, H, W) integer class maps,
        ``slice_positions`` each slice's index in its volume, ``spacings`` (B, 3) mm in
        the store's (x, y, slice) order."""
        prediction, target = np.asarray(prediction), np.asarray(target)
        spacings = np.asarray(spacings, dtype=np.float64).reshape(len(prediction), 3)
        self._check_batch(prediction, target, volume_ids, slice_positions)
        for pred, true, volume, position, spacing in zip(
                prediction, target, volume_ids, slice_positions, spacings):
            counts = overlap_counts(pred, true, self.num_classes)
            self._slice_counts.append(counts)
            self._add_to_volume(str(volume), int(position), spacing, counts, pred, true)

    def _check_batch(self, prediction: np.ndarray, target: np.ndarray,
                     volume_ids: Sequence[str],
                     slice_positions: Sequence[int] | np.ndarray) -> None:
        if prediction.ndim != 3 or prediction.shape != target.shape:
            raise ValueError("prediction and target must be (B, H, W) of one shape, got "
                             f"{prediction.shape} and {target.shape}")
        if not len(prediction) == len(volume_ids) == len(slice_positions):
            raise ValueError("one volume id and one slice position per slice are needed")
        for name, labels in (("prediction", prediction), ("target", target)):
            # one-hot encoding would silently drop out-of-range ids
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"{name} holds class ids outside [0, {self.num_classes})")

    def _add_to_volume(self, volume: str, position: int, spacing: np.ndarray,
                       counts: np.ndarray, pred: np.ndarray, true: np.ndarray) -> None:
        entry = self._volumes.setdefault(
            volume, _Volume(spacing=spacing, counts=np.zeros_like(counts)))
        if position in entry.masks:
            raise ValueError(f"slice {position} of {volume} was added twice")
        if not np.allclose(entry.spacing, spacing, rtol=1e-5):
            raise ValueError(f"{volume}: slice spacing {spacing.tolist()} differs from "
                             f"{entry.spacing.tolist()}")
        entry.counts += counts
        entry.masks[position] = (pred.astype(np.uint8), true.astype(np.uint8))

    @property
    def volume_ids(self) -> list[str]:
        """Volumes seen so far, sorted: the row order of the volume arrays."""
        return sorted(self._volumes)

    def slice_scores(self) -> dict[str, np.ndarray]:
        """``dice`` and ``iou``: (N, C-1) per slice, rows in the order slices were added."""
        counts = np.stack(self._slice_counts) if self._slice_counts else np.zeros(
            (0, 3, self.num_classes), np.int64)
        return overlap_scores(counts)

    def volume_scores(self) -> dict[str, np.ndarray]:
        """``dice`` and ``iou``: (V, C-1) per volume, rows in :attr:`volume_ids` order."""
        counts = np.stack([self._volumes[v].counts for v in self.volume_ids]) if (
            self._volumes) else np.zeros((0, 3, self.num_classes), np.int64)
        return overlap_scores(counts)

    def volume_hd95(self) -> np.ndarray:
        """HD95 in mm: (V, C-1) per volume, rows in :attr:`volume_ids` order."""
        rows = [self._hd95(volume) for volume in self.volume_ids]
        return np.stack(rows) if rows else np.zeros((0, self.num_classes - 1))

    def _hd95(self, volume: str) -> np.ndarray:
        entry = self._volumes[volume]
        positions = sorted(entry.masks)
        if positions[-1] - positions[0] + 1 != len(positions):
            # stacking across a gap would shorten distances along the slice axis
            raise ValueError(f"{volume}: slices {positions} are not contiguous; HD95 "
                             "needs every slice of the volume")
        pred = np.stack([entry.masks[p][0] for p in positions], axis=-1)
        true = np.stack([entry.masks[p][1] for p in positions], axis=-1)
        return hd95_mm(pred, true, self.num_classes, entry.spacing)

    def mean_dice(self) -> float:
        """Volume-level Dice averaged over foreground classes: the validation Dice."""
        return float(nanmean(nanmean(self.volume_scores()["dice"], axis=0)))

    def summary(self, hd95: bool = True) -> dict[str, Any]:
        """Strict-JSON summary: for each metric its ``mean`` over foreground classes,
        ``per_class`` values and ``counted`` samples per class (those with a defined
        value); ``None`` where undefined. ``hd95=False`` skips the costly distances."""
        slices, volumes = self.slice_scores(), self.volume_scores()
        scores = {"slice_dice": slices["dice"], "slice_iou": slices["iou"],
                  "volume_dice": volumes["dice"], "volume_iou": volumes["iou"]}
        if hd95:
            scores["volume_hd95_mm"] = self.volume_hd95()
        result: dict[str, Any] = {"slices": len(self._slice_counts),
                                  "volumes": len(self._volumes)}
        for name, values in scores.items():
            result[name] = self._aggregate(values)
        return result

    def _aggregate(self, values: np.ndarray) -> dict[str, Any]:
        per_class = nanmean(values, axis=0) if len(values) else np.full(
            self.num_classes - 1, np.nan)
        return {
            "mean": json_float(nanmean(per_class)),
            "per_class": {n: json_float(v) for n, v in zip(self.foreground_names, per_class)},
            "counted": {n: int(k) for n, k in zip(self.foreground_names,
                                                   (~np.isnan(values)).sum(axis=0))},
        }


def overlap_counts(prediction: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """(3, C) voxel counts per class: intersection, predicted, true."""
    pred = np.bincount(prediction.ravel(), minlength=num_classes)
    true = np.bincount(target.ravel(), minlength=num_classes)
    both = np.bincount(prediction[prediction == target].ravel(), minlength=num_classes)
    return np.stack([both, pred, true]).astype(np.int64)


def overlap_scores(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Dice and IoU per sample and foreground class from (N, 3, C) counts; NaN where the
    class is absent from the ground truth (MONAI's ``ignore_empty=True``)."""
    inter, pred, true = (counts[:, k, 1:].astype(np.float64) for k in range(3))
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2 * inter / (pred + true)
        iou = inter / (pred + true - inter)
    empty = true == 0
    return {"dice": np.where(empty, np.nan, dice), "iou": np.where(empty, np.nan, iou)}


def hd95_mm(prediction: np.ndarray, target: np.ndarray, num_classes: int,
            spacing: Sequence[float] | np.ndarray) -> np.ndarray:
    """HD95 per foreground class of one (x, y, slice) volume, in mm; NaN where the class
    is missing from the prediction or the ground truth (MONAI's behaviour)."""
    from monai.metrics import compute_hausdorff_distance  # seconds to import: when used

    pred_hot, true_hot = (_one_hot(a, num_classes) for a in (prediction, target))
    with warnings.catch_warnings():
        # MONAI warns for every empty class (expected here: it reads as NaN), and 1.6
        # warns about an argument its own surface-distance code still passes
        warnings.filterwarnings("ignore", message=".*may result in nan/inf distance")
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy",
                                category=FutureWarning)
        distances = compute_hausdorff_distance(
            pred_hot, true_hot, include_background=False, percentile=HD95_PERCENTILE,
            spacing=[float(s) for s in spacing])  # MONAI wants one type for all entries
    return distances[0].double().numpy()


def _one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """(1, C, *spatial) boolean one-hot of a class map, MONAI's layout."""
    hot = torch.from_numpy(labels.astype(np.int64))[None] == torch.arange(num_classes).view(
        num_classes, *([1] * labels.ndim))
    return hot[None]


@overload
def nanmean(values: np.ndarray, axis: None = None) -> np.floating: ...


@overload
def nanmean(values: np.ndarray, axis: int) -> np.ndarray: ...


def nanmean(values: np.ndarray, axis: int | None = None) -> np.floating | np.ndarray:
    """``np.nanmean`` that returns NaN for all-NaN slices without a warning: a scalar
    over all values, an array along ``axis``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def json_float(value: float | np.floating) -> float | None:
    """A float for JSON: ``None`` where undefined, since JSON has no NaN (nor infinity,
    which MONAI's HD95 does not produce with a percentile but a caller might)."""
    value = float(value)
    return value if math.isfinite(value) else None
