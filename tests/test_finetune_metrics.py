"""Fine-tuning metrics: equal to MONAI's on the same arrays; convergence by hand."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

from data_prep.segmentation_metrics import SegmentationMetrics
from finetune.convergence import convergence_metrics

NAMES = ["background", "A", "B", "C", "D"]
SPACING = (0.5, 2.0, 5.0)  # (x, y, slice) mm: (H, W, stacked slice) axes


def _one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """(N, *spatial) class maps -> (N, C, *spatial) float, MONAI's input layout."""
    hot = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), num_classes)
    return hot.movedim(-1, 1).float()


def _monai_overlap(pred: np.ndarray, true: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """MONAI's Dice and IoU per sample and foreground class, ``pred`` (N, *spatial)."""
    p, t = _one_hot(pred, num_classes), _one_hot(true, num_classes)
    options = {"include_background": False, "reduction": "none", "ignore_empty": True}
    return {"dice": DiceMetric(**options)(p, t).numpy(), "iou": MeanIoU(**options)(p, t).numpy()}


def _monai_hd95(pred: np.ndarray, true: np.ndarray, num_classes: int,
                spacing: tuple[float, ...]) -> np.ndarray:
    """MONAI's HD95 of one (H, W, D) volume, per foreground class."""
    metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty classes on purpose; MONAI's own deprecations
        values = metric(_one_hot(pred[None], num_classes), _one_hot(true[None], num_classes),
                        spacing=[float(s) for s in spacing])
    return values[0].numpy()


def _class_nanmean(values: np.ndarray) -> tuple[np.ndarray, float]:
    """The documented aggregation, applied to MONAI's reduction="none" output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN classes stay NaN
        per_class = np.nanmean(values, axis=0)
        return per_class, float(np.nanmean(per_class))


def _fixed_volumes() -> dict[str, np.ndarray]:
    """Two volumes with hand-known scores, as (slices, H, W) pred and true maps.

    Volume "a" (slices 0 and 1): A: 2 true voxels along H, 1 predicted -> Dice 2/3,
    IoU 1/2, HD95 = 95th percentile of edge distances {0} and {0, 0.5 mm} = 0.475 mm.
    B: one voxel predicted one step along W -> Dice 0, HD95 2.0 mm. C: one voxel predicted
    on the next slice -> Dice 0, HD95 5.0 mm. D: absent everywhere -> undefined.
    Volume "b" (slice 7 alone): A absent from both, B predicted only (Dice NaN: empty
    ground truth), C true only (Dice 0, HD95 NaN: MONAI's value for an empty prediction).
    """
    a_pred, a_true = np.zeros((2, 2, 4, 4), np.int64)
    a_true[0, 0, 0] = a_true[0, 1, 0] = a_pred[0, 0, 0] = 1
    a_true[0, 3, 0], a_pred[0, 3, 1] = 2, 2
    a_true[0, 3, 3], a_pred[1, 3, 3] = 3, 3
    b_pred, b_true = np.zeros((2, 1, 4, 4), np.int64)
    b_pred[0, 1, 1] = 2
    b_true[0, 2, 2] = 3
    return {"a_pred": a_pred, "a_true": a_true, "b_pred": b_pred, "b_true": b_true}


def _fed_fixed_metrics() -> SegmentationMetrics:
    v = _fixed_volumes()
    metrics = SegmentationMetrics(5, NAMES)
    spacing = np.array([SPACING])
    # slices out of order, and the two volumes interleaved
    metrics.update(v["a_pred"][1:], v["a_true"][1:], ["a"], [1], spacing)
    metrics.update(v["b_pred"], v["b_true"], ["b"], [7], spacing)
    metrics.update(v["a_pred"][:1], v["a_true"][:1], ["a"], [0], spacing)
    return metrics


def test_fixed_volumes_give_hand_known_scores() -> None:
    metrics, nan = _fed_fixed_metrics(), np.nan
    volumes = metrics.volume_scores()
    assert metrics.volume_ids == ["a", "b"]
    np.testing.assert_allclose(volumes["dice"], [[2 / 3, 0, 0, nan], [nan, nan, 0, nan]])
    np.testing.assert_allclose(volumes["iou"], [[1 / 2, 0, 0, nan], [nan, nan, 0, nan]])
    np.testing.assert_allclose(metrics.volume_hd95(), [[0.475, 2.0, 5.0, nan], [nan] * 4],
                               rtol=1e-6)
    # slices in update order: a1 (C true nowhere there), b7, a0
    np.testing.assert_allclose(metrics.slice_scores()["dice"],
                               [[nan] * 4, [nan, nan, 0, nan], [2 / 3, 0, 0, nan]])
    summary = metrics.summary()
    json.dumps(summary, allow_nan=False)  # strict JSON
    assert summary["slices"] == 3 and summary["volumes"] == 2
    assert summary["volume_dice"]["per_class"] == pytest.approx(
        {"A": 2 / 3, "B": 0.0, "C": 0.0, "D": None})
    assert summary["volume_dice"]["mean"] == pytest.approx(2 / 9)
    assert summary["volume_dice"]["counted"] == {"A": 1, "B": 1, "C": 2, "D": 0}
    assert summary["volume_iou"]["mean"] == pytest.approx(1 / 6)
    assert summary["slice_dice"]["counted"] == {"A": 1, "B": 1, "C": 2, "D": 0}
    assert summary["volume_hd95_mm"]["per_class"] == pytest.approx(
        {"A": 0.475, "B": 2.0, "C": 5.0, "D": None})
    assert summary["volume_hd95_mm"]["mean"] == pytest.approx(7.475 / 3)
    assert summary["volume_hd95_mm"]["counted"] == {"A": 1, "B": 1, "C": 1, "D": 0}
    assert metrics.mean_dice() == pytest.approx(2 / 9)
    assert "volume_hd95_mm" not in metrics.summary(hd95=False)


def test_fixed_volumes_equal_monai() -> None:
    metrics, v = _fed_fixed_metrics(), _fixed_volumes()
    for row, name in enumerate(metrics.volume_ids):
        pred, true = v[f"{name}_pred"].transpose(1, 2, 0), v[f"{name}_true"].transpose(1, 2, 0)
        expected = _monai_overlap(pred[None], true[None], 5)
        for key in ("dice", "iou"):
            np.testing.assert_allclose(metrics.volume_scores()[key][row], expected[key][0],
                                       rtol=1e-6)
        np.testing.assert_allclose(metrics.volume_hd95()[row],
                                   _monai_hd95(pred, true, 5, SPACING), rtol=1e-6)


def _random_volume(rng: np.random.Generator, num_classes: int, index: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(slices, H, W) pred and true maps: blocky labels, some classes emptied."""
    slices = int(rng.integers(1, 6))
    coarse = rng.integers(0, num_classes, size=(slices, 4, 5))
    true = coarse.repeat(3, axis=1).repeat(3, axis=2)  # blobs give real surfaces
    noise = rng.integers(0, num_classes, size=true.shape)
    pred = np.where(rng.random(true.shape) < 0.8, true, noise)
    if index == 1:
        true[true == 2] = 0  # empty in the ground truth only
    if index == 2:
        pred[pred == 3] = 0  # empty in the prediction only
    if index == 3:
        pred[pred == 1] = true[true == 1] = 0  # empty in both
    return pred, true


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_volumes_equal_monai(seed: int) -> None:
    rng, num_classes = np.random.default_rng(seed), 4
    volumes = {f"patient{v:03d}_frame01": _random_volume(rng, num_classes, v) for v in range(5)}
    spacings = {name: rng.uniform(0.3, 8.0, size=3) for name in volumes}
    slices = [(name, z) for name, (pred, _) in volumes.items() for z in range(len(pred))]
    order = rng.permutation(len(slices))
    metrics = SegmentationMetrics(num_classes)
    for batch in np.array_split(order, 4):  # shuffled batches spanning volumes
        chosen = [slices[i] for i in batch]
        metrics.update(np.stack([volumes[n][0][z] for n, z in chosen]),
                       np.stack([volumes[n][1][z] for n, z in chosen]),
                       [n for n, _ in chosen], [z for _, z in chosen],
                       np.stack([spacings[n] for n, _ in chosen]))

    fed = [slices[i] for i in order]
    expected_slices = _monai_overlap(np.stack([volumes[n][0][z] for n, z in fed]),
                                     np.stack([volumes[n][1][z] for n, z in fed]), num_classes)
    expected_volumes: dict[str, list[np.ndarray]] = {"dice": [], "iou": [], "hd95": []}
    for name in metrics.volume_ids:
        pred, true = (a.transpose(1, 2, 0) for a in volumes[name])  # slices stack last
        for key, value in _monai_overlap(pred[None], true[None], num_classes).items():
            expected_volumes[key].append(value[0])
        expected_volumes["hd95"].append(
            _monai_hd95(pred, true, num_classes, tuple(spacings[name])))

    ours = {**{f"slice_{k}": v for k, v in metrics.slice_scores().items()},
            **{f"volume_{k}": v for k, v in metrics.volume_scores().items()},
            "volume_hd95_mm": metrics.volume_hd95()}
    theirs = {**{f"slice_{k}": v for k, v in expected_slices.items()},
              "volume_dice": np.stack(expected_volumes["dice"]),
              "volume_iou": np.stack(expected_volumes["iou"]),
              "volume_hd95_mm": np.stack(expected_volumes["hd95"])}
    summary = metrics.summary()
    for key, expected in theirs.items():
        np.testing.assert_allclose(ours[key], expected, rtol=1e-6, equal_nan=True, err_msg=key)
        per_class, mean = _class_nanmean(expected)
        got = summary[key]["per_class"]
        np.testing.assert_allclose([np.nan if got[n] is None else got[n] for n in got],
                                   per_class, rtol=1e-6, err_msg=key)
        assert summary[key]["mean"] == pytest.approx(mean, rel=1e-6), key
    assert np.isnan(ours["volume_dice"][1, 1]) and np.isnan(ours["volume_hd95_mm"][2, 2])
    assert metrics.mean_dice() == pytest.approx(summary["volume_dice"]["mean"])


def test_anisotropic_spacing_follows_the_store_axes() -> None:
    """H is x (spacing[0]), W is y (spacing[1]), stacked slices use spacing[2]."""
    for axis, expected in ((1, 0.5), (2, 2.0), (0, 5.0)):  # axes of (slice, H, W) maps
        pred, true = np.zeros((2, 3, 3, 3), np.int64)
        true[1, 1, 1] = 1
        moved = [1, 1, 1]
        moved[axis] = 2
        pred[tuple(moved)] = 1  # the one voxel, one step along ``axis``
        metrics = SegmentationMetrics(2)
        metrics.update(pred, true, ["v"] * 3, [0, 1, 2], np.array([SPACING] * 3))
        assert metrics.volume_hd95()[0, 0] == pytest.approx(expected), axis


def test_inconsistent_input_is_refused() -> None:
    spacing = np.array([SPACING])
    one = np.zeros((1, 2, 2), np.int64)
    with pytest.raises(ValueError, match="5 class names for 4 classes"):
        SegmentationMetrics(4, NAMES)
    metrics = SegmentationMetrics(3)
    with pytest.raises(ValueError, match="class ids outside"):
        metrics.update(one + 3, one, ["v"], [0], spacing)
    metrics.update(one, one, ["v"], [0], spacing)
    with pytest.raises(ValueError, match="slice 0 of v was added twice"):
        metrics.update(one, one, ["v"], [0], spacing)
    with pytest.raises(ValueError, match="spacing"):
        metrics.update(one, one, ["v"], [1], spacing * 2)
    metrics.update(one, one, ["v"], [2], spacing)
    with pytest.raises(ValueError, match=r"slices \[0, 2\] are not contiguous"):
        metrics.volume_hd95()
    assert np.isnan(SegmentationMetrics(3).mean_dice())


def test_convergence_metrics_on_a_known_curve() -> None:
    curve = [0.1, 0.5, 0.78, 0.8, 0.79, 0.8]
    result = convergence_metrics(curve, steps=[10, 20, 30, 40, 50, 60],
                                 seconds=[1.5, 2.5, 3.5, 4.5, 5.5, 6.5], targets=[0.5, 0.9])
    assert result == {
        "best_dice": 0.8, "best_epoch": 4,  # the first of the tied best epochs
        "epochs_to_95pct": 3, "steps_to_95pct": 30, "seconds_to_95pct": 3.5,  # 0.78 >= 0.76
        "epochs_to_99pct": 4, "steps_to_99pct": 40, "seconds_to_99pct": 4.5,  # 0.79 < 0.792
        "epochs_to_dice": {"0.5": 2, "0.9": None},  # 0.5 reached exactly; 0.9 never
        "normalised_auc": pytest.approx(3.77 / 6),  # mean per-epoch Dice
    }


def test_convergence_thresholds_survive_float_rounding() -> None:
    # 0.99 * 0.81 is 0.8019000000000001 in floats: 0.8019 must still count as reached
    result = convergence_metrics([0.5, 0.8019, 0.81], [1, 2, 3], [1.0, 2.0, 3.0], [0.81])
    assert result["epochs_to_99pct"] == 2 and result["epochs_to_dice"] == {"0.81": 3}


def test_convergence_of_a_single_epoch() -> None:
    result = convergence_metrics([0.42], [17], [9.0], targets=[0.4, 0.5])
    assert result["best_epoch"] == result["epochs_to_95pct"] == result["epochs_to_99pct"] == 1
    assert result["steps_to_99pct"] == 17 and result["seconds_to_95pct"] == 9.0
    assert result["epochs_to_dice"] == {"0.4": 1, "0.5": None}
    assert result["normalised_auc"] == 0.42


def test_convergence_refuses_bad_curves() -> None:
    with pytest.raises(ValueError, match="at least one validation epoch"):
        convergence_metrics([], [], [])
    with pytest.raises(ValueError, match="lengths differ"):
        convergence_metrics([0.1, 0.2], [1], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        convergence_metrics([0.1, float("nan")], [1, 2], [1.0, 2.0])
