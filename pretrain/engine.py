"""The pretraining loop: one process per device, DDP across processes and nodes.

A run starts fresh or resumes from its latest checkpoint (``start_or_resume``), then
``EpochLoop`` takes the optimizer steps. After each one ``StepLogger``
(``pretrain.train_log``) logs it, ``CheckpointSaver`` saves the run when a checkpoint is
due, and the live probe runs when it is due. Each loss is checked for being finite one
step late (``DeferredLossCheck``), so the host does not wait for the device inside the loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from cluster.config import to_dict
from cluster.distributed import DistInfo, barrier, init_distributed, shutdown
from cluster.run_dir import write_run_info
from data_prep.manifest import Manifest
from pretrain.augment import augment_view
from pretrain.backends import Backend, build_backend
from pretrain.batching import BatchPlan, plan_batches
from pretrain.checkpoint import (
    CHECKPOINT_DIR,
    LATEST,
    gather_rng,
    kept_checkpoint_name,
    load_latest,
    restore_rng,
    save_checkpoint,
    shard_files,
    shard_folder_name,
)
from pretrain.checkpoint_state import PretrainCheckpoint
from pretrain.config import PretrainConfig
from pretrain.data import pretrain_epoch_samples
from pretrain.epoch_loader import EpochReading, open_epoch
from pretrain.export import EXPORT_DIR, export_backbone
from pretrain.methods import SSLMethod
from pretrain.model import build_model
from pretrain.optim import build_pretrain_optimizer
from pretrain.probe import SegmentationProbe, check_probe_data
from pretrain.probe_log import PROBE_FILE, ProbeLog, probe_summary, read_probe_log
from pretrain.run_storage import RunStorage
from pretrain.schedules import ema_momentum, warmup_cosine
from pretrain.step import check_finite
from pretrain.sync_batchnorm import convert_sync_batchnorm
from pretrain.train_log import StepLogger


@dataclass
class PretrainResult:
    run_dir: Path
    export_dir: Path
    steps: int
    final_loss: float


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Run (or resume) pretraining as described by ``config``; return the export folder."""
    if not config.run.out:
        raise ValueError("run.out: a run directory is required")
    if not config.data.path:
        raise ValueError("data.path: a prepared dataset folder is required")
    manifest = Manifest.read(config.data.path)  # fails fast on a folder that is not one
    if manifest.channels != config.model.in_chans:
        raise ValueError(f"model.in_chans is {config.model.in_chans} but {config.data.path} "
                         f"holds {manifest.channels}-channel images")
    check_probe_data(config, manifest)
    dist_info = init_distributed(prefer_cuda=config.run.device == "auto",
                                 timeout_s=config.run.dist_timeout_s)
    try:
        storage = RunStorage(config.run.out, config.run.local_dir)
        return _train(config, dist_info, storage)
    finally:
        shutdown(dist_info)


def _train(config: PretrainConfig, dist: DistInfo, storage: RunStorage) -> PretrainResult:
    run_dir = storage.open(dist)  # a run in an object store: its node-local copy
    plan = plan_batches(config, dist.world_size, pretrain_epoch_samples(
        config.data.path, config.data.epoch_samples, config.data.resampled))
    torch.manual_seed(config.run.seed + dist.rank)
    backend, start = start_or_resume(config, dist, plan, run_dir)
    probe = (_LiveProbe(config, dist, run_dir, plan.steps_per_epoch, backend.method)
             if config.probe.enabled else None)
    writer = None
    if dist.is_main:
        write_run_info(run_dir, config, {
            "world_size": dist.world_size, "global_batch": plan.global_batch,
            "micro_batch_per_rank": plan.micro_batch, "grad_accum": plan.grad_accum,
            "peak_lr": plan.peak_lr, "resumed_at_step": start.step})
        writer = SummaryWriter(str(run_dir / "tensorboard"))
    loop = EpochLoop(config, dist, plan, backend, start, run_dir=run_dir, writer=writer,
                     probe=probe, storage=storage)
    loop.run()
    export_dir = run_dir / EXPORT_DIR
    if dist.is_main:
        # a finished run resumed with a smaller optim.epochs trains no further
        export_backbone(backend.method.online_encoder, export_dir, config,
                        epochs=max(start.epoch, config.optim.epochs), steps=loop.step,
                        probe=probe_summary(read_probe_log(run_dir / PROBE_FILE)))
        if writer is not None:
            writer.close()
    storage.finished(dist)
    return PretrainResult(run_dir, export_dir, loop.step, loop.losses.value)


# --- where training starts ----------------------------------------------------------


@dataclass(frozen=True)
class ResumePoint:
    """Where a process starts training: in epoch ``epoch`` after its first ``first_step``
    optimizer steps, ``step`` steps into the run; ``stretches`` are the loader stretches
    the checkpoint recorded for that epoch. All zero for a fresh run."""

    epoch: int = 0
    step: int = 0
    first_step: int = 0
    stretches: list[dict] = field(default_factory=list)


def resume_point(checkpoint: PretrainCheckpoint | None, plan: BatchPlan) -> ResumePoint:
    """Where to continue from ``checkpoint`` with this start's batching ``plan``."""
    if checkpoint is None:
        return ResumePoint()
    return ResumePoint(epoch=checkpoint.epoch, step=checkpoint.step,
                       first_step=_resume_step(checkpoint, plan),
                       stretches=checkpoint.loader_stretches)


def _resume_step(checkpoint: PretrainCheckpoint, plan: BatchPlan) -> int:
    """Optimizer steps of the checkpoint's epoch to skip: exactly its position when the
    batching is unchanged, else as many as its consumed samples fill (elastic restart)."""
    saved_batch = plan.global_batch if checkpoint.global_batch is None \
        else checkpoint.global_batch
    if (checkpoint.world_size, saved_batch, checkpoint.grad_accum) == \
            (plan.world_size, plan.global_batch, plan.grad_accum):
        return checkpoint.position
    return plan.resume_point(checkpoint.position * saved_batch)


def start_or_resume(config: PretrainConfig, dist: DistInfo, plan: BatchPlan,
                    run_dir: Path) -> tuple[Backend, ResumePoint]:
    """The run's method, optimizer and backend, fresh or restored from its latest
    checkpoint (weights, optimizer state or shards, every rank's generator states), and
    where training starts."""
    device = dist.device
    checkpoint = load_latest(run_dir)
    model = build_model(config, initialise=checkpoint is None).to(device)
    if dist.distributed and config.run.sync_batchnorm:
        # BatchNorm over the global batch: PyTorch's SyncBatchNorm on CUDA, ours elsewhere
        converted = convert_sync_batchnorm(model, device.type)
        assert converted is model  # only a BatchNorm root is replaced, and a method is none
    optimizer = build_pretrain_optimizer(config.optim.name, model, lr=plan.peak_lr,
                                         weight_decay=config.optim.weight_decay,
                                         momentum=config.optim.momentum, eta=config.optim.eta,
                                         trust_ratio=config.optim.trust_ratio,
                                         clip_lr=config.optim.clip_lr)
    if checkpoint is not None:
        _check_resumable(checkpoint, config, run_dir)
        model.load_state_dict(checkpoint.model)  # before any backend copies it
    backend = build_backend(
        config.run.backend, model, optimizer, dist, micro_batch=plan.micro_batch,
        grad_accum=plan.grad_accum, zero_stage=config.run.zero_stage,
        precision=config.run.precision,
        channels_last=device.type == "cuda" and config.run.channels_last,
        compile=config.run.compile)
    start = resume_point(checkpoint, plan)
    if checkpoint is not None:
        _restore_optimizer(backend, checkpoint, config, run_dir)
        restore_rng(checkpoint.rng, dist.rank, dist.world_size)
        if dist.is_main:  # a resumed run says so, progress bars or not
            epochs = config.optim.epochs
            print(f"resuming from {run_dir / CHECKPOINT_DIR / LATEST}: epoch "
                  f"{min(start.epoch + 1, epochs)} of {epochs}, "
                  f"step {start.step} of {plan.steps_per_epoch * epochs}", flush=True)
    return backend, start


def _check_resumable(checkpoint: PretrainCheckpoint, config: PretrainConfig,
                     run_dir: Path) -> None:
    saved, current = checkpoint.config, to_dict(config)
    pairs = {"model": (saved.get("model"), current["model"]),
             "method": (saved.get("method"), current["method"]),
             "optim.name": (saved.get("optim", {}).get("name"), current["optim"]["name"])}
    for key, (before, now) in pairs.items():
        if before != now:
            raise ValueError(f"{run_dir}: its checkpoint was made with another {key} "
                             f"({before}, now {now}); use a new run.out")


def _restore_optimizer(backend: Backend, checkpoint: PretrainCheckpoint,
                       config: PretrainConfig, run_dir: Path) -> None:
    if bool(checkpoint.zero_shards) != backend.sharded_optimizer:
        saved_run = checkpoint.config.get("run", {})
        raise ValueError(
            f"{run_dir}: its checkpoint keeps the optimizer state "
            f"{'sharded' if checkpoint.zero_shards else 'whole'} (run.backend="
            f"{saved_run.get('backend', 'ddp')}, run.zero_stage={saved_run.get('zero_stage', 0)}"
            f"), which run.backend={config.run.backend}, run.zero_stage="
            f"{config.run.zero_stage} cannot load; resume with the same settings")
    if backend.sharded_optimizer:
        backend.load_shards(shard_files(run_dir, checkpoint))
    elif checkpoint.optimizer is None:
        raise ValueError(f"{run_dir / CHECKPOINT_DIR / LATEST}: holds no optimizer state to "
                         "resume from; use a new run.out")
    else:
        backend.load_optimizer_state(checkpoint.optimizer)


# --- the steps ----------------------------------------------------------------------


class DeferredLossCheck:
    """Each step's loss, checked to be finite one step late: reading a loss waits for the
    device, and by then the next step is already queued. ``value`` is the last loss read
    (by a log, a checkpoint or the end of an epoch)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        # the last loss and its step, not yet read from the device
        self.unchecked_loss: tuple[torch.Tensor, int] | None = None
        self.value = math.nan

    def push(self, loss: torch.Tensor, step: int) -> None:
        """Hold the loss of ``step``, after checking the one held before."""
        if self.unchecked_loss is not None:
            check_finite(*self.unchecked_loss, self.rank)
        self.unchecked_loss = (loss, step)

    def settle(self) -> float:
        """Check the held loss now (``NonFiniteLossError`` if it is not finite); the last
        loss read."""
        if self.unchecked_loss is not None:
            self.value = check_finite(*self.unchecked_loss, self.rank)
            self.unchecked_loss = None
        return self.value


class CheckpointSaver:
    """Saves the run's whole state at each epoch end and every ``run.checkpoint_every``
    steps inside an epoch; never a state whose last loss was not finite."""

    def __init__(self, run_dir: Path, config: PretrainConfig, plan: BatchPlan,
                 dist: DistInfo, backend: Backend, writer: SummaryWriter | None,
                 storage: RunStorage | None = None) -> None:
        self.run_dir, self.config, self.plan, self.dist = run_dir, config, plan, dist
        self.backend, self.writer, self.storage = backend, writer, storage

    def due(self, step: int, steps_done: int) -> bool:
        """A checkpoint inside an epoch, after ``steps_done`` of its steps (run step
        ``step``); the epoch's end has its own."""
        every = self.config.run.checkpoint_every
        return bool(every) and step % every == 0 and steps_done < self.plan.steps_per_epoch

    def save(self, *, epoch_done: int, steps_done: int, step: int, losses: DeferredLossCheck,
             reading: EpochReading | None) -> None:
        """Save after ``epoch_done`` epochs and ``steps_done`` steps of the next (all ranks
        call it). The pending loss is checked first: a non-finite one raises and the last
        checkpoint stays as it was."""
        losses.settle()
        rng = gather_rng(self.dist)
        shards = None
        if self.backend.sharded_optimizer:
            shards = shard_folder_name(step)
            self.backend.save_shard(self.run_dir / CHECKPOINT_DIR / shards, self.dist.rank)
            barrier(self.dist)  # every shard is in place before last.pt points at them
        if self.writer is not None:
            self.writer.flush()  # the logs up to a checkpoint survive a crash after it
        kept = self.kept_name(epoch_done, steps_done)
        if self.dist.is_main:
            state = self.state(epoch_done=epoch_done, steps_done=steps_done, step=step,
                               rng=rng, shards=shards,
                               stretches=reading.stretches_at(steps_done) if reading else [])
            save_checkpoint(self.run_dir, state, keep_as=kept)
        barrier(self.dist)
        if self.storage is not None:  # a run folder in an object store: upload it
            self.storage.checkpoint_saved(self.dist, shards, kept)

    def state(self, *, epoch_done: int, steps_done: int, step: int,
              rng: list[dict[str, torch.Tensor]], shards: str | None,
              stretches: list[dict]) -> PretrainCheckpoint:
        """What the checkpoint holds (the live tensors, not copies)."""
        return PretrainCheckpoint(
            model=self.backend.method.state_dict(), config=to_dict(self.config),
            epoch=epoch_done, step=step, optimizer=self.backend.optimizer_state(),
            zero_shards=shards, position=steps_done, global_batch=self.plan.global_batch,
            grad_accum=self.plan.grad_accum, world_size=self.dist.world_size, rng=rng,
            loader_stretches=stretches)

    def kept_name(self, epoch_done: int, steps_done: int) -> str | None:
        """The name of the copy kept besides ``last.pt`` (``run.keep_epochs``), if any."""
        if steps_done == 0 and epoch_done in self.config.run.keep_epochs:
            return kept_checkpoint_name(epoch_done)
        return None


class EpochLoop:
    """The run's optimizer steps, epoch by epoch from ``start``; after each step: its log,
    then a checkpoint and a probe where due."""

    def __init__(self, config: PretrainConfig, dist: DistInfo, plan: BatchPlan,
                 backend: Backend, start: ResumePoint, *, run_dir: Path,
                 writer: SummaryWriter | None, probe: _LiveProbe | None,
                 storage: RunStorage | None = None) -> None:
        self.config, self.dist, self.plan, self.backend = config, dist, plan, backend
        self.start, self.writer, self.probe = start, writer, probe
        self.total_steps = plan.steps_per_epoch * config.optim.epochs
        self.warmup_steps = int(config.optim.warmup_epochs * plan.steps_per_epoch)
        self.step = start.step  # optimizer steps taken, all epochs together
        self.losses = DeferredLossCheck(dist.rank)
        bar = tqdm(total=self.total_steps,
                   initial=start.epoch * plan.steps_per_epoch + start.first_step,
                   desc="pretrain", unit="step",
                   disable=not (dist.is_main and config.run.progress))
        self.log = StepLogger(writer, bar, backend.method, log_every=config.run.log_every,
                              global_batch=plan.global_batch,
                              steps_per_epoch=plan.steps_per_epoch, launch_step=start.step)
        self.checkpoints = CheckpointSaver(run_dir, config, plan, dist, backend, writer,
                                           storage)

    def run(self) -> None:
        # before training: the random (or loaded) initialisation, or a probe a restart missed
        self._probe(epoch_end=self.start.first_step == 0)
        for epoch in range(self.start.epoch, self.config.optim.epochs):
            self.run_epoch(epoch)
        self.log.bar.close()

    def run_epoch(self, epoch: int) -> None:
        config, dist, steps_per_epoch = self.config, self.dist, self.plan.steps_per_epoch
        started = time.perf_counter()
        self.backend.train()
        # One loader per epoch: a resumed epoch delivers exactly the samples its
        # checkpoint had not consumed (the same batches, when the batching is unchanged).
        resumed = epoch == self.start.epoch
        first = self.start.first_step if resumed else 0
        reading = open_epoch(config, self.plan, dist, epoch, first,
                             self.start.stretches if resumed else [])
        views = _ViewSource(reading.batches, config, dist)
        for index in range(first, steps_per_epoch):
            self.take_step(epoch, index, views)
            # Logged before a checkpoint, whose flush then makes the step's scalars durable.
            if self.checkpoints.due(self.step, index + 1):
                self.checkpoints.save(epoch_done=epoch, steps_done=index + 1, step=self.step,
                                      losses=self.losses, reading=reading)
            if index + 1 < steps_per_epoch:
                self._probe(epoch_end=False)
        del views, reading  # the epoch's loader ends before its checkpoint
        self.checkpoints.save(epoch_done=epoch + 1, steps_done=0, step=self.step,
                              losses=self.losses, reading=None)
        self._probe(epoch_end=True)
        if dist.is_main and not config.run.progress:  # without bars, one line per epoch
            seconds = time.perf_counter() - started
            views_per_s = 2 * self.plan.global_batch * (steps_per_epoch - first) / seconds
            print(f"epoch {epoch + 1} of {config.optim.epochs}: loss {self.losses.value:.4f}, "
                  f"{views_per_s:.1f} views/s, {seconds:.1f} s", flush=True)

    def take_step(self, epoch: int, index: int, views: _ViewSource) -> None:
        """Optimizer step ``index`` of ``epoch``, then its log."""
        # The schedules run on epoch progress, which survives a change of world size.
        progress = epoch * self.plan.steps_per_epoch + index
        lr = warmup_cosine(progress, self.total_steps, self.warmup_steps, self.plan.peak_lr)
        momentum = ema_momentum(progress, self.total_steps, self.config.method.tau_base)
        accum = self.plan.grad_accum
        loss = self.backend.step(views.pairs(self.step, accum), accum, lr=lr,
                                 momentum=momentum)
        self.losses.push(loss, self.step)
        self.step += 1
        self.log.after_step(self.step, epoch=epoch, progress=progress, lr=lr,
                            momentum=momentum, views=views, loss=self.losses.settle)

    def _probe(self, epoch_end: bool) -> None:
        """The probe, where one is due and not yet logged; its time is kept out of the
        throughput figures."""
        if self.probe is not None:
            self.log.exclude(self.probe.maybe_run(self.step, epoch_end, self.writer))


# --- the live probe and the views -----------------------------------------------------


class _LiveProbe:
    """When the segmentation probe is due, and running it on rank 0 (the others wait)."""

    def __init__(self, config: PretrainConfig, dist: DistInfo, run_dir: Path,
                 steps_per_epoch: int, method: SSLMethod) -> None:
        self.config, self.dist, self.steps_per_epoch = config.probe, dist, steps_per_epoch
        name = "online_encoder" if config.probe.encoder == "online" else "target_encoder"
        if not hasattr(method, name):
            raise ValueError(f"probe.encoder=target: method {config.method.name} has no "
                             "target encoder (only BYOL does)")
        self.encoder: torch.nn.Module = getattr(method, name)
        self.probe = self.log = None
        if dist.is_main:
            self.probe = SegmentationProbe(config.probe, config.data.path,
                                           config.data.crop_size, dist.device)
            self.log = ProbeLog(run_dir, self.probe.class_names)

    def due(self, step: int, epoch_end: bool) -> bool:
        if step == 0:
            return True  # the initialisation: the curve starts from it
        if self.config.every_steps:
            return step % self.config.every_steps == 0
        return epoch_end and (step // self.steps_per_epoch) % self.config.every_epochs == 0

    def maybe_run(self, step: int, epoch_end: bool, writer: SummaryWriter | None) -> float:
        """Probe at ``step`` if due and not logged yet; the seconds it took."""
        if not self.due(step, epoch_end):
            return 0.0
        seconds = 0.0
        if self.probe is not None and self.log is not None and not self.log.has(step):
            result = self.probe.run(self.encoder)
            row = self.log.add(step / self.steps_per_epoch, step, result)
            seconds = result["seconds"]
            if writer is not None:
                writer.add_scalar("probe/dice", row["dice"], step)
                for name, value in result["per_class"].items():
                    if value is not None:
                        writer.add_scalar(f"probe/dice_{name}", value, step)
                writer.add_scalar("probe/seconds", seconds, step)
                writer.flush()
        barrier(self.dist)
        return seconds


class _ViewSource:
    """Micro batches of one epoch's loader as view pairs on the training device: images are
    augmented here, batched; DALI's batches arrive augmented already."""

    def __init__(self, batches: Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
                 config: PretrainConfig, dist: DistInfo) -> None:
        self.batches, self.config, self.dist = batches, config, dist
        self.wait_s = 0.0  # time spent waiting for the loader since the last log
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def pairs(self, step: int, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``count`` micro batches of view pairs for optimizer step ``step``, made lazily so
        only one micro batch of views is alive at a time."""
        augment, device = self.config.augment, self.dist.device
        for micro in range(count):
            wait_start = time.perf_counter()
            batch = next(self.batches)
            self.wait_s += time.perf_counter() - wait_start
            if isinstance(batch, tuple):
                first, second = (view.to(device, non_blocking=True) for view in batch)
            else:
                images = batch.to(device, non_blocking=True)
                generator = torch.Generator(device=device).manual_seed(
                    hash((self.config.run.seed, self.dist.rank, step, micro)) % 2**62)
                first, second = (augment_view(images, view, self.config.data.crop_size,
                                              generator)
                                 for view in (augment.view1, augment.view2))
            self.last = (first, second)
            yield self.last
