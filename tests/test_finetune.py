"""Fine-tuning runs end to end on the phantom: curves, outputs, CLI, determinism, resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import finetune.train as train_module
from finetune.config import FinetuneConfig
from finetune.outputs import EPOCHS_FILE, read_result_row
from finetune.run_checkpoint import LAST_CHECKPOINT
from finetune.run_metrics import read_run_metrics
from finetune.train import train_run

REPO = Path(__file__).resolve().parents[1]
# every test here fine-tunes for real (tens of seconds each on 2 cores)
pytestmark = pytest.mark.slow


def small_config(prepared: Path, out: Path, **overrides: object) -> FinetuneConfig:
    values = dict(data=str(prepared), out=str(out), arch="resnet18", budget=0, seed=0,
                  epochs=6, batch_size=8, lr=3e-3, warmup_epochs=0.5, device="cpu",
                  progress=False, overlays=1)
    return FinetuneConfig(**{**values, **overrides})


def first_epoch_reaching(curve: list[float], threshold: float) -> int | None:
    return next((epoch for epoch, dice in enumerate(curve, 1) if dice >= threshold), None)


@pytest.mark.parametrize("init", ["random", "ssl"])
def test_short_finetune_produces_complete_curves_and_outputs(
        prepared: Path, pretrain_run: Path, tmp_path: Path, init: str) -> None:
    out = tmp_path / init
    config = small_config(prepared, out,
                          init="random" if init == "random" else str(pretrain_run / "export"))
    metrics = train_run(config)
    assert metrics["complete"]
    epochs = metrics["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, 7))
    for record in epochs:  # every epoch is complete: loss, lr, validation scores per class
        assert record["train_loss"] > 0 and record["lr"] > 0 and record["val_iou"] is not None
        assert record["train_images_per_s"] > 0
        assert set(record["val_dice_per_class"]) == {"RV", "MYO", "LV"}
    # An all-background prediction scores 0 Dice on every foreground class.
    assert metrics["test"]["dice"] > 0.3, metrics["test"]
    assert metrics["test"]["hd95_mm"] is not None and metrics["test"]["hd95_mm"] > 0

    # The convergence metrics are those of the run's own curve, computed by hand here.
    curve = [e["val_dice"] for e in epochs]
    best = max(curve)
    convergence = metrics["convergence"]
    assert convergence["best_dice"] == best
    assert convergence["best_epoch"] == curve.index(best) + 1
    for tag, fraction in (("95", 0.95), ("99", 0.99)):
        epoch = first_epoch_reaching(curve, fraction * best)
        assert convergence[f"epochs_to_{tag}pct"] == epoch
        assert convergence[f"steps_to_{tag}pct"] == epochs[epoch - 1]["step"]
        assert convergence[f"seconds_to_{tag}pct"] == epochs[epoch - 1]["seconds"]
    assert convergence["epochs_to_dice"] == {
        f"{t:g}": first_epoch_reaching(curve, t) for t in config.dice_targets}
    assert convergence["normalised_auc"] == pytest.approx(sum(curve) / len(curve))

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"] == metrics["test"]
    assert read_run_metrics(out).to_json() == saved  # the strict reader takes what is written
    row = read_result_row(out)
    assert (row["init"], row["budget"], row["seed"], row["epochs"]) == \
        (config.label, 0, 0, 6)
    assert row["test_dice"] == metrics["test"]["dice"]
    assert row["epochs_to_95pct"] == convergence["epochs_to_95pct"]
    with (out / EPOCHS_FILE).open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["val_dice"]) for r in rows] == pytest.approx(curve)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/dice")] == list(range(1, 7))
    assert [e.value for e in events.Scalars("val/dice")] == pytest.approx(curve)
    assert len(events.Scalars("test/dice")) == 1
    assert len(events.Scalars("perf/images_per_s")) == 6
    assert len(list((out / "overlays").glob("*.png"))) == 1
    assert (out / "config.yaml").read_text().startswith("data:")
    chain = json.loads((out / "run_info.json").read_text())["init_chain"]
    assert chain[0]["kind"] == ("random" if init == "random" else "export")
    assert not (out / LAST_CHECKPOINT).exists()
    assert train_run(config) == saved  # a finished run is not repeated


def test_interrupted_run_resumes_to_the_uninterrupted_result(
        prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """On CPU a run is deterministic for its seed: one killed in epoch 3 and resumed
    ends exactly where an uninterrupted one does."""
    def fine_tune(out: Path) -> dict:
        return train_run(small_config(prepared, out, epochs=3, budget=2,
                                      budget_unit="patients", freeze_encoder_epochs=1,
                                      optimizer="adam", loss="jaccard"))

    reference = fine_tune(tmp_path / "reference")
    assert [e["encoder_frozen"] for e in reference["epochs"]] == [True, False, False]

    real_evaluate, calls, fail_at = train_module.evaluate, [], [3]

    def failing_evaluate(*args: object, **kwargs: object):
        calls.append(1)
        if len(calls) == fail_at[0]:
            raise KeyboardInterrupt  # the run dies in epoch 3, after its epoch-2 checkpoint
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", failing_evaluate)
    with pytest.raises(KeyboardInterrupt):
        fine_tune(tmp_path / "resumed")
    partial = read_run_metrics(tmp_path / "resumed")
    assert len(partial.epochs) == 2 and not partial.complete
    calls.clear()
    fail_at[0] = 0  # never again
    capsys.readouterr()
    resumed = fine_tune(tmp_path / "resumed")
    assert len(calls) == 2  # resumed in epoch 3: its validation, then the test split
    assert f"resuming from {tmp_path / 'resumed' / 'last.pt'}: epoch 3 of 3" in \
        capsys.readouterr().out

    def curve(metrics: dict) -> list[tuple]:
        return [(e["train_loss"], e["val_dice"], e["step"]) for e in metrics["epochs"]]

    assert curve(resumed) == curve(reference)
    assert resumed["test"]["dice"] == reference["test"]["dice"]
    assert resumed["train_slices"] == reference["train_slices"]


def test_cli_trains_one_budget(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "finetune", "train", "--data", str(prepared), "--out", str(out),
         "--arch", "resnet18", "--init", "random", "--budget", "3", "--seed", "1",
         "epochs=2", "batch_size=4", "device=cpu", "progress=false", "overlays=0"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["test"]["dice"] is not None
    row = read_result_row(out)
    assert (row["budget"], row["train_slices"], row["seed"], row["epochs"]) == (3, 3, 1, 2)

    too_many = subprocess.run(
        [sys.executable, "-m", "finetune", "train", "--data", str(prepared), "--out",
         str(tmp_path / "bad"), "--budget", "100000", "device=cpu", "progress=false"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert too_many.returncode != 0
    assert "exceeds the 'train' split" in too_many.stderr


def test_validation_every_k_epochs_leaves_training_unchanged(prepared: Path,
                                                              tmp_path: Path) -> None:
    """val_every=2 validates epochs 2 and 4 (and the last); training is the same as with
    every epoch validated, and the convergence metrics use the validated epochs alone."""
    def fine_tune(out: Path, **overrides: object) -> dict:
        return train_run(small_config(prepared, out, epochs=5, budget=3, overlays=0,
                                      **overrides))

    every = fine_tune(tmp_path / "every")
    sparse = fine_tune(tmp_path / "sparse", val_every=2, val_batch_size=5)
    assert [e["train_loss"] for e in sparse["epochs"]] == \
        [e["train_loss"] for e in every["epochs"]]
    assert [e["validated"] for e in sparse["epochs"]] == [False, True, False, True, True]
    assert sparse["validation"]["epochs"] == [2, 4, 5]
    # validation batches of 5 (the last padded) predict what batches of 64 predict
    for epoch in (2, 4, 5):
        assert sparse["epochs"][epoch - 1]["val_dice"] == every["epochs"][epoch - 1]["val_dice"]
    assert sparse["epochs"][0]["val_dice"] is None
    curve = [sparse["epochs"][e - 1]["val_dice"] for e in (2, 4, 5)]
    convergence = sparse["convergence"]
    assert convergence["best_epoch"] == (2, 4, 5)[curve.index(max(curve))]
    assert convergence["epochs_to_95pct"] in (2, 4, 5)
    # each validated Dice stands for the epochs since the previous validation: 2, 2, 1
    assert convergence["normalised_auc"] == pytest.approx(
        (2 * curve[0] + 2 * curve[1] + curve[2]) / 5)
    with (tmp_path / "sparse" / EPOCHS_FILE).open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["val_dice"] == "" for r in rows] == [True, False, True, False, False]
    events = EventAccumulator(str(tmp_path / "sparse" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/dice")] == [2, 4, 5]
    assert len(events.Scalars("train/loss")) == 5
    info = json.loads((tmp_path / "sparse" / "run_info.json").read_text())
    assert info["data_on_device"] == {"train": True, "val": True}
    assert info["compiled"] is False  # compile defaults to off on the CPU
