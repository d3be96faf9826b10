"""The parts of a fine-tuning run on their own, on a tiny stand-in model: resume, one
epoch of training, the epoch record, what an epoch leaves on disk, the test block.
The whole loop on real data is in test_finetune.py (slow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from finetune.config import FinetuneConfig
from finetune.device_data import DeviceSlices
from finetune.run_checkpoint import (
    LAST_CHECKPOINT,
    RunCheckpoint,
    load_checkpoint,
    save_checkpoint,
)
from finetune.run_metrics import METRICS_FILE, EpochRecord, read_run_metrics
from finetune.train import (
    BEST_WEIGHTS,
    EpochTraining,
    PreparedRun,
    RunProgress,
    TrainingPlan,
    epoch_record,
    resume,
    save_epoch,
    summarise_test,
    train_epoch,
    validation_due,
)

CPU = torch.device("cpu")


class TinyUNet(nn.Module):
    """An encoder and a decoder, as set_encoder_frozen expects of the U-Net."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        self.decoder = nn.Linear(3, 2)


class RecordingStep:
    """Stands in for FinetuneStep: records each call, returns a known loss."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.device = model, CPU
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.calls: list[tuple[list[int], float]] = []

    def __call__(self, data: DeviceSlices, index: torch.Tensor, generator: torch.Generator,
                 lr: float) -> torch.Tensor:
        self.calls.append((index.tolist(), lr))
        return torch.tensor(float(len(self.calls)))


def _record(epoch: int, dice: float | None) -> EpochRecord:
    return EpochRecord(epoch=epoch, step=5 * epoch, seconds=2.0 * epoch, train_loss=0.5,
                       lr=1e-3, encoder_frozen=False, train_images_per_s=10.0,
                       validated=dice is not None, val_dice=dice, val_iou=dice,
                       val_dice_per_class=None if dice is None else {"LV": dice},
                       val_slice_dice=dice)


def _trained_model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyUNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):  # Adam state (moments, step counts) worth restoring
        optimizer.zero_grad()
        model.decoder(model.encoder(torch.randn(6, 4))).square().mean().backward()
        optimizer.step()
    return model, optimizer


def test_resume_restores_exactly_what_the_checkpoint_held(tmp_path: Path) -> None:
    assert resume(tmp_path, *_trained_model_and_optimizer()) is None  # nothing to resume
    model, optimizer = _trained_model_and_optimizer()
    history = [_record(1, None), _record(2, 0.4), _record(3, 0.3)]
    save_checkpoint(tmp_path / LAST_CHECKPOINT, RunCheckpoint(
        model.state_dict(), optimizer.state_dict(), history, step=15, elapsed=6.25))

    torch.manual_seed(1)
    fresh = TinyUNet()
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    progress = resume(tmp_path, fresh, fresh_optimizer)
    assert progress == RunProgress(history, step=15, elapsed=6.25, best_dice=0.4)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    restored, saved = fresh_optimizer.state_dict(), optimizer.state_dict()
    assert restored["param_groups"] == saved["param_groups"]
    for key, state in saved["state"].items():
        for name, value in state.items():
            assert torch.equal(restored["state"][key][name], value), (key, name)


def test_a_checkpoint_without_a_key_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / LAST_CHECKPOINT
    torch.save({"model": {}, "optimizer": {}, "history": [], "step": 3}, path)
    with pytest.raises(ValueError, match=f"^{path}: missing key 'elapsed'"):
        load_checkpoint(path)
    torch.save({"model": {}, "optimizer": {}, "history": [{"epoch": 1}], "step": 3,
                "elapsed": 1.0}, path)
    with pytest.raises(ValueError, match=r"missing key 'history\[0\]\.step'"):
        load_checkpoint(path)
    torch.save({"model": {}, "optimizer": {}, "history": {"epoch": 1}, "step": 3,
                "elapsed": 1.0}, path)
    with pytest.raises(ValueError, match=f"^{path}: key 'history' holds a dict"):
        load_checkpoint(path)
    path.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match=f"^{path}: unreadable fine-tuning checkpoint"):
        load_checkpoint(path)


def _plan(**changes: Any) -> TrainingPlan:
    values = dict(seed=3, batch_size=4, epoch_samples=12, steps_per_epoch=3, total_steps=30,
                  warmup_steps=2, lr=1e-2, warmup_start_lr=0.0, freeze_encoder_epochs=1)
    return TrainingPlan(**{**values, **changes})


def test_the_plan_follows_the_config() -> None:
    config = FinetuneConfig(epochs=10, batch_size=4, epoch_samples=12, warmup_epochs=0.5,
                            lr=1e-2, seed=3, freeze_encoder_epochs=1)
    assert TrainingPlan.for_run(config, train_slices=5) == _plan(warmup_steps=1)
    # a subset larger than epoch_samples is seen whole each epoch
    assert TrainingPlan.for_run(config, train_slices=30).steps_per_epoch == 7
    assert [e for e in range(7) if validation_due(FinetuneConfig(epochs=7, val_every=3), e)] \
        == [2, 5, 6]


def test_one_epoch_of_training_on_its_own() -> None:
    plan = _plan()
    data = DeviceSlices(torch.zeros(5, 1, 2, 2), torch.zeros(5, 2, 2, dtype=torch.uint8), CPU)
    step_fn = RecordingStep(TinyUNet())
    trained = train_epoch(plan, step_fn, data, epoch=0, step=7)
    # 3 steps of 4 samples: the 5 slices tiled to 12, each seen 2 or 3 times
    indices = [i for batch, _ in step_fn.calls for i in batch]
    assert [len(batch) for batch, _ in step_fn.calls] == [4, 4, 4]
    assert sorted(indices.count(i) for i in range(5)) == [2, 2, 2, 3, 3]
    assert [lr for _, lr in step_fn.calls] == [plan.lr_at(s) for s in (7, 8, 9)]
    assert trained.step == 10 and trained.lr == plan.lr_at(9)
    assert trained.train_loss == pytest.approx((1 + 2 + 3) / 3) and trained.seconds > 0
    assert trained.encoder_frozen  # epoch 0 < freeze_encoder_epochs
    model = step_fn.model
    assert model.training and not model.encoder[1].training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    # the order depends on the seed and the epoch alone: a resumed run repeats it
    again = RecordingStep(TinyUNet())
    assert train_epoch(plan, again, data, epoch=0, step=7).encoder_frozen
    assert again.calls == step_fn.calls
    later = RecordingStep(TinyUNet())
    assert not train_epoch(plan, later, data, epoch=1, step=10).encoder_frozen
    assert later.calls != step_fn.calls
    assert all(p.requires_grad for p in later.model.encoder.parameters())


def test_the_record_of_an_epoch_that_was_not_validated() -> None:
    trained = EpochTraining(train_loss=0.25, seconds=2.0, lr=1e-3, step=40,
                            encoder_frozen=False)
    record = epoch_record(3, trained, elapsed=7.12345, images=64, val=None)
    assert record == EpochRecord(
        epoch=3, step=40, seconds=7.123, train_loss=0.25, lr=1e-3, encoder_frozen=False,
        train_images_per_s=32.0, validated=False, val_dice=None, val_iou=None,
        val_dice_per_class=None, val_slice_dice=None)
    val = {"volume_dice": {"mean": None, "per_class": {"LV": None}},
           "volume_iou": {"mean": None}, "slice_dice": {"mean": 0.1}}
    validated = epoch_record(4, trained, elapsed=9.0, images=64, val=val)
    # no foreground anywhere: the Dice that selects the best epoch counts as 0
    assert validated.validated and validated.val_dice == 0.0
    assert validated.val_dice_per_class == {"LV": None} and validated.val_slice_dice == 0.1


def test_an_epoch_leaves_best_weights_checkpoint_and_metrics(tmp_path: Path) -> None:
    config = FinetuneConfig(data="/data/x", out=str(tmp_path), epochs=4, checkpoint_every=2)
    model, optimizer = _trained_model_and_optimizer()
    step_fn = RecordingStep(model)
    step_fn.optimizer = optimizer
    run = PreparedRun(config, CPU, ["LV"], 5, [{"init": "random", "kind": "random"}], model,
                      step_fn, None, None, None, None, _plan(), tmp_path)  # type: ignore[arg-type]
    progress = RunProgress()
    for epoch, dice in ((1, 0.5), (2, 0.4)):
        progress.history.append(_record(epoch, dice))
        progress.step, progress.elapsed = 5 * epoch, 2.0 * epoch
        if epoch == 2:
            assert not (tmp_path / LAST_CHECKPOINT).exists()  # checkpoint_every=2
            best = (tmp_path / BEST_WEIGHTS).stat()
        save_epoch(run, progress, progress.history[-1])
    assert progress.best_dice == 0.5  # epoch 2 did not beat epoch 1: weights kept
    kept = (tmp_path / BEST_WEIGHTS).stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (best.st_ino, best.st_mtime_ns)
    checkpoint = load_checkpoint(tmp_path / LAST_CHECKPOINT)
    assert checkpoint is not None and checkpoint.history == progress.history
    assert (checkpoint.step, checkpoint.elapsed) == (10, 4.0)
    metrics = read_run_metrics(tmp_path / METRICS_FILE)
    assert not metrics.complete and metrics.epochs == progress.history
    assert metrics.convergence is not None and metrics.convergence["best_epoch"] == 1
    assert json.loads((tmp_path / METRICS_FILE).read_text())["test"] is None


def test_the_test_block_comes_from_the_volume_metrics() -> None:
    summary = {"volume_dice": {"mean": 0.7, "per_class": {"LV": 0.7}},
               "volume_iou": {"mean": 0.6}, "volume_hd95_mm": {"mean": None}}
    test = summarise_test(summary)
    assert (test.dice, test.iou, test.hd95_mm, test.dice_per_class) == (0.7, 0.6, None,
                                                                       {"LV": 0.7})
    assert test.summary is summary
