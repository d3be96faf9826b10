"""Convergence speed of a fine-tuning run, from its per-epoch validation-Dice curve."""

from __future__ import annotations

from collections.abc import Sequence


def first_reaching(curve: Sequence[float], threshold: float) -> int | None:
    """0-based index of the first value >= threshold, or None."""
    for index, value in enumerate(curve):
        if value >= threshold:
            return index
    return None


def convergence_metrics(dice: Sequence[float], steps: Sequence[int], seconds: Sequence[float],
                        targets: Sequence[float] = ()) -> dict[str, object]:
    """Epochs (1-based), optimizer steps and seconds to first reach 95% / 99% of the best
    validation Dice; epochs to reach each fixed target; the curve's area normalised by
    epochs (the mean per-epoch Dice, 1.0 for a run that is perfect from epoch 1)."""
    if not dice:
        raise ValueError("convergence metrics need at least one validation epoch")
    best = max(dice)
    result: dict[str, object] = {"best_dice": best, "best_epoch": dice.index(best) + 1}
    for fraction in (0.95, 0.99):
        tag = f"{round(fraction * 100)}"
        index = first_reaching(dice, fraction * best)
        result[f"epochs_to_{tag}pct"] = None if index is None else index + 1
        result[f"steps_to_{tag}pct"] = None if index is None else steps[index]
        result[f"seconds_to_{tag}pct"] = None if index is None else seconds[index]
    result["epochs_to_dice"] = {
        f"{target:g}": (None if (i := first_reaching(dice, target)) is None else i + 1)
        for target in targets
    }
    result["normalised_auc"] = sum(dice) / len(dice)
    return result
