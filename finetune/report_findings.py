"""Headline findings in sentences, generated from the report's tables.

A sentence claims a difference only where the paired test supports it (Holm-adjusted
p below alpha); everything else is stated as what it is: descriptive figures without a
test, bounds, or comparisons with too few seeds to test at all.
"""

from __future__ import annotations

import math

import pandas as pd

from finetune.report_stats import ESTIMATE, LOWER_BOUND, UPPER_BOUND


def _p(value: float) -> str:
    return f"p = {value:.2g}" if value >= 0.001 else "p < 0.001"


def _budgets(rows: list[str]) -> str:
    return rows[0] if len(rows) == 1 else ", ".join(rows[:-1]) + " and " + rows[-1]


def speed_findings(tests: pd.DataFrame, speedups: pd.DataFrame, baseline: str,
                   unit: str) -> list[str]:
    """``tests``: paired tests on epochs_to_95pct; ``speedups``: epoch ratios."""
    sentences = []
    ratios = speedups.set_index(["init", "budget"])
    for init, rows in tests[tests["significant"]].groupby("init", sort=True):
        faster, slower = [], []
        for row in rows.sort_values("budget").itertuples():
            ratio = ratios.loc[(init, row.budget)]
            text = (f"{row.budget} {unit} ({_ratio_text(ratio)}; {_p(row.p_holm)}, "
                    f"{row.n_pairs} pairs)")
            (faster if row.median_difference < 0 else slower).append(text)
        if faster:
            sentences.append(f"**{init}** reaches 95% of its best validation Dice faster than "
                             f"{baseline} at {_budgets(faster)}.")
        if slower:
            sentences.append(f"**{init}** reaches 95% of its best validation Dice slower than "
                             f"{baseline} at {_budgets(slower)}.")
    return sentences


def _ratio_text(ratio: pd.Series) -> str:
    median, low, high = ratio["median_ratio"], ratio["ci_low"], ratio["ci_high"]
    if not math.isfinite(median):
        return "ratio undefined"
    interval = f" ({low:.1f}–{high:.1f})" if math.isfinite(low) else ""
    return f"{median:.1f}x{interval} the speed"


def accuracy_findings(tests: pd.DataFrame, baseline: str, unit: str) -> list[str]:
    """``tests``: paired tests on test_dice."""
    sentences = []
    for init, rows in tests[tests["significant"]].groupby("init", sort=True):
        higher, lower = [], []
        for row in rows.sort_values("budget").itertuples():
            text = (f"{row.budget} {unit} (median {row.median_difference:+.3f}; "
                    f"{_p(row.p_holm)}, {row.n_pairs} pairs)")
            (higher if row.median_difference > 0 else lower).append(text)
        if higher:
            sentences.append(f"**{init}** has a higher test Dice than {baseline} at "
                             f"{_budgets(higher)}.")
        if lower:
            sentences.append(f"**{init}** has a lower test Dice than {baseline} at "
                             f"{_budgets(lower)}.")
    return sentences


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
            f"**{series}** at {budget} {unit}: mean test Dice "
            f"{rows['test_dice_mean'].min():.3f}–{rows['test_dice_mean'].max():.3f} across "
            f"{len(rows)} pretraining lengths "
            f"({int(rows['pretrain_epochs'].min())}–{int(rows['pretrain_epochs'].max())} "
            f"epochs), highest after {int(best['pretrain_epochs'])} (no trend test).")
    return sentences
