"""The study report end to end on hand-made metrics files with known values: every table
entry, speed-up, label count and test statistic checked against direct computation."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from scipy import stats

from cluster.config import to_dict
from finetune.cli import main
from finetune.config import FinetuneConfig
from finetune.convergence import convergence_metrics
from finetune.report import ReportSettings, build_report
from finetune.run_metrics import (
    EpochRecord,
    RunMetrics,
    TestMetrics,
    ValidationSchedule,
    write_run_metrics,
)

CLASSES = ("RV", "MYO", "LV")
SEEDS = range(8)
BUDGETS = (10, 100)
# test Dice per (init, budget): baseline random; "ssl" better by a seed-dependent margin
BASE_DICE = {10: 0.6, 100: 0.8}


def _dice(init: str, budget: int, seed: int) -> float:
    value = BASE_DICE[budget] + 0.01 * seed / 10
    if "-ep" in init:  # a pretraining series: longer pretraining, a little better
        value += 0.01 * int(init.rsplit("-ep", 1)[1])
    return value + (0.05 + 0.002 * seed if init == "ssl" else 0.0)


def _epochs_to_best(init: str, seed: int) -> int:
    return 4 + seed % 3 if init == "ssl" else 8 + seed % 4  # ssl converges ~2x faster


def _metrics(folder: Path, init: str, budget: int, seed: int, data: str = "/data/x",
             classes: tuple[str, ...] = CLASSES, unit: str = "slices",
             complete: bool = True, init_chain: list | None = None) -> None:
    best = _dice(init, budget, seed)
    rise = _epochs_to_best(init, seed)
    curve = [best * min(1.0, (e + 1) / rise) for e in range(12)]
    steps = [10 * (e + 1) for e in range(12)]
    seconds = [2.0 * (e + 1) for e in range(12)]
    per_class = {name: best + 0.01 * k for k, name in enumerate(classes)}
    test = {"dice": best, "iou": best - 0.1, "hd95_mm": 10.0 - 10 * best,
            "dice_per_class": per_class,
            "summary": {"volume_iou": {"per_class": {n: v - 0.1 for n, v in per_class.items()}},
                        "volume_hd95_mm": {"per_class": {n: 5.0 for n in classes}}}}
    config = to_dict(FinetuneConfig(data=data, out=str(folder), init=init, budget=budget,
                                    seed=seed, budget_unit=unit))
    run_dir = folder / init / f"budget{budget:05d}" / f"seed{seed}"
    run_dir.mkdir(parents=True)
    epochs = [EpochRecord(epoch=e + 1, step=steps[e], seconds=seconds[e], train_loss=0.5,
                          lr=1e-3, encoder_frozen=False, train_images_per_s=100.0,
                          validated=True, val_dice=curve[e], val_iou=curve[e] - 0.1,
                          val_dice_per_class={n: curve[e] for n in classes},
                          val_slice_dice=curve[e]) for e in range(12)]
    write_run_metrics(run_dir, RunMetrics(
        init=init, arch="resnet18", budget=budget, budget_unit=unit, train_slices=budget,
        init_chain=init_chain or [], seed=seed, epochs=epochs,
        validation=ValidationSchedule(1, list(range(1, 13))),
        convergence=convergence_metrics(curve, steps, seconds, [0.5, 0.7]),
        test=TestMetrics(**test) if complete else None, complete=complete,
        run_dir=str(run_dir), config=config))


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    folder = tmp_path / "runs"
    for init in ("random", "ssl"):
        for budget in BUDGETS:
            for seed in SEEDS:
                _metrics(folder, init, budget, seed)
    _metrics(folder, "ssl", 10, 99, complete=False)  # an unfinished run
    return folder


def _table(report: Path, name: str) -> pd.DataFrame:
    csv = pd.read_csv(report / "tables" / f"{name}.csv")
    parquet = pd.read_parquet(report / "tables" / f"{name}.parquet")
    # CSV cannot tell an empty string from a missing value
    pd.testing.assert_frame_equal(csv, parquet.replace({"": np.nan}), check_dtype=False)
    return csv


def test_every_number_equals_a_direct_computation(runs: Path) -> None:
    page = build_report(runs, settings=ReportSettings(overlays=0, targets=[0.65, 0.95]))
    report = page.parent
    accuracy = _table(report, "accuracy").set_index(["init", "budget", "metric"])
    for init in ("random", "ssl"):
        for budget in BUDGETS:
            values = np.array([_dice(init, budget, s) for s in SEEDS])
            row = accuracy.loc[(init, budget, "test_dice")]
            assert math.isclose(row["mean"], values.mean())
            assert math.isclose(row["std"], values.std(ddof=1))
            assert row["n"] == len(SEEDS)
            assert row["ci_low"] <= values.mean() <= row["ci_high"]
            lv = accuracy.loc[(init, budget, "test_dice_LV")]
            assert math.isclose(lv["mean"], values.mean() + 0.02)
            assert math.isclose(accuracy.loc[(init, budget, "test_iou_MYO")]["mean"],
                                values.mean() + 0.01 - 0.1)

    speed = _table(report, "speedup")
    epochs = speed[speed["measure"] == "epochs_to_95pct"].set_index(["init", "budget"])
    runs_table = _table(report, "runs").set_index(["init", "budget", "seed"])
    for budget in BUDGETS:
        ratios = [runs_table.loc[("random", budget, s)]["epochs_to_95pct"]
                  / runs_table.loc[("ssl", budget, s)]["epochs_to_95pct"] for s in SEEDS]
        assert math.isclose(epochs.loc[("ssl", budget)]["median_ratio"], np.median(ratios))
        assert epochs.loc[("ssl", budget)]["n_pairs"] == len(SEEDS)

    tests = _table(report, "tests")
    dice_tests = tests[tests["metric"] == "test_dice"].set_index("budget")
    for budget in BUDGETS:
        differences = [_dice("ssl", budget, s) - _dice("random", budget, s) for s in SEEDS]
        expected = stats.wilcoxon(differences, alternative="two-sided").pvalue
        row = dice_tests.loc[budget]
        assert math.isclose(row["p"], expected)
        assert math.isclose(row["median_difference"], np.median(differences))
        # one comparison per budget and metric: Holm leaves p as it is
        assert math.isclose(row["p_holm"], expected) and bool(row["significant"])

    # label efficiency on the mean curves: 0.65 lies between the budgets for random
    labels = _table(report, "label_efficiency").set_index(["init", "target"])
    means = {init: [np.mean([_dice(init, b, s) for s in SEEDS]) for b in BUDGETS]
             for init in ("random", "ssl")}
    fraction = (0.65 - means["random"][0]) / (means["random"][1] - means["random"][0])
    expected_labels = math.exp(math.log(10) + fraction * (math.log(100) - math.log(10)))
    assert math.isclose(labels.loc[("random", 0.65)]["labels"], expected_labels)
    assert labels.loc[("ssl", 0.65)]["status"] == "at or below the smallest budget"
    assert labels.loc[("random", 0.95)]["status"] == "not reached"

    text = (report / "report.md").read_text()
    html = (report / "report.html").read_text()
    # findings: supported claims only, with the numbers they rest on
    assert re.search(r"\*\*ssl\*\* has a higher test Dice than random at 10 slices "
                     r"\(median \+0\.05\d; p = 0\.0078, 8 pairs\)", text)
    assert "**ssl** reaches 95% of its best validation Dice faster than random" in text
    assert "lower test Dice" not in text
    # the unfinished run is listed, not dropped silently
    assert "stopped after epoch 12 of 150" in text and "seed99" in text
    # one content, two pages; the HTML needs nothing from outside
    for sentence in re.findall(r"^- (.+)$", text.split("## Findings")[1].split("##")[0],
                               flags=re.M):
        plain = sentence.replace("**", "")
        assert plain.split(" (")[0].replace("&", "&amp;") in re.sub(r"</?strong>", "", html)
    assert "src=\"http" not in html and "href=\"http" not in html
    assert html.count("data:image/png;base64,") == text.count("](") == 4  # no overlays here


def test_too_few_seeds_are_said_not_tested(tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    for init in ("random", "ssl"):
        for seed in range(3):
            _metrics(folder, init, 10, seed)
    page = build_report(folder, settings=ReportSettings(overlays=0))
    text = page.with_name("report.md").read_text()
    assert "could not be tested" in text and "higher test Dice" not in text
    tests = _table(page.parent, "tests")
    assert tests["p"].isna().all() and not tests["significant"].any()


@pytest.mark.parametrize(("change", "named"), [
    ({"unit": "patients"}, "budget units"),
    ({"data": "/data/other"}, "datasets"),
    ({"classes": ("RV", "LV")}, "class sets"),
])
def test_runs_that_cannot_be_compared_are_refused(tmp_path: Path, change: dict, named: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "runs"
    _metrics(folder, "random", 10, 0)
    _metrics(folder, "ssl", 10, 0, **change)
    assert main(["report", str(folder), "--overlays", "0"]) == 2
    error = capsys.readouterr().err
    assert f"the runs mix {named}" in error and "seed0" in error
    assert not (folder / "report").exists()


@pytest.mark.parametrize(("damage", "named"), [
    (lambda text: text[:-20], "not valid JSON"),
    (lambda text: text.replace('"validated"', '"checked"', 1), "unknown key 'epochs[0].checked'"),
    (lambda text: text.replace('"format_version": 1', '"format_version": 9'),
     "format_version 9 is not supported"),
], ids=["invalid-json", "unknown-key", "unknown-version"])
def test_an_unreadable_metrics_file_is_refused_by_name(
        tmp_path: Path, damage, named: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A report never drops a run it cannot read, nor guesses at it: it names the file."""
    folder = tmp_path / "runs"
    _metrics(folder, "random", 10, 0)
    _metrics(folder, "ssl", 10, 0)
    broken = folder / "ssl" / "budget00010" / "seed0" / "metrics.json"
    broken.write_text(damage(broken.read_text()))
    assert main(["report", str(folder), "--overlays", "0"]) == 2
    error = capsys.readouterr().err
    assert str(broken) in error and named in error, error
    assert not (folder / "report").exists()


def test_a_missing_baseline_is_an_error(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(runs), "--baseline", "imagenet", "--overlays", "0"]) == 2
    assert "baseline 'imagenet' is not among" in capsys.readouterr().err


def test_a_pretraining_series_gets_its_own_section(tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    for init in ("random", "ssl-ep0001", "ssl-ep0005"):
        for seed in range(2):
            _metrics(folder, init, 10, seed)
    page = build_report(folder, settings=ReportSettings(overlays=0))
    text = page.with_name("report.md").read_text()
    assert "## How much pretraining is enough" in text and "](pretraining_length.png)" in text
    assert "**ssl** at 10 slices: mean test Dice" in text and "(no trend test)" in text
    length = _table(page.parent, "pretraining_length")
    assert sorted(length["pretrain_epochs"]) == [1, 5]
    assert math.isclose(length["test_dice_mean"].iloc[0],
                        np.mean([_dice("ssl-ep0001", 10, s) for s in range(2)]))


def test_the_live_probe_curve_goes_beside_the_pretraining_series(tmp_path: Path) -> None:
    """A series whose pretraining run probed: the probe's curve, and how well it ranks
    the kept checkpoints as fine-tuning does (Spearman, checked against scipy here)."""
    pretrain_run = tmp_path / "byol"
    (pretrain_run / "checkpoints").mkdir(parents=True)
    probe = {0: 0.2, 1: 0.35, 2: 0.5, 3: 0.45, 5: 0.6}  # pretraining epoch -> probe Dice
    (pretrain_run / "probe.csv").write_text("epoch,step,dice,seconds\n" + "".join(
        f"{e}.0,{10 * e},{d},0.5\n" for e, d in probe.items()))
    folder = tmp_path / "runs"
    for epoch in (1, 2, 3, 5):
        checkpoint = pretrain_run / "checkpoints" / f"epoch{epoch:04d}.pt"
        for seed in range(2):
            _metrics(folder, f"ssl-ep{epoch:04d}", 10, seed, init_chain=[
                {"init": str(checkpoint), "kind": "checkpoint"}])
    page = build_report(folder, settings=ReportSettings(overlays=0))
    text = page.with_name("report.md").read_text()
    assert "](probe_curve.png)" in text
    curve = _table(page.parent, "probe_curve")
    assert curve["epoch"].tolist() == [0, 1, 2, 3, 5] and set(curve["series"]) == {"ssl"}
    agreement = _table(page.parent, "probe_agreement")
    downstream = [np.mean([_dice(f"ssl-ep{e:04d}", 10, s) for s in range(2)])
                  for e in (1, 2, 3, 5)]
    expected = scipy.stats.spearmanr([probe[e] for e in (1, 2, 3, 5)], downstream)
    assert agreement["n"].tolist() == [4]
    assert math.isclose(agreement["spearman"].iloc[0], expected.statistic)
    assert math.isclose(expected.statistic, 0.8)  # one pair out of order
    assert "The live probe of **ssl** ranks its 4 kept checkpoints" in text
