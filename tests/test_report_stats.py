"""The report's statistics, every number checked against direct computation (numpy, scipy)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from finetune import report_stats as rs

RESAMPLES = 2000  # enough for the checks below, fast on 2 cores


def _runs(rows: list[tuple[str, int, int, float]], column: str = "test_dice",
          **columns: list[float]) -> pd.DataFrame:
    """A runs table from (init, budget, seed, value) rows, plus optional extra columns."""
    frame = pd.DataFrame(rows, columns=["init", "budget", "seed", column])
    frame["budget_unit"] = "slices"
    for name, values in columns.items():
        frame[name] = values
    return frame


def _paired_runs(base: list[float], others: dict[str, list[float]], budget: int = 10,
                 column: str = "test_dice") -> pd.DataFrame:
    """Seeds 0.. of the baseline ``random`` and of each other init at one budget."""
    rows = [("random", budget, seed, value) for seed, value in enumerate(base)]
    for init, values in others.items():
        rows += [(init, budget, seed, value) for seed, value in enumerate(values)]
    return _runs(rows, column)


# --- bootstrap ------------------------------------------------------------------------


@pytest.mark.parametrize("statistic", ["mean", "median"])
def test_bootstrap_interval_is_the_percentile_bootstrap(statistic: str) -> None:
    values = np.random.default_rng(1).normal(0.7, 0.05, size=12)
    indices = np.random.default_rng(3).integers(0, 12, size=(RESAMPLES, 12))
    replicates = getattr(np, statistic)(values[indices], axis=1)
    expected = np.quantile(replicates, [0.025, 0.975])
    got = rs.bootstrap_interval(values, statistic, resamples=RESAMPLES, seed=3)
    assert got == pytest.approx(tuple(expected), rel=1e-12)


def test_bootstrap_interval_agrees_with_scipy_within_monte_carlo_error() -> None:
    values = np.random.default_rng(2).normal(size=30)
    scipy_ci = stats.bootstrap((values,), np.mean, method="percentile", n_resamples=10_000,
                               rng=np.random.default_rng(5)).confidence_interval
    low, high = rs.bootstrap_interval(values)
    assert low == pytest.approx(scipy_ci.low, abs=0.03)
    assert high == pytest.approx(scipy_ci.high, abs=0.03)


def test_bootstrap_interval_contains_the_statistic_is_seeded_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(4)
    small, large = rng.normal(size=10), rng.normal(size=1000)
    for statistic, function in (("mean", np.mean), ("median", np.median)):
        low, high = rs.bootstrap_interval(small, statistic, resamples=RESAMPLES)
        assert low <= function(small) <= high
    assert rs.bootstrap_interval(small, seed=7) == rs.bootstrap_interval(small, seed=7)
    assert rs.bootstrap_interval(small, seed=7) != rs.bootstrap_interval(small, seed=8)
    width = [np.subtract(*rs.bootstrap_interval(x, resamples=RESAMPLES)[::-1])
             for x in (small, large)]
    assert width[1] < width[0] / 4  # ~ 1 / sqrt(n): 10x for 100x the values


def test_bootstrap_interval_of_one_value_is_nan_and_nans_are_dropped() -> None:
    for values in ([0.7], [], [np.nan, 0.7], [np.nan]):
        assert all(math.isnan(x) for x in rs.bootstrap_interval(values))
    with_nan = rs.bootstrap_interval([0.5, np.nan, 0.7, 0.6], resamples=RESAMPLES)
    assert with_nan == rs.bootstrap_interval([0.5, 0.7, 0.6], resamples=RESAMPLES)
    assert rs.bootstrap_interval([0.8, 0.8, 0.8]) == pytest.approx((0.8, 0.8))


def test_bootstrap_intervals_equal_one_at_a_time() -> None:
    rng = np.random.default_rng(6)
    samples = [rng.normal(size=n) for n in (3, 10, 10, 1, 25, 10)]
    for statistic in ("mean", "median"):
        batch = rs.bootstrap_intervals(samples, statistic, resamples=RESAMPLES, seed=2)
        for sample, row in zip(samples, batch):
            one = rs.bootstrap_interval(sample, statistic, resamples=RESAMPLES, seed=2)
            np.testing.assert_allclose(row, one, rtol=1e-12)


@pytest.mark.parametrize("arguments", [{"statistic": "mode"}, {"confidence": 1.0},
                                       {"confidence": 0.0}, {"resamples": 0}])
def test_bootstrap_interval_refuses_bad_arguments(arguments: dict) -> None:
    with pytest.raises(ValueError):
        rs.bootstrap_interval([1.0, 2.0], **arguments)


# --- summary --------------------------------------------------------------------------


def _summary_runs() -> pd.DataFrame:
    rows = [("a", 10, s, d) for s, d in enumerate([0.61, 0.65, 0.70, 0.58])]
    rows += [("a", 20, s, d) for s, d in enumerate([0.75, 0.80, 0.79])]
    rows += [("b", 10, 0, 0.5)]  # n = 1: no spread, no interval
    hd95 = [3.0, np.nan, 4.5, 2.0, 1.0, 1.5, np.nan, 9.0]
    return _runs(rows, test_hd95_mm=hd95, test_dice_LV=[d + 0.1 for *_, d in rows])


def test_summary_table_entries_equal_direct_computation() -> None:
    runs = _summary_runs()
    columns = ["test_dice", "test_hd95_mm", "test_dice_LV"]
    table = rs.summary_table(runs, columns, resamples=RESAMPLES)
    assert list(table.columns) == ["init", "budget", "metric", "mean", "std", "ci_low",
                                   "ci_high", "n", "n_runs"]
    assert list(zip(table.init, table.budget)) == [("a", 10)] * 3 + [("a", 20)] * 3 + [
        ("b", 10)] * 3
    assert list(table.metric) == columns * 3
    for row in table.itertuples():
        group = runs[(runs.init == row.init) & (runs.budget == row.budget)]
        values = group[row.metric].dropna().to_numpy()
        assert (row.n, row.n_runs) == (values.size, len(group))
        assert row.mean == pytest.approx(np.mean(values))
        if values.size > 1:
            assert row.std == pytest.approx(np.std(values, ddof=1))
            ci = rs.bootstrap_interval(values, resamples=RESAMPLES)
            assert (row.ci_low, row.ci_high) == pytest.approx(ci, rel=1e-12)
        else:
            assert math.isnan(row.std) and math.isnan(row.ci_low) and math.isnan(row.ci_high)


def test_summary_table_refuses_mixed_units_and_missing_columns() -> None:
    runs = _summary_runs()
    with pytest.raises(ValueError, match="missing_metric"):
        rs.summary_table(runs, ["missing_metric"])
    runs.loc[0, "budget_unit"] = "patients"
    with pytest.raises(ValueError, match="budget units"):
        rs.summary_table(runs, ["test_dice"])


def test_column_helpers_find_test_and_convergence_columns() -> None:
    runs = pd.DataFrame(columns=["init", "test_dice", "best_dice", "epochs_to_dice_0.9",
                                 "test_hd95_mm_LV", "epochs_to_dice_0.85", "epochs_to_95pct",
                                 "epochs_to_dice_0.8", "normalised_auc"])
    assert rs.accuracy_columns(runs) == ["test_dice", "test_hd95_mm_LV"]
    assert rs.convergence_columns(runs) == [
        "best_dice", "epochs_to_95pct", "normalised_auc", "epochs_to_dice_0.8",
        "epochs_to_dice_0.85", "epochs_to_dice_0.9"]


# --- speed-up -------------------------------------------------------------------------


def test_speedup_table_pairs_by_seed_and_takes_the_median_ratio() -> None:
    runs = _paired_runs(
        [10, 20, 30, 40, 50, np.nan],
        {"byol": [5, 10, 10, 20, 0, 7, 3]},  # seed 4: zero, seed 5: no baseline value,
        column="epochs_to_95pct")            # seed 6: no baseline run
    runs = pd.concat([runs, _runs([("byol", 30, 0, 9.0)], "epochs_to_95pct")])
    table = rs.speedup_table(runs, measure="epochs_to_95pct", resamples=RESAMPLES)
    ratios = np.array([10 / 5, 20 / 10, 30 / 10, 40 / 20])
    first, unpaired = table.iloc[0], table.iloc[1]
    assert (first.init, first.budget, first.measure, first.n_pairs) == (
        "byol", 10, "epochs_to_95pct", 4)
    assert first.median_ratio == pytest.approx(np.median(ratios))
    ci = rs.bootstrap_interval(ratios, "median", resamples=RESAMPLES)
    assert (first.ci_low, first.ci_high) == pytest.approx(ci)
    assert first.ci_low <= first.median_ratio <= first.ci_high
    assert (unpaired.budget, unpaired.n_pairs) == (30, 0)
    assert math.isnan(unpaired.median_ratio) and math.isnan(unpaired.ci_low)


def test_pairing_refuses_duplicate_runs_and_a_missing_baseline() -> None:
    runs = _paired_runs([10, 20], {"byol": [5, 10]}, column="epochs_to_95pct")
    with pytest.raises(ValueError, match="'imagenet'"):
        rs.speedup_table(runs, baseline="imagenet")
    twice = pd.concat([runs, runs.iloc[:1]])
    with pytest.raises(ValueError, match="more than one run"):
        rs.speedup_table(twice)


# --- label efficiency -----------------------------------------------------------------


def test_labels_to_reach_interpolates_in_log_budget() -> None:
    labels, status = rs.labels_to_reach([10, 100], [0.6, 0.8], 0.7)
    assert (labels, status) == (pytest.approx(math.sqrt(10 * 100)), rs.INTERPOLATED)
    labels, _ = rs.labels_to_reach([3, 7], [0.2, 0.6], 0.5)
    assert labels == pytest.approx(math.exp(math.log(3) + 0.75 * (math.log(7) - math.log(3))))
    assert rs.labels_to_reach([1, 10, 100], [0.5, 0.6, 0.7], 0.7) == (
        pytest.approx(100), rs.INTERPOLATED)
    assert rs.labels_to_reach([10, 30, 100], [0.6, np.nan, 0.8], 0.7)[0] == pytest.approx(
        math.sqrt(1000))  # a budget without a value is skipped


def test_labels_to_reach_bounds_and_first_crossing() -> None:
    assert rs.labels_to_reach([10, 100], [0.75, 0.9], 0.7) == (10.0, rs.AT_SMALLEST)
    labels, status = rs.labels_to_reach([10, 100], [0.5, 0.6], 0.7)
    assert math.isnan(labels) and status == rs.NOT_REACHED
    assert rs.labels_to_reach([10], [np.nan], 0.7)[1] == rs.NO_DATA
    # up, down, up again: the first crossing counts (between 1 and 10, at 80% of the way)
    labels, status = rs.labels_to_reach([1, 10, 100, 1000], [0.5, 0.75, 0.65, 0.9], 0.7)
    assert (labels, status) == (pytest.approx(10 ** 0.8), rs.INTERPOLATED)
    for budgets in ([100, 10], [0, 10], [10, 10]):
        with pytest.raises(ValueError, match="ascending"):
            rs.labels_to_reach(budgets, [0.5, 0.6], 0.7)


def _curve_runs() -> pd.DataFrame:
    """Mean test Dice per budget (10, 100): random 0.6/0.8, a 0.65/0.85, b 0.72/0.9,
    c 0.5/0.6; random's two seeds average to its curve."""
    rows = [("random", 10, 0, 0.55), ("random", 10, 1, 0.65),
            ("random", 100, 0, 0.75), ("random", 100, 1, 0.85)]
    for init, (low, high) in {"a": (0.65, 0.85), "b": (0.72, 0.9), "c": (0.5, 0.6)}.items():
        rows += [(init, 10, 0, low), (init, 100, 0, high)]
    return _runs(rows)


def _log_interpolated(d0: float, d1: float, target: float) -> float:
    return 10 * 10 ** ((target - d0) / (d1 - d0))  # budgets 10 and 100


def test_label_efficiency_table_ratios_and_bounds() -> None:
    table = rs.label_efficiency_table(_curve_runs(), targets=(0.7, 0.84, 0.58))
    rows = {(r.target, r.init): r for r in table.itertuples()}
    assert list(table.init[:4]) == ["random", "a", "b", "c"]
    base = rows[(0.7, "random")]
    assert base.labels == pytest.approx(_log_interpolated(0.6, 0.8, 0.7))
    assert (base.ratio_kind, math.isnan(base.ratio)) == (rs.BASELINE, True)
    expected = {
        # both interpolated: an estimate
        (0.7, "a"): (base.labels / _log_interpolated(0.65, 0.85, 0.7), rs.ESTIMATE),
        # b is at 0.7 already at 10 labels: needs at least base/10 fewer
        (0.7, "b"): (base.labels / 10, rs.LOWER_BOUND),
        # c never reaches it: needs more than 100, so at most base/100 the baseline's
        (0.7, "c"): (base.labels / 100, rs.UPPER_BOUND),
        # the baseline never reaches 0.84: it needs more than 100
        (0.84, "a"): (100 / _log_interpolated(0.65, 0.85, 0.84), rs.LOWER_BOUND),
        (0.84, "b"): (100 / _log_interpolated(0.72, 0.9, 0.84), rs.LOWER_BOUND),
        (0.84, "c"): (math.nan, rs.UNDEFINED),
        # the baseline is at 0.58 already at 10 labels
        (0.58, "a"): (math.nan, rs.UNDEFINED),
        (0.58, "c"): (10 / _log_interpolated(0.5, 0.6, 0.58), rs.UPPER_BOUND),
    }
    for key, (ratio, kind) in expected.items():
        row = rows[key]
        assert row.ratio_kind == kind, key
        assert row.ratio == pytest.approx(ratio, nan_ok=True), key
    assert rows[(0.84, "random")].baseline_status == rs.NOT_REACHED
    assert rows[(0.58, "b")].status == rs.AT_SMALLEST


# --- paired tests ---------------------------------------------------------------------


def test_holm_by_hand() -> None:
    adjusted = rs.holm([0.01, 0.04, 0.03, 0.005])
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 -> max(0.06, 0.04)
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(rs.holm([0.01, np.nan, 0.04]), [0.02, np.nan, 0.04])
    np.testing.assert_allclose(rs.holm([0.5, 0.6]), [1.0, 1.0])
    np.testing.assert_allclose(rs.holm([0.02]), [0.02])
    assert rs.holm([]).size == 0
    with pytest.raises(ValueError):
        rs.holm([1.5])


def test_min_wilcoxon_p_is_attained_by_all_positive_differences() -> None:
    assert rs.min_wilcoxon_p(10) == 2 / 1024
    assert rs.min_wilcoxon_p(5) == 0.0625
    assert rs.min_wilcoxon_p(1) == rs.min_wilcoxon_p(0) == 1.0
    for n in (6, 10):
        assert stats.wilcoxon(np.arange(1.0, n + 1)).pvalue == pytest.approx(
            rs.min_wilcoxon_p(n))
    assert (rs.min_pairs_for(0.05), rs.min_pairs_for(0.01)) == (6, 8)


def test_wilcoxon_p_equals_scipy_for_each_method() -> None:
    rng = np.random.default_rng(8)
    for n, method in ((9, "exact"), (30, "exact"), (60, "asymptotic")):
        d = rng.normal(0.2, 1.0, size=n)
        assert rs.wilcoxon_p(d) == (pytest.approx(stats.wilcoxon(d, method=method).pvalue),
                                    rs.EXACT if method == "exact" else rs.NORMAL)
    tied = np.round(rng.normal(1.0, 2.0, size=12))
    tied = tied[tied != 0]
    every_flip = stats.PermutationMethod(n_resamples=2 ** tied.size)
    p, method = rs.wilcoxon_p(tied)
    assert method == rs.EXACT_WITH_TIES
    assert p == pytest.approx(stats.wilcoxon(tied, method=every_flip).pvalue)
    many_tied = np.round(rng.normal(1.0, 2.0, size=40))
    many_tied = many_tied[many_tied != 0]
    assert rs.wilcoxon_p(many_tied) == (
        pytest.approx(stats.wilcoxon(many_tied, method="asymptotic").pvalue), rs.NORMAL)


def test_ten_positive_pairs_are_significant() -> None:
    base = [0.60, 0.62, 0.55, 0.70, 0.66, 0.58, 0.61, 0.64, 0.59, 0.63]
    gain = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10]
    init = list(np.add(base, gain))
    table = rs.paired_tests(_paired_runs(base, {"byol": init}))
    row = table.iloc[0]
    assert (row.n_pairs, row.n_differing, row.testable, row.method) == (10, 10, True, rs.EXACT)
    assert row.p == pytest.approx(2 / 1024)
    assert row.p == pytest.approx(stats.wilcoxon(init, base).pvalue)
    assert row.median_difference == pytest.approx(np.median(np.subtract(init, base)))
    assert row.p_holm == pytest.approx(row.p)  # a family of one
    assert row.significant and row.note == ""


def test_too_few_pairs_get_no_p_value_but_a_note() -> None:
    table = rs.paired_tests(_paired_runs([0.5] * 5, {"byol": [0.6] * 5}))
    row = table.iloc[0]
    assert (row.n_pairs, row.testable, row.significant) == (5, False, False)
    assert math.isnan(row.p) and math.isnan(row.p_holm)
    assert row.note == "5 pairs: a Wilcoxon test cannot reach p < 0.05 with fewer than 6"
    assert row.median_difference == pytest.approx(0.1)


def test_holm_keeps_two_borderline_comparisons_from_being_significant() -> None:
    base = [0.5, 0.6, 0.7, 0.55, 0.65, 0.75]
    better = list(np.add(base, [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]))
    table = rs.paired_tests(_paired_runs(base, {"a": better, "b": better}))
    raw = stats.wilcoxon(better, base).pvalue
    assert raw == pytest.approx(2 / 64) and raw < 0.05
    np.testing.assert_allclose(table.p, [raw, raw])
    np.testing.assert_allclose(table.p_holm, rs.holm([raw, raw]))
    np.testing.assert_allclose(table.p_holm, [2 * raw, 2 * raw])
    assert list(table.family_size) == [2, 2]
    assert not table.significant.any()


def test_families_by_budget_are_adjusted_separately() -> None:
    base = [0.5, 0.6, 0.7, 0.55, 0.65, 0.75]
    better = list(np.add(base, [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]))
    worse = list(np.add(base, [-0.01, 0.02, -0.03, 0.04, -0.05, 0.06]))
    runs = pd.concat([_paired_runs(base, {"a": better, "b": worse}, budget=10),
                      _paired_runs(base, {"a": better, "b": [0.5] * 6}, budget=20)])
    table = rs.paired_tests(runs, family_by=("budget",))
    # (a, 10), (a, 20), (b, 10), (b, 20): b at 20 has one equal pair, 5 left: untestable
    assert list(table.family_size) == [2, 1, 2, 0]
    at_10 = table[table.budget == 10].p.to_numpy()
    np.testing.assert_allclose(table[table.budget == 10].p_holm, rs.holm(at_10))
    at_20 = table[table.budget == 20]
    assert at_20.p_holm.iloc[0] == pytest.approx(2 / 64)  # alone in its family
    assert at_20.significant.tolist() == [True, False]
    with pytest.raises(ValueError, match="family_by"):
        rs.paired_tests(runs, family_by=("seed",))


def test_ties_and_zero_differences_match_scipy() -> None:
    base = [20.0, 25, 30, 22, 18, 40, 33, 27, 29, 31]
    init = list(np.subtract(base, [3, 3, 0, 5, 5, 2, 0, 3, -1, 4]))
    row = rs.paired_tests(_paired_runs(base, {"byol": init}, column="epochs_to_95pct"),
                          metric="epochs_to_95pct").iloc[0]
    assert (row.n_pairs, row.n_differing, row.method) == (10, 8, rs.EXACT_WITH_TIES)
    assert row.p == pytest.approx(stats.wilcoxon(init, base).pvalue)  # scipy: exact flips
    assert row.median_difference == pytest.approx(-3.0)


def test_equal_pairs_unpaired_budgets_and_no_effect() -> None:
    rng = np.random.default_rng(9)
    base = list(rng.uniform(0.5, 0.8, size=8))
    noisy = list(np.add(base, rng.normal(0, 0.05, size=8)))
    runs = pd.concat([
        _paired_runs(base, {"same": base, "noisy": noisy}),
        _paired_runs([0.5, 0.6, 0.7, 0.8, 0.9, 0.4, 0.45],
                     {"same": [0.5, 0.6, 0.7, 0.9, 1.0, 0.5, 0.55]}, budget=20),
        _runs([("noisy", 30, 0, 0.7)])])
    table = rs.paired_tests(runs).set_index(["init", "budget"])
    equal, partly, unpaired = table.loc[("same", 10)], table.loc[("same", 20)], table.loc[
        ("noisy", 30)]
    assert equal.note == "all 8 pairs equal: no difference to test"
    assert partly.note == ("7 pairs, 3 without difference: a Wilcoxon test cannot reach "
                           "p < 0.05 with fewer than 6 differing pairs")
    assert unpaired.note == "no seed was run with both initialisations"
    assert unpaired.n_pairs == 0 and math.isnan(unpaired.median_difference)
    for row in (equal, partly, unpaired):
        assert not row.testable and math.isnan(row.p) and not row.significant
    noise = table.loc[("noisy", 10)]
    assert noise.p == pytest.approx(stats.wilcoxon(noisy, base).pvalue)
    assert noise.p_holm == pytest.approx(noise.p)  # the only testable comparison
    assert noise.significant == (noise.p < 0.05)


def test_pairs_drop_undefined_values() -> None:
    base = [3.0, np.nan, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    init = [2.0, 1.0, np.nan, 4.5, 5.0, 5.5, 6.0, 7.25]
    row = rs.paired_tests(_paired_runs(base, {"byol": init}, column="test_hd95_mm"),
                          metric="test_hd95_mm").iloc[0]
    d = np.array([2.0 - 3, 4.5 - 5, 5 - 6, 5.5 - 7, 6 - 8, 7.25 - 9])  # seeds 0, 3..7
    assert (row.n_pairs, row.method) == (6, rs.EXACT_WITH_TIES)
    assert row.median_difference == pytest.approx(np.median(d))
    assert row.p == pytest.approx(stats.wilcoxon(d).pvalue)


# --- pretraining length ---------------------------------------------------------------


def test_pretraining_series_names() -> None:
    assert rs.pretraining_series("byol-acdc-ep0005") == "byol-acdc"
    assert rs.pretraining_series("imagenet-byol-acdc-ep0100") == "imagenet-byol-acdc"
    assert rs.pretraining_series("random") == "random"


def test_pretraining_length_table_per_series_length_and_budget() -> None:
    rows, epochs, pretrain = [], [], []
    for init, length, dice in (("byol-ep0001", 1.0, [0.6, 0.62, 0.58]),
                               ("byol-ep0005", 5.0, [0.7, 0.71, 0.69]),
                               ("solo-ep0003", 3.0, [0.5, 0.5, 0.5]),
                               ("random", np.nan, [0.4, 0.45, 0.42])):
        for seed, value in enumerate(dice):
            rows.append((init, 10, seed, value))
            epochs.append(10.0 + seed + length)
            pretrain.append(length)
    runs = _runs(rows, epochs_to_95pct=epochs, pretrain_epochs=pretrain)
    before = runs.copy()
    table = rs.pretraining_length_table(runs, resamples=RESAMPLES)
    pd.testing.assert_frame_equal(runs, before)  # pure
    assert list(table.columns) == [
        "series", "pretrain_epochs", "budget",
        "test_dice_mean", "test_dice_ci_low", "test_dice_ci_high", "test_dice_n",
        "epochs_to_95pct_mean", "epochs_to_95pct_ci_low", "epochs_to_95pct_ci_high",
        "epochs_to_95pct_n"]
    assert list(zip(table.series, table.pretrain_epochs, table.budget)) == [
        ("byol", 1.0, 10), ("byol", 5.0, 10)]  # solo has one length, random none
    for row in table.itertuples():
        group = runs[runs.pretrain_epochs == row.pretrain_epochs]
        assert row.test_dice_mean == pytest.approx(group.test_dice.mean())
        assert row.test_dice_n == row.epochs_to_95pct_n == 3
        assert (row.test_dice_ci_low, row.test_dice_ci_high) == pytest.approx(
            rs.bootstrap_interval(group.test_dice, resamples=RESAMPLES))
        assert row.epochs_to_95pct_mean == pytest.approx(np.mean(group.epochs_to_95pct))
