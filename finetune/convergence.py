"""Convergence speed of a fine-tuning run, from its per-epoch validation-Dice curve.

Definitions (DESIGN.md, "Metrics"); epoch ``e`` (1-based) is the validation after the
``e``-th training epoch, and ``steps[e-1]`` / ``seconds[e-1]`` are the optimizer steps and
wall-clock seconds taken by then:

- ``best_dice``, ``best_epoch``: the curve's maximum and the first epoch reaching it.
- ``{epochs,steps,seconds}_to_{95,99}pct``: at the first epoch whose Dice is at least
  95% / 99% of ``best_dice`` (always reached, at the latest at ``best_epoch``).
- ``epochs_to_dice``: for each fixed target, keyed ``f"{target:g}"``, the first epoch
  whose Dice is at least the target, or ``None`` when the run never reaches it.
- ``normalised_auc``: the area under the validation-Dice curve normalised by epochs, the
  curve taken as a step function holding epoch ``e``'s Dice over (e-1, e] and integrated
  over [0, E], divided by E. That is the mean per-epoch Dice: in [0, 1], 1.0 only for a
  run perfect from epoch 1, defined for a single epoch, and higher for a run that gets
  good sooner. Comparable between runs with the same number of epochs.

With validation every N epochs (``epochs`` gives the validated epoch numbers) nothing is
interpolated: every "first epoch" is a validated one, and the AUC holds each validated
Dice over the epochs since the previous validation. With every epoch validated the
definitions above are unchanged.

"At least" allows a relative 1e-9 below the threshold, so a Dice equal to 99% of the best
on paper is not missed by float rounding of the product (0.99 * 0.81 > 0.8019).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

FRACTIONS_OF_BEST = (0.95, 0.99)
_RELATIVE_TOLERANCE = 1e-9


def first_reaching(curve: Sequence[float], threshold: float) -> int | None:
    """0-based index of the first value >= threshold (within float rounding), or None."""
    floor = threshold - _RELATIVE_TOLERANCE * abs(threshold)
    for index, value in enumerate(curve):
        if value >= floor:
            return index
    return None


def convergence_metrics(dice: Sequence[float], steps: Sequence[int], seconds: Sequence[float],
                        targets: Sequence[float] = (),
                        epochs: Sequence[int] | None = None) -> dict[str, Any]:
    """The convergence metrics of one run (see the module docstring), JSON-ready.

    ``epochs``: the 1-based epoch of each curve point (default 1, 2, ...: every epoch).
    """
    _check_curve(dice, steps, seconds)
    numbers = list(range(1, len(dice) + 1)) if epochs is None else [int(e) for e in epochs]
    if len(numbers) != len(dice) or any(b <= a for a, b in zip([0, *numbers], numbers)):
        raise ValueError(f"epochs must be increasing positive numbers, one per Dice value; "
                         f"got {numbers} for {len(dice)} values")
    best = max(dice)
    result: dict[str, Any] = {"best_dice": float(best),
                              "best_epoch": numbers[list(dice).index(best)]}
    for fraction in FRACTIONS_OF_BEST:
        tag = f"{round(fraction * 100)}pct"
        index = first_reaching(dice, fraction * best)
        result[f"epochs_to_{tag}"] = None if index is None else numbers[index]
        result[f"steps_to_{tag}"] = None if index is None else int(steps[index])
        result[f"seconds_to_{tag}"] = None if index is None else float(seconds[index])
    result["epochs_to_dice"] = {
        f"{target:g}": (None if (i := first_reaching(dice, target)) is None else numbers[i])
        for target in targets
    }
    held = [b - a for a, b in zip([0, *numbers], numbers)]  # epochs each value stands for
    result["normalised_auc"] = math.fsum(d * h for d, h in zip(dice, held)) / numbers[-1]
    return result


def _check_curve(dice: Sequence[float], steps: Sequence[int], seconds: Sequence[float]) -> None:
    if len(dice) == 0:  # a numpy curve has no truth value
        raise ValueError("convergence metrics need at least one validation epoch")
    if not len(dice) == len(steps) == len(seconds):
        raise ValueError(f"curve lengths differ: {len(dice)} Dice, {len(steps)} steps, "
                         f"{len(seconds)} seconds")
    if any(math.isnan(value) for value in dice):
        # max() and the thresholds would silently depend on where the NaN sits
        raise ValueError("the validation-Dice curve holds NaN (no foreground in the "
                         "validation set?)")
