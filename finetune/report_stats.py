"""The study report's statistics: pure functions over a table of fine-tuning runs.

Input everywhere is ``runs``, a DataFrame with one row per complete fine-tuning run:
``init``, ``budget``, ``seed``, ``budget_unit``, ``pretrain_epochs`` (NaN unless the init
is one epoch of a pretraining series named ``"<series>-epNNNN"``), the test metrics
(``test_dice``, ``test_iou``, ``test_hd95_mm`` and per class ``test_dice_<CLASS>`` ...)
and the convergence metrics of ``finetune.convergence`` flattened into columns
(``epochs_to_95pct`` ..., ``epochs_to_dice_<TARGET>``, ``normalised_auc``). NaN marks a
value that is undefined for that run (an empty class's HD95, a Dice target never reached).

A report must never state a difference the data do not support, so:

- every mean comes with a percentile-bootstrap interval over seeds and its ``n``;
- comparisons against the baseline initialisation are paired by seed (same seed = same
  label subset, so the pair shares its data and only the initialisation differs);
- paired tests are Wilcoxon signed-rank tests with Holm's correction over the family of
  comparisons, and a comparison whose number of pairs cannot produce p < alpha is marked
  untestable instead of getting a p-value that only looks like evidence;
- label-efficiency ratios that rest on a budget curve that never crosses the target (or
  crosses it before the smallest budget) are reported as bounds, not as estimates.

Functions return new DataFrames and never modify ``runs``. Bootstraps are vectorised with
numpy and seeded, so a report built twice from the same runs has the same numbers.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import stats

Statistic = Literal["mean", "median"]

DEFAULT_BASELINE = "random"
DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 10_000
DEFAULT_ALPHA = 0.05

RUN_KEY = ("init", "budget", "seed")
CONVERGENCE_COLUMNS = (
    "best_dice", "best_epoch",
    "epochs_to_95pct", "steps_to_95pct", "seconds_to_95pct",
    "epochs_to_99pct", "steps_to_99pct", "seconds_to_99pct",
    "normalised_auc",
)
DICE_TARGET_PREFIX = "epochs_to_dice_"

# labels_to_reach statuses
INTERPOLATED = "interpolated"
AT_SMALLEST = "at or below the smallest budget"
NOT_REACHED = "not reached"
NO_DATA = "no data"

# label-efficiency ratio kinds
ESTIMATE = "estimate"
LOWER_BOUND = "lower bound"
UPPER_BOUND = "upper bound"
UNDEFINED = "undefined"
BASELINE = "baseline"

# Wilcoxon p-value methods (paired_tests' ``method`` column)
EXACT = "exact"
EXACT_WITH_TIES = "exact sign-flip enumeration (ties)"
NORMAL = "normal approximation"

_MAX_EXACT_PAIRS = 50  # scipy's exact null distribution, no ties: cheap up to here
_MAX_ENUMERATED_PAIRS = 16  # with ties: enumerate all 2**n sign flips up to here
_CHUNK_FLOATS = 4_000_000  # floats per resampling chunk (32 MB): bounds bootstrap memory
_SERIES_MEMBER = re.compile(r"^(?P<series>.+)-ep(?P<epochs>\d+)$")


# --- columns --------------------------------------------------------------------------


def accuracy_columns(runs: pd.DataFrame) -> list[str]:
    """Every test-set metric column (``test_*``: means and per class), in the frame's order.

    Not named ``test_...``: pytest would collect it as a test wherever it is imported.
    """
    return [c for c in runs.columns if str(c).startswith("test_")]


def convergence_columns(runs: pd.DataFrame) -> list[str]:
    """The convergence columns present: fixed ones first, then Dice targets ascending."""
    fixed = [c for c in CONVERGENCE_COLUMNS if c in runs.columns]
    targets = [c for c in runs.columns if str(c).startswith(DICE_TARGET_PREFIX)]
    return fixed + sorted(targets, key=lambda c: float(c[len(DICE_TARGET_PREFIX):]))


def pretraining_series(init: str) -> str:
    """The series an init belongs to: ``"byol-acdc-ep0005"`` -> ``"byol-acdc"``.

    An init that does not follow the ``-epNNNN`` naming is its own series.
    """
    match = _SERIES_MEMBER.match(init)
    return match.group("series") if match else init


def pretraining_epochs(init: str) -> float:
    """The pretraining epochs of a series member (``"byol-acdc-ep0005"`` -> 5.0), NaN for
    any other init."""
    match = _SERIES_MEMBER.match(init)
    return float(match.group("epochs")) if match else float("nan")


# --- bootstrap ------------------------------------------------------------------------


def bootstrap_interval(values: npt.ArrayLike, statistic: Statistic = "mean",
                       confidence: float = DEFAULT_CONFIDENCE,
                       resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean (or median) of ``values``.

    Non-finite values (NaN marks "undefined for this run") are dropped first. With fewer
    than two values the interval is (NaN, NaN): every resample of one value is that value,
    so the bootstrap would return a zero-width interval, claiming a certainty that one run
    cannot give. The interval is the (1-confidence)/2 and (1+confidence)/2 quantiles
    (numpy's linear interpolation) of the statistic over ``resamples`` resamples drawn
    with replacement by ``numpy.random.default_rng(seed)``.

    With few values (10 seeds) a percentile interval is somewhat too narrow, for the
    median more so (it can only take a handful of values); read it as a description of
    the spread over seeds, and use ``paired_tests`` for claims of a difference.
    """
    low, high = bootstrap_intervals([values], statistic, confidence, resamples, seed)[0]
    return float(low), float(high)


def bootstrap_intervals(samples: Sequence[npt.ArrayLike], statistic: Statistic = "mean",
                        confidence: float = DEFAULT_CONFIDENCE,
                        resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """``bootstrap_interval`` of many samples at once: a (len(samples), 2) array.

    Samples of equal size share one resampling-index matrix drawn from a fresh
    ``default_rng(seed)``, so an interval depends only on its own values, ``resamples``
    and ``seed`` (not on what else is computed in the same call): a table's entry equals
    ``bootstrap_interval`` of the same values, up to float rounding. Sharing indices
    correlates the Monte Carlo error between cells, which no single interval is affected by.
    """
    _check_bootstrap_arguments(statistic, confidence, resamples)
    clean = [_finite(sample) for sample in samples]
    intervals = np.full((len(clean), 2), np.nan)
    quantiles = [(1 - confidence) / 2, (1 + confidence) / 2]
    for size, rows in _rows_by_size(clean).items():
        if size < 2:
            continue
        indices = np.random.default_rng(seed).integers(0, size, size=(resamples, size))
        counts = _counts(indices, size)
        for chunk in _chunks(rows, _chunk_width(statistic, resamples, size)):
            values = np.stack([clean[row] for row in chunk], axis=1)  # (size, k)
            replicates = (_resampled_means(values, counts) if statistic == "mean"
                          else _resampled_medians(values, counts))
            intervals[chunk] = np.quantile(replicates, quantiles, axis=1).T
    return intervals


def _check_bootstrap_arguments(statistic: str, confidence: float, resamples: int) -> None:
    if statistic not in ("mean", "median"):
        raise ValueError(f"statistic must be 'mean' or 'median', not {statistic!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), not {confidence}")
    if int(resamples) != resamples or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, not {resamples}")


def _finite(values: npt.ArrayLike) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    return array[np.isfinite(array)]


def _rows_by_size(samples: Sequence[np.ndarray]) -> dict[int, list[int]]:
    rows: dict[int, list[int]] = defaultdict(list)
    for row, sample in enumerate(samples):
        rows[sample.size].append(row)
    return rows


def _counts(indices: np.ndarray, size: int) -> np.ndarray:
    """How often each value is drawn in each resample: (resamples, size) integers."""
    resamples = indices.shape[0]
    flat = (indices + size * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * size).reshape(resamples, size)


def _resampled_means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Means of ``values`` (size, k) under each resample's counts: (k, resamples).

    A count-weighted sum is one matrix product, much cheaper than gathering the resamples.
    """
    return values.T @ counts.T.astype(float) / values.shape[0]


def _resampled_medians(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Medians of ``values`` (size, k) under each resample's counts: (k, resamples).

    With the values sorted, a resample's two middle elements are where its cumulative
    counts first pass the middle positions: no per-resample sort needed.
    """
    size, width = values.shape
    order = np.argsort(values, axis=0)
    ordered = np.take_along_axis(values, order, axis=0)
    cumulative = counts[:, order.T].cumsum(axis=2)  # (resamples, k, size)
    low = (cumulative > (size - 1) // 2).argmax(axis=2)
    high = (cumulative > size // 2).argmax(axis=2)
    columns = np.arange(width)
    return ((ordered[low, columns] + ordered[high, columns]) / 2).T


def _chunk_width(statistic: str, resamples: int, size: int) -> int:
    per_sample = resamples * (1 if statistic == "mean" else size)
    return max(1, _CHUNK_FLOATS // per_sample)


def _chunks(rows: list[int], width: int) -> Iterator[list[int]]:
    for start in range(0, len(rows), width):
        yield rows[start:start + width]


# --- per-group summaries --------------------------------------------------------------


def summary_table(runs: pd.DataFrame, columns: Iterable[str],
                  by: Sequence[str] = ("init", "budget"),
                  confidence: float = DEFAULT_CONFIDENCE, resamples: int = DEFAULT_RESAMPLES,
                  seed: int = 0) -> pd.DataFrame:
    """Mean, spread and bootstrap interval of each metric per group, in long format.

    One row per (group, metric), groups sorted, metrics in the given order, with columns
    ``*by, metric, mean, std, ci_low, ci_high, n, n_runs``: ``n`` counts the runs where
    the metric is defined (finite), ``n_runs`` all runs of the group. ``std`` is the
    sample standard deviation (ddof=1), NaN for n < 2; the interval is
    ``bootstrap_interval`` of the mean (NaN for n < 2).

    Where NaN means "never happened" (``epochs_to_dice_<T>`` of a run that never reached
    T) the mean is over the runs that did, a conditional mean: report it with n/n_runs.
    Use for the test metrics (``accuracy_columns``) and the convergence metrics
    (``convergence_columns``); the per-run convergence table is those columns of ``runs``.
    """
    by, columns = list(by), list(columns)
    _require_columns(runs, [*by, *columns])
    _check_single_budget_unit(runs)
    records, samples = [], []
    for key, group in runs.groupby(by, sort=True):
        block = group[columns].to_numpy(dtype=float)
        for position, metric in enumerate(columns):
            values = _finite(block[:, position])
            samples.append(values)
            records.append({**dict(zip(by, key)), "metric": metric, **_mean_std(values),
                            "n": values.size, "n_runs": len(group)})
    table = pd.DataFrame.from_records(
        records, columns=[*by, "metric", "mean", "std", "n", "n_runs"])
    intervals = bootstrap_intervals(samples, "mean", confidence, resamples, seed)
    table.insert(len(by) + 3, "ci_low", intervals[:, 0])
    table.insert(len(by) + 4, "ci_high", intervals[:, 1])
    return table


def _mean_std(values: np.ndarray) -> dict[str, float]:
    mean = float(values.mean()) if values.size else math.nan
    std = float(values.std(ddof=1)) if values.size > 1 else math.nan
    return {"mean": mean, "std": std}


# --- speed-up -------------------------------------------------------------------------


def speedup_table(runs: pd.DataFrame, baseline: str = DEFAULT_BASELINE,
                  measure: str = "epochs_to_95pct", confidence: float = DEFAULT_CONFIDENCE,
                  resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """How many times faster each init converges than the baseline, per budget, by seed.

    For each (init != baseline, budget), the pairs are the seeds run with both inits whose
    ``measure`` is finite and > 0 for both (a ratio of zero or undefined lengths means
    nothing). Each pair's ratio is baseline / init: > 1 means the init needs fewer epochs
    (or steps, with ``measure="steps_to_95pct"``). Columns ``init, budget, measure,
    n_pairs, median_ratio, ci_low, ci_high``: the median over pairs (robust to the odd
    slow run) and ``bootstrap_interval`` of the median (NaN for fewer than 2 pairs).

    The interval describes the spread; to claim "faster", test the same measure with
    ``paired_tests(runs, baseline, metric=measure)``.
    """
    paired = _paired_values(runs, baseline, measure)
    records, samples = [], []
    for init, budget in _comparisons(runs, baseline):
        base, other = _pair(paired, baseline, init, budget)
        usable = (base > 0) & (other > 0)
        ratios = base[usable] / other[usable]
        samples.append(ratios)
        records.append({"init": init, "budget": budget, "measure": measure,
                        "n_pairs": ratios.size,
                        "median_ratio": float(np.median(ratios)) if ratios.size else math.nan})
    table = pd.DataFrame.from_records(
        records, columns=["init", "budget", "measure", "n_pairs", "median_ratio"])
    intervals = bootstrap_intervals(samples, "median", confidence, resamples, seed)
    table["ci_low"], table["ci_high"] = intervals[:, 0], intervals[:, 1]
    return table


# --- label efficiency -----------------------------------------------------------------


def labels_to_reach(budgets: npt.ArrayLike, dice: npt.ArrayLike,
                    target: float) -> tuple[float, str]:
    """The number of labels at which a budget curve first reaches ``target``.

    ``budgets`` ascending and positive, ``dice`` the curve's value at each (the mean test
    Dice over seeds); points with a NaN value are dropped. The curve is taken as linear
    in log(budget) between measured budgets (budgets are spaced roughly geometrically).
    Returns (labels, status):

    - ``"interpolated"``: the first budget whose value is >= target and the one before
      it bracket the crossing; labels = b0 * (b1 / b0) ** ((target - d0) / (d1 - d0)).
    - ``"at or below the smallest budget"``: the curve is already at the target at the
      smallest budget; labels = that budget, an upper bound (fewer might do).
    - ``"not reached"``: no budget reaches the target; labels NaN (more than the largest).
    - ``"no data"``: no finite point; labels NaN.

    A noisy curve can cross the target, dip below it and cross again; the first crossing
    is used ("how many labels until this Dice is first seen"), later dips are ignored.
    """
    budgets, dice = _checked_curve(budgets, dice)
    if budgets.size == 0:
        return math.nan, NO_DATA
    reached = np.flatnonzero(dice >= target)
    if reached.size == 0:
        return math.nan, NOT_REACHED
    first = int(reached[0])
    if first == 0:
        return float(budgets[0]), AT_SMALLEST
    b0, b1, d0, d1 = budgets[first - 1], budgets[first], dice[first - 1], dice[first]
    return float(b0 * (b1 / b0) ** ((target - d0) / (d1 - d0))), INTERPOLATED


def _checked_curve(budgets: npt.ArrayLike, dice: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    budgets, dice = np.asarray(budgets, dtype=float), np.asarray(dice, dtype=float)
    if budgets.shape != dice.shape or budgets.ndim != 1:
        raise ValueError(f"budgets {budgets.shape} and dice {dice.shape} must be equal-length "
                         "1-D sequences")
    if np.any(budgets <= 0) or np.any(np.diff(budgets) <= 0):
        raise ValueError(f"budgets must be positive and strictly ascending, got {budgets}")
    keep = ~np.isnan(dice)
    return budgets[keep], dice[keep]


def label_efficiency_table(runs: pd.DataFrame, baseline: str = DEFAULT_BASELINE,
                           targets: Iterable[float] = (0.8,),
                           metric: str = "test_dice") -> pd.DataFrame:
    """Labels each init needs to reach each target ``metric``, and the ratio to the baseline.

    Each init's curve is its mean ``metric`` over runs per budget (NaN runs skipped);
    ``labels_to_reach`` reads the labels off it. One row per (target, init), baseline
    first: ``init, target, labels, status, baseline_labels, baseline_status, ratio,
    ratio_kind``. ``ratio`` = baseline labels / init labels ("needs ratio x fewer
    labels"), and ``ratio_kind`` says how far the curves support it. Each status stands
    for a range of the true label count: interpolated x -> [x, x]; at or below the
    smallest budget b -> (0, b]; not reached -> (largest budget, inf); no data -> (0, inf).
    Dividing the ranges gives the range of the ratio:

    - ``"estimate"``: both interpolated, ratio = the quotient.
    - ``"lower bound"``: the ratio is at least ``ratio`` (e.g. the init is already at
      the target at the smallest budget, or the baseline never reaches it).
    - ``"upper bound"``: the ratio is at most ``ratio`` (the reverse cases).
    - ``"undefined"``: nothing follows (e.g. neither reaches it), ratio NaN.
    - ``"baseline"``: the baseline's own row, ratio NaN.

    The estimate is a point estimate from mean curves: it has no interval, and the
    paired tests per budget are what supports a claim that an init is better.
    """
    _require_columns(runs, ["init", "budget", metric])
    _check_single_budget_unit(runs)
    curves = _mean_curves(runs, metric)
    _require_baseline(curves, baseline)
    order = [baseline, *sorted(init for init in curves if init != baseline)]
    records = []
    for target in targets:
        base_labels, base_status = labels_to_reach(*curves[baseline], target)
        base_range = _labels_range(base_labels, base_status, curves[baseline][0])
        for init in order:
            labels, status = labels_to_reach(*curves[init], target)
            ratio, kind = (math.nan, BASELINE) if init == baseline else _ratio_bound(
                base_range, _labels_range(labels, status, curves[init][0]))
            records.append({"init": init, "target": float(target), "labels": labels,
                            "status": status, "baseline_labels": base_labels,
                            "baseline_status": base_status, "ratio": ratio,
                            "ratio_kind": kind})
    return pd.DataFrame.from_records(records, columns=[
        "init", "target", "labels", "status", "baseline_labels", "baseline_status", "ratio",
        "ratio_kind"])


def _mean_curves(runs: pd.DataFrame, metric: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    means = runs.groupby(["init", "budget"], sort=True)[metric].mean()
    return {str(init): (curve.index.get_level_values("budget").to_numpy(dtype=float),
                        curve.to_numpy(dtype=float))
            for init, curve in means.groupby(level="init")}


def _labels_range(labels: float, status: str, budgets: np.ndarray) -> tuple[float, float]:
    """The range of true label counts a ``labels_to_reach`` answer stands for."""
    if status == INTERPOLATED:
        return labels, labels
    if status == AT_SMALLEST:
        return 0.0, float(budgets[0])
    if status == NOT_REACHED:
        return float(budgets[-1]), math.inf
    return 0.0, math.inf


def _ratio_bound(base: tuple[float, float], init: tuple[float, float]) -> tuple[float, str]:
    """baseline / init over the two ranges, as (value, kind)."""
    low = base[0] / init[1]  # init[1] > 0; x / inf = 0
    high = math.inf if init[0] == 0 else base[1] / init[0]
    if low > 0 and math.isfinite(high):
        return low, ESTIMATE  # only when both are points, so low == high
    if low > 0:
        return low, LOWER_BOUND
    if math.isfinite(high):
        return high, UPPER_BOUND
    return math.nan, UNDEFINED


# --- paired tests ---------------------------------------------------------------------


def holm(pvalues: npt.ArrayLike) -> np.ndarray:
    """Holm's step-down adjusted p-values; NaN entries are ignored and stay NaN.

    Sorted ascending, the i-th of m p-values (i from 0) becomes max over j <= i of
    (m - j) * p_(j), capped at 1: it controls the family-wise error rate at alpha when
    rejecting adjusted p < alpha, for any dependence between the tests.
    """
    p = np.asarray(pvalues, dtype=float)
    present = ~np.isnan(p)
    values = p[present]
    if np.any((values < 0) | (values > 1)):
        raise ValueError(f"p-values must be in [0, 1], got {values}")
    order = np.argsort(values, kind="stable")
    scaled = (values.size - np.arange(values.size)) * values[order]
    adjusted = np.empty_like(values)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    result = np.full(p.shape, np.nan)
    result[present] = adjusted
    return result


def min_wilcoxon_p(n: int) -> float:
    """The smallest two-sided p a Wilcoxon signed-rank test can give with n pairs: 2 / 2**n.

    All n differences of one sign is the most extreme outcome, with probability 2**-n
    under the null, doubled for two sides (ties between |differences| do not change it).
    """
    return 1.0 if n <= 0 else min(1.0, math.ldexp(1.0, 1 - n))


def min_pairs_for(alpha: float) -> int:
    """The fewest pairs with which a two-sided Wilcoxon test can reach p < alpha."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), not {alpha}")
    n = 1
    while min_wilcoxon_p(n) >= alpha:
        n += 1
    return n


def wilcoxon_p(differences: npt.ArrayLike) -> tuple[float, str]:
    """Two-sided Wilcoxon signed-rank p of paired differences, and how it was computed.

    Zero differences are dropped (Wilcoxon's own treatment: a pair without a difference
    says nothing about its direction); the test runs on the rest, which must not be
    empty. Without ties among |differences| the p is scipy's exact one (up to 50 pairs);
    with ties (common for integer epochs) it is exact by enumerating all 2**n sign flips
    of the mid-ranks (up to 16 pairs); otherwise scipy's normal approximation with tie
    correction, which is accurate at those sizes.
    """
    d = np.asarray(differences, dtype=float)
    d = d[d != 0]
    if d.size == 0:
        raise ValueError("no non-zero difference to test")
    ties = np.unique(np.abs(d)).size < d.size
    if not ties and d.size <= _MAX_EXACT_PAIRS:
        method, name = "exact", EXACT
    elif ties and d.size <= _MAX_ENUMERATED_PAIRS:
        return _sign_flip_p(d), EXACT_WITH_TIES
    else:
        method, name = "asymptotic", NORMAL
    result = stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided", method=method)
    return float(result.pvalue), name


def _sign_flip_p(differences: np.ndarray) -> float:
    """Exact two-sided p of the signed-rank sum over all 2**n sign flips (mid-ranks for ties).

    What scipy's ``wilcoxon`` computes with a ``PermutationMethod`` that covers all
    flips, done as one matrix product instead of scipy's resampling loop (~100x faster).
    """
    ranks = stats.rankdata(np.abs(differences))
    observed = ranks[differences > 0].sum()
    flips = (np.arange(2 ** differences.size)[:, None] >> np.arange(differences.size)) & 1
    null = flips @ ranks  # the positive-rank sum under every sign assignment
    tolerance = 1e-12 * max(1.0, observed)  # mid-rank sums are halves: exact up to rounding
    greater = np.mean(null >= observed - tolerance)
    less = np.mean(null <= observed + tolerance)
    return float(min(1.0, 2 * min(greater, less)))


def paired_tests(runs: pd.DataFrame, baseline: str = DEFAULT_BASELINE,
                 metric: str = "test_dice", alpha: float = DEFAULT_ALPHA,
                 family_by: Sequence[str] = ()) -> pd.DataFrame:
    """Wilcoxon signed-rank test of each init against the baseline at each budget.

    Pairs are the seeds run with both inits where ``metric`` is finite for both. One row
    per (init != baseline, budget): ``init, budget, metric, n_pairs, n_differing,
    median_difference, p, p_holm, family_size, testable, significant, method, note``.
    ``median_difference`` is the median of init - baseline over pairs (its sign is the
    direction; whether higher is better depends on the metric). ``p`` is ``wilcoxon_p``.

    A comparison is testable only if its differing pairs could give p < alpha at all
    (``min_wilcoxon_p(n_differing) < alpha``, i.e. at least ``min_pairs_for(alpha)`` of
    them, 6 for 0.05); otherwise ``p`` is NaN and ``note`` says why, since a p-value that
    can never be small says nothing about the data. All pairs equal is likewise not
    tested (the note says so).

    ``p_holm`` is Holm's adjustment within a family: by default all testable rows of this
    call (one metric, every init and budget); ``family_by=("budget",)`` makes one family
    per budget (then the error rate is controlled per budget, not over the whole table:
    say so). Untestable rows cannot reject at alpha, so leaving them out of the family
    keeps the family-wise error rate at alpha. ``family_size`` is the number of tests in
    the row's family (0 for untestable rows), ``significant`` is p_holm < alpha. Holm
    rejects nothing unless some p < alpha / family_size: with 10 seeds (smallest p
    2/1024) a family of more than 25 tests can never show a significant difference.
    """
    _check_alpha(alpha)
    family_by = list(family_by)
    if not set(family_by) <= {"init", "budget"}:
        raise ValueError(f"family_by may hold 'init' and 'budget', not {family_by}")
    paired = _paired_values(runs, baseline, metric)
    records = []
    for init, budget in _comparisons(runs, baseline):
        base, other = _pair(paired, baseline, init, budget)
        records.append({"init": init, "budget": budget, "metric": metric,
                        **_paired_test(other - base, alpha)})
    table = pd.DataFrame.from_records(records, columns=[
        "init", "budget", "metric", "n_pairs", "n_differing", "median_difference", "p",
        "testable", "method", "note"])
    p_holm, family_size = _holm_within(table, family_by)
    table.insert(7, "p_holm", p_holm)
    table.insert(8, "family_size", family_size)
    table.insert(10, "significant", p_holm < alpha)
    return table


def _holm_within(table: pd.DataFrame, family_by: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Holm-adjusted p and family size per row, one family per ``family_by`` group."""
    p = table["p"].to_numpy(dtype=float)
    families = ([np.arange(len(table))] if not family_by
                else list(table.groupby(family_by).indices.values()))
    adjusted, sizes = np.full(p.shape, np.nan), np.zeros(p.shape, dtype=int)
    for rows in families:
        adjusted[rows] = holm(p[rows])
        sizes[rows] = np.where(np.isnan(p[rows]), 0, np.count_nonzero(~np.isnan(p[rows])))
    return adjusted, sizes


def _paired_test(differences: np.ndarray, alpha: float) -> dict[str, object]:
    n_pairs = differences.size
    n_differing = int(np.count_nonzero(differences))
    result: dict[str, object] = {
        "n_pairs": n_pairs, "n_differing": n_differing,
        "median_difference": float(np.median(differences)) if n_pairs else math.nan,
        "p": math.nan, "testable": False, "method": "", "note": ""}
    if n_pairs == 0:
        result["note"] = "no seed was run with both initialisations"
    elif n_differing == 0:
        result["note"] = f"all {n_pairs} pairs equal: no difference to test"
    elif min_wilcoxon_p(n_differing) >= alpha:
        result["note"] = _too_few_pairs(n_pairs, n_differing, alpha)
    else:
        result["p"], result["method"] = wilcoxon_p(differences)
        result["testable"] = True
    return result


def _too_few_pairs(n_pairs: int, n_differing: int, alpha: float) -> str:
    needed = min_pairs_for(alpha)
    if n_differing == n_pairs:
        return (f"{n_pairs} pairs: a Wilcoxon test cannot reach p < {alpha:g} "
                f"with fewer than {needed}")
    return (f"{n_pairs} pairs, {n_pairs - n_differing} without difference: a Wilcoxon test "
            f"cannot reach p < {alpha:g} with fewer than {needed} differing pairs")


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), not {alpha}")


# --- pretraining length ---------------------------------------------------------------


def pretraining_length_table(runs: pd.DataFrame, confidence: float = DEFAULT_CONFIDENCE,
                             resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """Downstream test Dice and epochs to 95% of best against pretraining epochs, per budget.

    Uses the runs with ``pretrain_epochs`` present, grouped into series by init name
    (``pretraining_series``); a series with a single pretraining length is left out (it
    has no length axis). One row per (series, pretrain_epochs, budget): ``series,
    pretrain_epochs, budget``, then ``mean, ci_low, ci_high, n`` of ``test_dice`` and of
    ``epochs_to_95pct``, each prefixed with the metric name (as ``summary_table``).
    """
    metrics = ["test_dice", "epochs_to_95pct"]
    _require_columns(runs, ["init", "budget", "pretrain_epochs", *metrics])
    epochs = pd.to_numeric(runs["pretrain_epochs"], errors="coerce")
    members = runs[np.isfinite(epochs.to_numpy(dtype=float))].assign(
        series=lambda frame: frame["init"].astype(str).map(pretraining_series))
    lengths = members.groupby("series")["pretrain_epochs"].transform("nunique")
    members = members[lengths >= 2]
    keys = ["series", "pretrain_epochs", "budget"]
    long = summary_table(members, metrics, by=keys, confidence=confidence,
                         resamples=resamples, seed=seed)
    parts = [long[long["metric"] == metric].set_index(keys)[["mean", "ci_low", "ci_high", "n"]]
             .add_prefix(f"{metric}_") for metric in metrics]
    return parts[0].join(parts[1]).reset_index()


# --- shared checks and pairing --------------------------------------------------------


def _require_columns(runs: pd.DataFrame, columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in runs.columns]
    if missing:
        raise ValueError(f"runs lack the column(s) {missing}")


def _check_single_budget_unit(runs: pd.DataFrame) -> None:
    """Budgets in slices and in patients are not one axis: refuse to pool them."""
    if "budget_unit" in runs.columns and runs["budget_unit"].nunique() > 1:
        raise ValueError(f"the runs mix budget units {sorted(runs['budget_unit'].unique())}; "
                         "compute each unit's statistics separately")


def _require_baseline(inits: Iterable[str], baseline: str) -> None:
    inits = sorted(map(str, inits))
    if baseline not in inits:
        raise ValueError(f"no runs of the baseline init {baseline!r}; inits: {inits}")


def _paired_values(runs: pd.DataFrame, baseline: str, column: str) -> pd.DataFrame:
    """``column`` with one row per (budget, seed) and one column per init."""
    _require_columns(runs, [*RUN_KEY, column])
    _check_single_budget_unit(runs)
    _require_baseline(runs["init"].unique(), baseline)
    duplicated = runs.duplicated(list(RUN_KEY), keep=False)
    if duplicated.any():
        twice = runs.loc[duplicated, list(RUN_KEY)].drop_duplicates().head(3)
        raise ValueError("more than one run per (init, budget, seed), e.g. "
                         f"{twice.to_dict('records')}: pairs by seed would be ambiguous")
    return runs.pivot(index=["budget", "seed"], columns="init", values=column).astype(float)


def _comparisons(runs: pd.DataFrame, baseline: str) -> list[tuple[str, int]]:
    """Every (init, budget) with runs of an init other than the baseline, sorted."""
    others = runs.loc[runs["init"] != baseline, ["init", "budget"]].drop_duplicates()
    return sorted(others.itertuples(index=False, name=None))


def _pair(paired: pd.DataFrame, baseline: str, init: str,
          budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Baseline's and init's values at ``budget`` over the seeds where both are finite."""
    rows = paired.xs(budget, level="budget")
    base, other = rows[baseline].to_numpy(), rows[init].to_numpy()
    both = np.isfinite(base) & np.isfinite(other)
    return base[both], other[both]


def probe_agreement(length: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """How well the pretraining run's live probe ranks its kept checkpoints as fine-tuning
    does: per series and budget, Spearman's rank correlation between the probe Dice at
    each kept epoch and the mean downstream test Dice after it. ``length``:
    ``pretraining_length_table``; ``curves``: ``report_data.probe_curves``. Columns
    ``series, budget, n, spearman, p_value``; NaN where fewer than 3 epochs pair up or
    either side is constant."""
    rows = []
    for (series, budget), own in length.groupby(["series", "budget"], sort=True):
        probe = curves[curves["series"] == series].set_index("epoch")["dice"]
        paired = own[own["pretrain_epochs"].isin(probe.index)]
        n = len(paired)
        rho = p_value = float("nan")
        if n >= 3:
            x = probe.loc[paired["pretrain_epochs"]].to_numpy(dtype=float)
            y = paired["test_dice_mean"].to_numpy(dtype=float)
            if np.ptp(x) > 0 and np.ptp(y) > 0:
                result = stats.spearmanr(x, y)
                rho, p_value = float(result.statistic), float(result.pvalue)
        rows.append({"series": series, "budget": budget, "n": n, "spearman": rho,
                     "p_value": p_value})
    return pd.DataFrame(rows, columns=["series", "budget", "n", "spearman", "p_value"])
