"""One fine-tuning run: a U-Net on a label budget, validated every epoch.

``fine_tune`` calls its parts in this order, each usable on its own:

- ``prepare_run``: the label-budget subset and the splits, the U-Net with its encoder
  init, the training step and the ``TrainingPlan`` (samples, steps, learning rates);
- ``resume``: an interrupted run's progress from its ``last.pt`` (``run_checkpoint``),
  model and optimizer state restored;
- per epoch ``run_epoch``: ``train_epoch`` (the hot loop: the loss stays on the device
  and is read once per epoch), ``evaluate`` when the epoch is due for validation and
  ``epoch_record``; then ``save_epoch``: best weights, ``last.pt``, ``metrics.json``;
- ``finish_run``: the best epoch's weights on the test split, overlays, ``row.json`` and
  ``epochs.csv``, then ``metrics.json`` marked complete, written last.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from cluster.atomic import atomic_path
from cluster.config import to_dict
from cluster.run_dir import write_run_info
from cluster.storage import join, local_path
from cluster.storage.objects import read_text
from data_prep.label_budgets import budget_subset
from data_prep.labeled_slices import SliceSet, load_slices, require_whole_volumes, slice_patients
from data_prep.manifest import Manifest
from data_prep.segmentation_metrics import SegmentationMetrics
from finetune.config import FinetuneConfig
from finetune.device_data import DeviceSlices, place, place_splits
from finetune.model import build_unet, initialise_encoder, set_encoder_frozen
from finetune.outputs import write_outputs
from finetune.overlays import save_overlay
from finetune.oversampling import epoch_indices, finetune_epoch_samples
from finetune.run_checkpoint import (
    LAST_CHECKPOINT,
    RunCheckpoint,
    load_checkpoint,
    save_checkpoint,
)
from finetune.run_folder import RunFolder
from finetune.run_metrics import (
    EpochRecord,
    RunMetrics,
    TestMetrics,
    write_run_metrics,
)
from finetune.step import FinetuneStep, autocast, build_step
from pretrain.schedules import warmup_cosine

BEST_WEIGHTS = "best.safetensors"
STARTS_FILE = "starts.jsonl"  # one line per time this run began training (fresh or resumed)

EpochCallback = Callable[[EpochRecord], None]


@dataclass
class TrainingPlan:
    """How a run trains, epoch by epoch: the samples and steps of an epoch, each step's
    learning rate, the epochs with a frozen encoder, and the seed of every epoch's order."""

    seed: int
    batch_size: int
    epoch_samples: int  # samples drawn per epoch (a small subset is oversampled)
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr: float
    warmup_start_lr: float
    freeze_encoder_epochs: int

    @classmethod
    def for_run(cls, config: FinetuneConfig, train_slices: int) -> TrainingPlan:
        samples = finetune_epoch_samples(train_slices, config.epoch_samples)
        steps_per_epoch = max(1, samples // config.batch_size)
        return cls(config.seed, config.batch_size, samples, steps_per_epoch,
                   steps_per_epoch * config.epochs, int(config.warmup_epochs * steps_per_epoch),
                   config.lr, config.warmup_start_lr, config.freeze_encoder_epochs)

    @property
    def images_per_epoch(self) -> int:
        return self.steps_per_epoch * self.batch_size

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.lr,
                             start=self.warmup_start_lr)


@dataclass
class PreparedRun:
    """Everything a run trains and evaluates with, built once before its first epoch."""

    config: FinetuneConfig
    device: torch.device
    class_names: list[str]
    train_slices: int  # labeled training slices of the budget
    init_chain: list[dict[str, Any]]
    model: nn.Module  # owns the state that is saved; ``step.forward`` may be compiled
    step: FinetuneStep
    train_data: DeviceSlices
    val_set: SliceSet
    val_data: DeviceSlices
    test_set: SliceSet
    plan: TrainingPlan
    run_dir: Path  # where the run writes: ``config.out``, or its local copy of a URL

    def metrics(self, history: list[EpochRecord], test: TestMetrics | None = None
                ) -> RunMetrics:
        return RunMetrics.summarise(self.config, history, self.train_slices, self.init_chain,
                                    test)


@dataclass
class RunProgress:
    """Where a run stands: its finished epochs, optimizer steps and seconds so far."""

    history: list[EpochRecord] = field(default_factory=list)
    step: int = 0
    elapsed: float = 0.0  # training + validation seconds (the records' ``seconds``)
    best_dice: float = -1.0  # the best validation Dice so far; -1 before any validation


@dataclass
class EpochTraining:
    """What one epoch of training did."""

    train_loss: float  # mean over its steps
    seconds: float
    lr: float  # of its last step
    step: int  # optimizer steps taken by its end
    encoder_frozen: bool


def fine_tune(config: FinetuneConfig, on_epoch: EpochCallback | None = None,
              start_context: dict[str, Any] | None = None,
              folder: RunFolder | None = None) -> RunMetrics:
    """Train, validate each epoch, test the best epoch; return (and write) the metrics.

    A run whose ``metrics.json`` is complete is returned as is; an interrupted run
    resumes from its last saved epoch. ``on_epoch`` receives each epoch's record after
    its checkpoint and ``metrics.json`` are on disk (a sweep reports it to Ray Tune).
    Every start that trains appends a line to ``starts.jsonl`` with ``start_context``
    (who ran it), so a run trained twice is visible. ``config.out`` may be an ``s3://``
    URL: the run then trains in a node-local copy (``folder``, already opened by the
    caller, or opened here) uploaded after every checkpoint.
    """
    if not config.data or not config.out:
        raise ValueError("data and out are required")
    opened_here = folder is None
    folder = folder or RunFolder(config.out)
    done = _completed_metrics(folder, config)
    if done is not None:
        return done
    if not opened_here:
        return _train(config, folder, on_epoch, start_context)
    folder.open()
    try:
        return _train(config, folder, on_epoch, start_context)
    finally:
        folder.close()  # a run in a store: its node-local copy goes


def _train(config: FinetuneConfig, folder: RunFolder, on_epoch: EpochCallback | None,
           start_context: dict[str, Any] | None) -> RunMetrics:
    """``fine_tune``'s training, in the opened ``folder``."""
    run_dir = folder.local
    run = prepare_run(config, run_dir)
    progress = resume(run_dir, run.model, run.step.optimizer)
    if progress is None:
        progress = RunProgress()
    else:
        print(f"resuming from {run_dir / LAST_CHECKPOINT}: epoch {len(progress.history) + 1} "
              f"of {config.epochs}, step {progress.step} of {run.plan.total_steps}", flush=True)
    write_run_info(run_dir, config, {
        "train_slices": run.train_slices, "init_chain": run.init_chain,
        "data_on_device": {"train": run.train_data.resident, "val": run.val_data.resident},
        "compiled": run.step.compiled})
    _log_start(run_dir, len(progress.history), start_context)
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    bar = tqdm(range(len(progress.history), config.epochs), desc=f"finetune {config.label} "
               f"b={config.budget} s={config.seed}", unit="epoch", leave=False,
               disable=not config.progress)
    for epoch in bar:
        record = run_epoch(run, progress, epoch)
        _log_epoch(writer, record)
        if record.val_dice is not None:
            bar.set_postfix(val_dice=f"{record.val_dice:.3f}")
        checkpointed = save_epoch(run, progress, record)
        writer.flush()
        folder.epoch_saved(checkpointed)
        if on_epoch is not None:
            on_epoch(record)
    metrics = finish_run(run, progress, writer)
    folder.finished()
    return metrics


def train_run(config: FinetuneConfig, on_epoch: EpochCallback | None = None,
              start_context: dict[str, Any] | None = None) -> dict[str, Any]:
    """``fine_tune``, returning what ``metrics.json`` holds as plain JSON values (the
    CLI prints it, ``run_grid`` collects it)."""
    return fine_tune(config, on_epoch, start_context).to_json()


def prepare_run(config: FinetuneConfig, run_dir: Path | None = None) -> PreparedRun:
    """The budget's subset and the splits, the U-Net with its encoder init on the device,
    its training step and plan. Seeded by ``config.seed``: the same run gets the same
    subset and initial weights. ``run_dir``: where it writes (default ``config.out``)."""
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available()
                          else "cpu")
    manifest = Manifest.read(config.data)
    torch.manual_seed(config.seed)

    subset = budget_subset(slice_patients(config.data, "train"), config.budget,
                           config.budget_unit, config.seed)
    train_set = load_slices(config.data, "train", subset)
    val_set = load_slices(config.data, "val")
    # read now: a test split unfit for its 3D metrics fails before training, not after
    test_set = require_whole_volumes(load_slices(config.data, "test"), "test")

    model = build_unet(config.arch, 1, manifest.num_classes)
    init_chain = initialise_encoder(model, config.arch, 1, config.encoder_init())
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # the compiled module shares the model's parameters; state is saved from ``model``
    train_step = build_step(model, config, device)
    train_data, val_data = place_splits(train_set, val_set, device, config.device_data_gb)
    return PreparedRun(config, device, manifest.class_names, len(subset), init_chain, model,
                       train_step, train_data, val_set, val_data, test_set,
                       TrainingPlan.for_run(config, len(subset)),
                       run_dir or local_path(config.out))


def resume(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer
           ) -> RunProgress | None:
    """Restore ``model`` and ``optimizer`` from the run's ``last.pt`` and return where
    the run stood then; None (nothing restored) when there is no checkpoint."""
    checkpoint = load_checkpoint(run_dir / LAST_CHECKPOINT)
    if checkpoint is None:
        return None
    model.load_state_dict(checkpoint.model)
    optimizer.load_state_dict(checkpoint.optimizer)
    best = max((e.val_dice for e in checkpoint.history if e.val_dice is not None),
               default=-1.0)
    return RunProgress(checkpoint.history, checkpoint.step, checkpoint.elapsed, best)


def train_epoch(plan: TrainingPlan, step_fn: FinetuneStep, data: DeviceSlices, epoch: int,
                step: int) -> EpochTraining:
    """Train epoch ``epoch`` (0-based), the optimizer having taken ``step`` steps.

    The sample order and the augmentations depend on the seed and the epoch alone, so a
    resumed run trains what an uninterrupted one would. The loss is summed on the device
    and read once, at the end: no host synchronisation per step.
    """
    start = time.perf_counter()
    rng = np.random.default_rng([plan.seed, epoch])
    generator = torch.Generator(device=step_fn.device).manual_seed(plan.seed * 100_003 + epoch)
    order = torch.as_tensor(epoch_indices(np.arange(len(data)), plan.epoch_samples, rng),
                            device=data.index_device())
    step_fn.model.train()
    frozen = epoch < plan.freeze_encoder_epochs
    set_encoder_frozen(step_fn.model, frozen)  # after train(), which resets BatchNorm modes
    loss_sum = torch.zeros((), dtype=torch.float64, device=step_fn.device)
    lr = plan.lr_at(step)
    for batch_start in range(0, plan.images_per_epoch, plan.batch_size):
        lr = plan.lr_at(step)
        loss_sum += step_fn(data, order[batch_start:batch_start + plan.batch_size],
                            generator, lr)
        step += 1
    train_loss = loss_sum.item() / plan.steps_per_epoch
    return EpochTraining(train_loss, time.perf_counter() - start, lr, step, frozen)


def validation_due(config: FinetuneConfig, epoch: int) -> bool:
    """Whether epoch ``epoch`` (0-based) is validated: every ``val_every``-th, and the
    last."""
    return (epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs


def run_epoch(run: PreparedRun, progress: RunProgress, epoch: int) -> EpochRecord:
    """Train epoch ``epoch`` (0-based), validate it when due, and add its record to
    ``progress`` (steps and seconds too)."""
    trained = train_epoch(run.plan, run.step, run.train_data, epoch, progress.step)
    started = time.perf_counter()
    val = None
    if validation_due(run.config, epoch):
        val = evaluate(run.step.forward, run.val_data, run.val_set, run.class_names,
                       run.device, run.config.val_batch_size).summary(hd95=False)
    progress.step = trained.step
    progress.elapsed += trained.seconds + (time.perf_counter() - started)
    record = epoch_record(epoch + 1, trained, progress.elapsed, run.plan.images_per_epoch,
                          val)
    progress.history.append(record)
    return record


def epoch_record(epoch: int, trained: EpochTraining, elapsed: float, images: int,
                 val: dict[str, Any] | None) -> EpochRecord:
    """The record of epoch ``epoch`` (1-based): its training, ``images`` trained on, the
    run's seconds so far, and ``val`` (a validation summary; None: not validated, every
    validation field None)."""
    if val is None:
        validation: dict[str, Any] = {
            "validated": False, "val_dice": None, "val_iou": None,
            "val_dice_per_class": None, "val_slice_dice": None}
    else:
        # the volume Dice selects the best epoch; a NaN (no foreground at all in the
        # validation split) counts as 0 so that selection stays defined
        validation = {"validated": True, "val_dice": val["volume_dice"]["mean"] or 0.0,
                      "val_iou": val["volume_iou"]["mean"],
                      "val_dice_per_class": val["volume_dice"]["per_class"],
                      "val_slice_dice": val["slice_dice"]["mean"]}
    return EpochRecord(epoch=epoch, step=trained.step, seconds=round(elapsed, 3),
                       train_loss=trained.train_loss, lr=trained.lr,
                       encoder_frozen=trained.encoder_frozen,
                       train_images_per_s=round(images / trained.seconds, 2), **validation)


def save_epoch(run: PreparedRun, progress: RunProgress, record: EpochRecord) -> bool:
    """What an epoch leaves on disk: the best weights when its validation beat every
    earlier one, ``last.pt`` every ``checkpoint_every`` epochs, and ``metrics.json``
    (not complete yet). Whether it saved ``last.pt``."""
    if record.val_dice is not None and record.val_dice > progress.best_dice:
        progress.best_dice = record.val_dice
        _save_weights(run.model, run.run_dir / BEST_WEIGHTS)
    every = run.config.checkpoint_every
    checkpointed = bool(every) and record.epoch % every == 0
    if checkpointed:
        save_checkpoint(run.run_dir / LAST_CHECKPOINT, RunCheckpoint(
            run.model.state_dict(), run.step.optimizer.state_dict(), progress.history,
            progress.step, progress.elapsed))
    write_run_metrics(run.run_dir, run.metrics(progress.history))
    return checkpointed


def finish_run(run: PreparedRun, progress: RunProgress, writer: SummaryWriter) -> RunMetrics:
    """Test the best epoch's weights, draw the overlays, write ``row.json`` and
    ``epochs.csv``, then ``metrics.json`` marked complete (last: it marks the run
    complete) and drop ``last.pt``."""
    run_dir = run.run_dir
    run.model.load_state_dict(safetensors.torch.load_file(str(run_dir / BEST_WEIGHTS)))
    test = summarise_test(evaluate(run.step.forward, place(run.test_set, run.device, 0),
                                   run.test_set, run.class_names, run.device,
                                   run.config.val_batch_size).summary())
    for name, value in (("dice", test.dice), ("iou", test.iou), ("hd95_mm", test.hd95_mm)):
        if value is not None:
            writer.add_scalar(f"test/{name}", value, len(progress.history))
    writer.close()
    _write_overlays(run.model, run.val_set, run.class_names, run_dir / "overlays", run.device,
                    run.config.overlays)
    metrics = run.metrics(progress.history, test)
    write_outputs(run_dir, metrics)
    write_run_metrics(run_dir, metrics)  # last: it marks the run complete
    (run_dir / LAST_CHECKPOINT).unlink(missing_ok=True)
    return metrics


def summarise_test(summary: dict[str, Any]) -> TestMetrics:
    """The test block of a run from ``SegmentationMetrics.summary()`` on the test split."""
    return TestMetrics(dice=summary["volume_dice"]["mean"], iou=summary["volume_iou"]["mean"],
                       hd95_mm=summary["volume_hd95_mm"]["mean"],
                       dice_per_class=summary["volume_dice"]["per_class"], summary=summary)


def predict(model: nn.Module, data: DeviceSlices, device: torch.device,
            batch_size: int) -> torch.Tensor:
    """Class-id predictions (N, H, W) uint8 on the host, in bf16 on CUDA.

    Every batch has ``batch_size`` rows (the last one padded by repeating its first
    index), so a compiled model sees one shape; predictions stay on the device until the
    end: one copy back, no synchronisation per batch.
    """
    model.eval()
    count, outputs = len(data), []
    index = torch.arange(count, device=data.index_device())
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            rows = index[start:start + batch_size]
            padded = torch.cat([rows, rows[:1].expand(batch_size - len(rows))])
            images = data.images_at(padded)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                outputs.append(model(images).argmax(dim=1)[:len(rows)].to(torch.uint8))
    return torch.cat(outputs).cpu()


def evaluate(model: nn.Module, data: DeviceSlices, slices: SliceSet, class_names: list[str],
             device: torch.device, batch_size: int) -> SegmentationMetrics:
    """Volume and slice metrics of ``model`` on ``data`` (``slices``: its metadata)."""
    metrics = SegmentationMetrics(len(class_names), class_names)
    prediction = predict(model, data, device, batch_size)
    metrics.update(prediction.long().numpy(), slices.masks.numpy(), slices.volumes,
                   slices.positions, slices.spacing)
    return metrics


def _completed_metrics(folder: RunFolder, config: FinetuneConfig) -> RunMetrics | None:
    """The run's metrics if it is complete where it lives (for a URL: in the store)."""
    metrics = folder.stored_metrics()
    if metrics is None or not metrics.complete:
        return None
    # a run finished before a config key existed recorded no value for it: the default
    if {**to_dict(FinetuneConfig()), **metrics.config} != to_dict(config):
        raise ValueError(f"{folder.out} holds a finished run with another config; "
                         "choose another out folder")
    return metrics


def _log_start(run_dir: Path, resume_epoch: int, context: dict[str, Any] | None) -> None:
    """Append one line to the run's start log (O_APPEND: whole lines, never rewritten)."""
    line = {"time": round(time.time(), 3), "host": socket.gethostname(), "pid": os.getpid(),
            "resume_epoch": resume_epoch, **(context or {})}
    with open(run_dir / STARTS_FILE, "a", encoding="utf-8") as log:
        log.write(json.dumps(line) + "\n")


def read_starts(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's start log (in a folder or an object store): one dict per time it began
    training."""
    try:
        text = read_text(join(run_dir, STARTS_FILE))
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _save_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(state, str(tmp))


def _log_epoch(writer: SummaryWriter, record: EpochRecord) -> None:
    epoch = record.epoch
    writer.add_scalar("train/loss", record.train_loss, epoch)
    writer.add_scalar("train/lr", record.lr, epoch)
    writer.add_scalar("train/encoder_frozen", float(record.encoder_frozen), epoch)
    writer.add_scalar("perf/images_per_s", record.train_images_per_s, epoch)
    if record.val_dice is None:  # not a validation epoch (val_every)
        return
    writer.add_scalar("val/dice", record.val_dice, epoch)
    for key, value in (("val/iou", record.val_iou), ("val/slice_dice", record.val_slice_dice)):
        if value is not None:
            writer.add_scalar(key, value, epoch)
    for name, value in (record.val_dice_per_class or {}).items():
        if value is not None:
            writer.add_scalar(f"val/dice_{name}", value, epoch)


def _write_overlays(model: nn.Module, slices: SliceSet, class_names: list[str], folder: Path,
                    device: torch.device, count: int) -> None:
    if count <= 0:
        return
    foreground = (slices.masks > 0).flatten(1).sum(1)
    chosen = torch.argsort(foreground, descending=True)[:count]
    predictions = predict(model, DeviceSlices.images_only(slices.images[chosen], device),
                          device, len(chosen))
    for rank, (index, prediction) in enumerate(zip(chosen.tolist(), predictions)):
        save_overlay(folder / f"{rank:02d}_{slices.volumes[index]}.png",
                     slices.images[index, 0].numpy(), slices.masks[index].numpy(),
                     prediction.numpy(), class_names)
