"""Headline findings in sentences, generated from the report's tables.

A sentence claims a difference only where the paired test supports it (Holm-adjusted
p below alpha); everything else is stated as what it is: descriptive figures without a
test, bounds, or comparisons with too few seeds to test at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd

from finetune.report_figures import amount
from finetune.report_stats import ESTIMATE, LOWER_BOUND, UPPER_BOUND


def _p(value: float) -> str:
    return f"p = {value:.2g}" if value >= 0.001 else "p < 0.001"


def _budgets(rows: list[str]) -> str:
    return rows[0] if len(rows) == 1 else ", ".join(rows[:-1]) + " and " + rows[-1]


_LISTED = 3  # more supported budgets than this are summarised as a range


def speed_findings(tests: pd.DataFrame, speedups: pd.DataFrame, baseline: str,
                   unit: str) -> list[str]:
    """``tests``: paired tests on epochs_to_95pct; ``speedups``: epoch ratios."""
    ratios = speedups.set_index(["init", "budget"])

    def span(init: str, chosen: pd.DataFrame) -> str:
        found = ratios.loc[[(init, b) for b in chosen["budget"]], "median_ratio"]
        return f"speed-up {found.min():.1f}x–{found.max():.1f}x"

    def one(init: str, row: Any) -> str:
        return _ratio_text(ratios.loc[(init, row.budget)])

    # fewer epochs than the baseline (a negative difference) is faster
    return [f"**{init}** reaches 95% of its best validation Dice {direction} than {baseline} "
            f"at {where}." for init, direction, where in _claims(
                tests, unit, (("faster", -1), ("slower", 1)), span, one)]


def _claims(tests: pd.DataFrame, unit: str, directions: tuple[tuple[str, int], ...],
            span: Callable[[str, pd.DataFrame], str],
            one: Callable[[str, Any], str]) -> Iterator[tuple[str, str, str]]:
    """(init, direction, where) for every init and direction of difference the tests
    support; ``where`` lists the budgets, or summarises them as a range (``span``) when
    there are more than a few."""
    for init, rows in tests[tests["significant"]].groupby("init", sort=True):
        for direction, sign in directions:
            chosen = rows[np.sign(rows["median_difference"]) == sign].sort_values("budget")
            if chosen.empty:
                continue
            if len(chosen) > _LISTED:
                where = _range_text(chosen, tests, init, unit, span(init, chosen))
            else:
                where = _budgets([f"{amount(row.budget, unit)} ({one(init, row)}; "
                                  f"{_p(row.p_holm)}, {row.n_pairs} pairs)"
                                  for row in chosen.itertuples()])
            yield init, direction, where


def _range_text(chosen: pd.DataFrame, tests: pd.DataFrame, init: str, unit: str,
                effect: str) -> str:
    """'8 of 10 budgets (1–1498 slices; <effect>, p <= 0.02, 10 pairs each)'."""
    budgets = chosen["budget"]
    total = int((tests["init"] == init).sum())
    pairs = sorted(set(chosen["n_pairs"]))
    pairs_text = f"{pairs[0]} pairs each" if len(pairs) == 1 else \
        f"{pairs[0]}–{pairs[-1]} pairs"
    return (f"{len(chosen)} of {total} budgets ({budgets.min()}–{budgets.max()} {unit}; "
            f"{effect}; Holm-adjusted p ≤ {chosen['p_holm'].max():.2g}, {pairs_text}; "
            "per budget in the tables below)")


def _ratio_text(ratio: pd.Series) -> str:
    median, low, high = ratio["median_ratio"], ratio["ci_low"], ratio["ci_high"]
    if not math.isfinite(median):
        return "ratio undefined"
    interval = f", interval {low:.1f}–{high:.1f}" if math.isfinite(low) else ""
    return f"speed-up {median:.1f}x{interval}"


def accuracy_findings(tests: pd.DataFrame, baseline: str, unit: str) -> list[str]:
    """``tests``: paired tests on test_dice."""

    def span(init: str, chosen: pd.DataFrame) -> str:
        differences = chosen["median_difference"]
        return f"median difference {differences.min():+.3f} to {differences.max():+.3f}"

    def one(init: str, row: Any) -> str:
        return f"median {row.median_difference:+.3f}"

    return [f"**{init}** has a {direction} test Dice than {baseline} at {where}."
            for init, direction, where in _claims(
                tests, unit, (("higher", 1), ("lower", -1)), span, one)]


def untested_findings(tests: pd.DataFrame, baseline: str, alpha: float) -> list[str]:
    """What the tests could not show, so that silence is not read as 'no difference'."""
    sentences = []
    untestable = tests[~tests["testable"]]
    if len(untestable):
        sentences.append(
            f"{len(untestable)} of {len(tests)} comparisons with {baseline} could not be "
            f"tested: a Wilcoxon signed-rank test cannot reach p < {alpha:g} with fewer than "
            "6 differing pairs (seeds); their differences are shown but not claimed.")
    testable = tests[tests["testable"]]
    if len(testable) and not testable["significant"].any():
        sentences.append(f"None of the {len(testable)} tested comparisons with {baseline} "
                         f"shows a difference at α = {alpha:g} after Holm's correction.")
    return sentences


def label_findings(table: pd.DataFrame, baseline: str, unit: str) -> list[str]:
    """Labels needed to reach each target, from the mean budget curves (no test)."""
    sentences = []
    for row in table[table["init"] != baseline].sort_values(["init", "target"]).itertuples():
        target = f"{row.target:.2f} test Dice"
        if row.ratio_kind == ESTIMATE and math.isfinite(row.ratio):
            direction = "fewer" if row.ratio >= 1 else "more"
            factor = row.ratio if row.ratio >= 1 else 1 / row.ratio
            sentences.append(f"**{row.init}** needs {factor:.1f}x {direction} labels than "
                             f"{baseline} to reach {target} ({row.labels:.0f} vs "
                             f"{row.baseline_labels:.0f} {unit}).")
        elif row.ratio_kind in (LOWER_BOUND, UPPER_BOUND) and math.isfinite(row.ratio):
            sentences.append(f"**{row.init}** needs {_bound_text(row.ratio, row.ratio_kind)} "
                             f"labels than {baseline} to reach {target} ({row.status} for "
                             f"{row.init}; {row.baseline_status} for {baseline}).")
    if sentences:
        sentences.append("Label counts are read off the mean test-Dice curves (interpolated "
                         "on the log-budget axis): descriptive figures, not tested.")
    return sentences


def _bound_text(ratio: float, kind: str) -> str:
    """A bound on ratio = baseline's labels / init's labels, in words: a lower bound on the
    ratio is "at least r x fewer" (r >= 1) or "at most 1/r x more" (r < 1)."""
    at_least = kind == LOWER_BOUND
    if ratio >= 1:
        return f"{'at least' if at_least else 'at most'} {ratio:.1f}x fewer"
    return f"{'at most' if at_least else 'at least'} {1 / ratio:.1f}x more"


def pretraining_findings(table: pd.DataFrame, unit: str) -> list[str]:
    """The range of downstream Dice across pretraining lengths, per series and budget."""
    sentences = []
    for (series, budget), rows in table.groupby(["series", "budget"], sort=True):
        rows = rows.sort_values("pretrain_epochs")
        best = rows.loc[rows["test_dice_mean"].idxmax()]
        sentences.append(
            f"**{series}** at {amount(budget, unit)}: mean test Dice "
            f"{rows['test_dice_mean'].min():.3f}–{rows['test_dice_mean'].max():.3f} across "
            f"{len(rows)} pretraining lengths "
            f"({int(rows['pretrain_epochs'].min())}–{int(rows['pretrain_epochs'].max())} "
            f"epochs), highest after {int(best['pretrain_epochs'])} (no trend test).")
    return sentences


def probe_findings(table: pd.DataFrame, unit: str) -> list[str]:
    """Whether the live probe ranks the kept checkpoints as fine-tuning does."""
    sentences = []
    for row in table.itertuples():
        if math.isnan(row.spearman):
            continue
        sentences.append(
            f"The live probe of **{row.series}** ranks its {row.n} kept checkpoints "
            f"{'as' if row.spearman > 0 else 'against how'} fine-tuning at "
            f"{amount(row.budget, unit)} does: Spearman ρ = {row.spearman:.2f} "
            f"(p = {row.p_value:.2g}).")
    return sentences
