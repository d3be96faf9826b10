"""The run outputs' contract: metrics.json and row.json written once, read strictly, and
files from before format_version was recorded still read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune.config import FinetuneConfig
from finetune.outputs import (
    ROW_COLUMNS,
    ROW_FILE,
    epochs_csv,
    read_result_row,
    result_row,
    write_outputs,
    write_result_row,
)
from finetune.run_metrics import (
    FORMAT_VERSION,
    METRICS_FILE,
    EpochRecord,
    RunMetrics,
    TestMetrics,
    read_run_metrics,
    write_run_metrics,
)

CLASSES = ("RV", "MYO", "LV")


def record(epoch: int, dice: float | None) -> EpochRecord:
    return EpochRecord(
        epoch=epoch, step=10 * epoch, seconds=1.5 * epoch, train_loss=1.0 / epoch, lr=1e-3,
        encoder_frozen=epoch == 1, train_images_per_s=80.0, validated=dice is not None,
        val_dice=dice, val_iou=None if dice is None else dice - 0.1,
        val_dice_per_class=None if dice is None else {c: dice for c in CLASSES},
        val_slice_dice=dice)


def sample_metrics(out: Path, complete: bool = True) -> RunMetrics:
    """A run of 4 epochs validated every 2nd (as val_every=2 records it)."""
    config = FinetuneConfig(data="/data/x", out=str(out), arch="resnet18", budget=8, seed=3,
                            epochs=4, val_every=2, dice_targets=[0.5, 0.7])
    summary = {"volume_dice": {"mean": 0.6, "per_class": dict(zip(CLASSES, (0.5, 0.6, 0.7)))},
               "volume_iou": {"mean": 0.5, "per_class": dict(zip(CLASSES, (0.4, 0.5, 0.6)))},
               "volume_hd95_mm": {"mean": 4.0, "per_class": dict.fromkeys(CLASSES, 4.0)}}
    test = TestMetrics(dice=0.6, iou=0.5, hd95_mm=4.0,
                       dice_per_class=summary["volume_dice"]["per_class"], summary=summary)
    epochs = [record(1, None), record(2, 0.55), record(3, None), record(4, 0.65)]
    return RunMetrics.summarise(config, epochs, train_slices=8,
                                init_chain=[{"init": "random", "kind": "random"}],
                                test=test if complete else None)


def written(tmp_path: Path, change: Any = None) -> Path:
    """A metrics file as the current code writes it, passed through ``change(data)``."""
    data = sample_metrics(tmp_path).to_json()
    if change is not None:
        change(data)
    path = tmp_path / METRICS_FILE
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def test_metrics_round_trip_keeps_every_value_and_the_key_order(tmp_path: Path) -> None:
    metrics = sample_metrics(tmp_path)
    path = write_run_metrics(tmp_path, metrics)
    assert path == tmp_path / METRICS_FILE
    assert read_run_metrics(path) == metrics
    assert read_run_metrics(tmp_path) == metrics  # a run folder names its file too
    data = json.loads(path.read_text())
    assert list(data) == ["init", "arch", "budget", "budget_unit", "train_slices", "init_chain",
                          "seed", "epochs", "validation", "convergence", "test", "complete",
                          "run_dir", "config", "format_version"]
    assert data["format_version"] == FORMAT_VERSION
    assert list(data["epochs"][0]) == [
        "epoch", "step", "seconds", "train_loss", "lr", "encoder_frozen",
        "train_images_per_s", "validated", "val_dice", "val_iou", "val_dice_per_class",
        "val_slice_dice"]
    assert list(data["test"]) == ["dice", "iou", "hd95_mm", "dice_per_class", "summary"]
    assert data["validation"]["epochs"] == [2, 4]
    # the convergence metrics rest on the validated epochs alone
    assert data["convergence"]["best_epoch"] == 4 and data["convergence"]["best_dice"] == 0.65
    assert data["complete"] and data["run_dir"] == str(tmp_path)
    assert data["config"]["val_every"] == 2
    unfinished = sample_metrics(tmp_path, complete=False)
    assert not unfinished.complete and unfinished.test is None
    assert read_run_metrics(write_run_metrics(tmp_path, unfinished)) == unfinished


def test_a_file_without_format_version_reads_as_version_1(tmp_path: Path) -> None:
    """metrics.json as train_run wrote it before versions were recorded."""
    path = written(tmp_path, lambda data: data.pop("format_version"))
    loaded = read_run_metrics(path)
    assert loaded == sample_metrics(tmp_path) and loaded.format_version == 1
    write_run_metrics(path, loaded)  # rewritten: the version is recorded from now on
    assert json.loads(path.read_text())["format_version"] == FORMAT_VERSION


def _set(key: str, value: Any):
    def change(data: dict[str, Any]) -> None:
        *parents, last = key.split(".")
        for parent in parents:
            data = data[parent][0] if parent == "epochs" else data[parent]
        data[last] = value
    return change


def _drop(key: str):
    def change(data: dict[str, Any]) -> None:
        *parents, last = key.split(".")
        for parent in parents:
            data = data[parent][0] if parent == "epochs" else data[parent]
        del data[last]
    return change


@pytest.mark.parametrize(("change", "message"), [
    (_set("format_version", 2), "format_version 2 is not supported"),
    (_set("format_version", "1"), "format_version '1' is not supported"),
    (_drop("convergence"), "missing key 'convergence'"),
    (_drop("epochs.val_iou"), "missing key 'epochs[0].val_iou'"),
    (_drop("test.summary"), "missing key 'test.summary'"),
    (_drop("validation.every"), "missing key 'validation.every'"),
    (_set("notes", "hand-added"), "unknown key 'notes'"),
    (_set("epochs.val_hd95", 3.0), "unknown key 'epochs[0].val_hd95'"),
    (_set("test.extra", 1), "unknown key 'test.extra'"),
    (_set("epochs", {"1": {}}), "'epochs' must be a JSON list, not dict"),
    (_set("test", [0.5]), "'test' must be a JSON object, not list"),
])
def test_a_file_of_another_layout_is_an_error_naming_file_and_key(
        tmp_path: Path, change: Any, message: str) -> None:
    path = written(tmp_path, change)
    with pytest.raises(ValueError, match="^" + str(path)) as error:
        read_run_metrics(path)
    assert message in str(error.value)


def test_invalid_json_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    path.write_text('{"init": "random", "epochs": [')
    with pytest.raises(ValueError, match=f"^{path}: not valid JSON"):
        read_run_metrics(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"^{path}: the file must be a JSON object, not list"):
        read_run_metrics(path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none" / METRICS_FILE)):
        read_run_metrics(tmp_path / "none" / METRICS_FILE)


def test_row_json_records_its_version_and_the_table_row_does_not(tmp_path: Path) -> None:
    metrics = sample_metrics(tmp_path)
    row = result_row(metrics)
    assert "format_version" not in row  # results.csv and the report's runs table
    assert row["test_dice_LV"] == 0.7 and row["test_iou_MYO"] == 0.5
    assert row["test_hd95_mm_RV"] == 4.0 and row["epochs_to_dice_0.5"] == 2
    assert row["epochs"] == 4 and row["seconds"] == 6.0 and row["best_epoch"] == 4
    write_outputs(tmp_path, metrics)
    on_disk = json.loads((tmp_path / ROW_FILE).read_text())
    assert on_disk == {**row, "format_version": 1} and list(on_disk)[-1] == "format_version"
    assert read_result_row(tmp_path) == row  # the version checked, then dropped
    unversioned = tmp_path / "old" / ROW_FILE
    unversioned.parent.mkdir()
    unversioned.write_text(json.dumps(row, indent=2) + "\n")  # as written before versions
    assert read_result_row(unversioned) == row


@pytest.mark.parametrize(("change", "message"), [
    (lambda row: row.update(format_version=3), "format_version 3 is not supported"),
    (lambda row: row.pop("test_iou"), "missing key 'test_iou'"),
    (lambda row: row.update(val_dice=0.5), "unknown key 'val_dice'"),
    (lambda row: row.update(test_dice_LV=[0.7]), "key 'test_dice_LV' holds a list"),
])
def test_a_row_of_another_layout_is_an_error_naming_file_and_key(
        tmp_path: Path, change: Any, message: str) -> None:
    row = result_row(sample_metrics(tmp_path))
    path = write_result_row(tmp_path, row)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="^" + str(path)) as error:
        read_result_row(path)
    assert message in str(error.value)
    assert set(ROW_COLUMNS) <= set(row)


def test_epochs_csv_leaves_the_cells_of_unvalidated_epochs_empty(tmp_path: Path) -> None:
    lines = epochs_csv(sample_metrics(tmp_path)).splitlines()
    assert lines[0].endswith("val_dice,val_iou,val_slice_dice,val_dice_RV,val_dice_MYO,"
                             "val_dice_LV")
    assert lines[1].endswith(",,,,,,") and lines[2].endswith(",0.55,0.55,0.55")
    assert lines[1].startswith("1,10,1.5,0.001,True,1.0,80.0")
