"""The pretraining loop: one process per device, DDP across processes and nodes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
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
    SHARDS_KEY,
    gather_rng,
    load_latest,
    restore_rng,
    save_checkpoint,
    shard_files,
    shard_folder_name,
)
from pretrain.config import PretrainConfig
from pretrain.data import pretrain_epoch_samples
from pretrain.epoch_loader import STRETCHES_KEY, EpochReading, open_epoch
from pretrain.export import EXPORT_DIR, export_backbone
from pretrain.methods import SSLMethod
from pretrain.model import build_model
from pretrain.optim import build_pretrain_optimizer
from pretrain.probe import SegmentationProbe, check_probe_data
from pretrain.probe_log import PROBE_FILE, ProbeLog, probe_summary, read_probe_log
from pretrain.schedules import ema_momentum, warmup_cosine
from pretrain.step import check_finite
from pretrain.sync_batchnorm import convert_sync_batchnorm


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
        return _train(config, dist_info)
    finally:
        shutdown(dist_info)


def _train(config: PretrainConfig, dist: DistInfo) -> PretrainResult:
    run_dir = Path(config.run.out)
    device = dist.device
    plan = plan_batches(config, dist.world_size, pretrain_epoch_samples(
        config.data.path, config.data.epoch_samples, config.data.resampled))
    steps_per_epoch, accum = plan.steps_per_epoch, plan.grad_accum
    total_steps = steps_per_epoch * config.optim.epochs
    warmup_steps = int(config.optim.warmup_epochs * steps_per_epoch)

    torch.manual_seed(config.run.seed + dist.rank)
    checkpoint = load_latest(run_dir)
    model = build_model(config, initialise=checkpoint is None).to(device)
    if dist.distributed and config.run.sync_batchnorm:
        # BatchNorm over the global batch: PyTorch's SyncBatchNorm on CUDA, ours elsewhere
        model = convert_sync_batchnorm(model, device.type)
    optimizer = build_pretrain_optimizer(config.optim.name, model, lr=plan.peak_lr,
                                         weight_decay=config.optim.weight_decay,
                                         momentum=config.optim.momentum, eta=config.optim.eta,
                                         trust_ratio=config.optim.trust_ratio,
                                         clip_lr=config.optim.clip_lr)
    if checkpoint is not None:
        _check_resumable(checkpoint, config, run_dir)
        model.load_state_dict(checkpoint["model"])  # before any backend copies it
    backend = build_backend(
        config.run.backend, model, optimizer, dist, micro_batch=plan.micro_batch,
        grad_accum=accum, zero_stage=config.run.zero_stage, precision=config.run.precision,
        channels_last=device.type == "cuda" and config.run.channels_last,
        compile=config.run.compile)
    start_epoch, step, first_step, saved_stretches = 0, 0, 0, []
    if checkpoint is not None:
        _restore_optimizer(backend, checkpoint, config, run_dir)
        start_epoch, step = int(checkpoint["epoch"]), int(checkpoint["step"])
        first_step = _resume_step(checkpoint, plan)
        saved_stretches = checkpoint.get(STRETCHES_KEY, [])
        restore_rng(checkpoint.get("rng", []), dist.rank, dist.world_size)
        if dist.is_main:  # a resumed run says so, progress bars or not
            print(f"resuming from {run_dir / 'checkpoints' / 'last.pt'}: epoch "
                  f"{min(start_epoch + 1, config.optim.epochs)} of {config.optim.epochs}, "
                  f"step {step} of {total_steps}", flush=True)
    method = backend.method
    probe = (_LiveProbe(config, dist, run_dir, steps_per_epoch, method)
             if config.probe.enabled else None)

    writer = None
    if dist.is_main:
        write_run_info(run_dir, config, {
            "world_size": dist.world_size, "global_batch": plan.global_batch,
            "micro_batch_per_rank": plan.micro_batch, "grad_accum": accum,
            "peak_lr": plan.peak_lr, "resumed_at_step": step})
        writer = SummaryWriter(str(run_dir / "tensorboard"))
    bar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch + first_step,
               desc="pretrain", unit="step",
               disable=not (dist.is_main and config.run.progress))
    loss_value = float("nan")
    # the last step's loss and step, checked one step late: no host sync
    unchecked_loss: tuple[torch.Tensor, int] | None = None
    last_log, steps_since_log = time.perf_counter(), 0
    launch_step = step

    reading: EpochReading | None = None

    def probe_at(at_step: int, epoch_end: bool) -> None:
        """The probe, where one is due and not yet logged; its time is kept out of the
        throughput figures."""
        nonlocal last_log
        if probe is not None:
            last_log += probe.maybe_run(at_step, epoch_end, writer)

    # before training: the random (or loaded) initialisation, or a probe a restart missed
    probe_at(step, first_step == 0)

    def checkpoint_now(epoch_done: int, steps_done: int) -> None:
        """Save the full state; never one whose last loss was not finite."""
        nonlocal unchecked_loss, loss_value
        if unchecked_loss is not None:
            loss_value = check_finite(*unchecked_loss, dist.rank)
            unchecked_loss = None
        rng = gather_rng(dist)
        shards = None
        if backend.sharded_optimizer:
            shards = shard_folder_name(step)
            backend.save_shard(run_dir / CHECKPOINT_DIR / shards, dist.rank)
            barrier(dist)  # every shard is in place before last.pt points at them
        if writer is not None:
            writer.flush()  # the logs up to a checkpoint survive a crash after it
        if dist.is_main:
            keep = f"epoch{epoch_done:04d}.pt" if steps_done == 0 and \
                epoch_done in config.run.keep_epochs else None
            save_checkpoint(run_dir, {
                "model": method.state_dict(), "optimizer": backend.optimizer_state(),
                SHARDS_KEY: shards, "epoch": epoch_done, "position": steps_done,
                "global_batch": plan.global_batch, "grad_accum": accum, "step": step,
                "rng": rng, "world_size": dist.world_size, "config": to_dict(config),
                STRETCHES_KEY: reading.stretches_at(steps_done) if reading else [],
            }, keep_as=keep)
        barrier(dist)

    for epoch in range(start_epoch, config.optim.epochs):
        epoch_started = time.perf_counter()
        backend.train()
        # One loader per epoch: a resumed epoch delivers exactly the samples its
        # checkpoint had not consumed (the same batches, when the batching is unchanged).
        first = first_step if epoch == start_epoch else 0
        reading = open_epoch(config, plan, dist, epoch, first,
                             saved_stretches if epoch == start_epoch else [])
        views = _ViewSource(reading.batches, config, dist)
        for index in range(first, steps_per_epoch):
            # The schedules run on epoch progress, which survives a change of world size.
            progress = epoch * steps_per_epoch + index
            lr = warmup_cosine(progress, total_steps, warmup_steps, plan.peak_lr)
            momentum = ema_momentum(progress, total_steps, config.method.tau_base)
            loss = backend.step(views.pairs(step, accum), accum, lr=lr, momentum=momentum)
            if unchecked_loss is not None:
                check_finite(*unchecked_loss, dist.rank)
            unchecked_loss = (loss, step)
            step += 1
            steps_since_log += 1
            bar.update(1)
            if writer is not None and step == launch_step + 1:
                _log_view_pairs(writer, *views.last, step)
            # Logged before a checkpoint, whose flush then makes the step's scalars durable.
            if step % config.run.log_every == 0 or step == 1:
                if unchecked_loss is not None:
                    loss_value = check_finite(*unchecked_loss, dist.rank)
                    unchecked_loss = None  # just checked
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_value:.4f}")
                if writer is not None:
                    elapsed = time.perf_counter() - last_log
                    views_per_s = 2 * plan.global_batch * steps_since_log / elapsed
                    writer.add_scalar("train/loss", loss_value, step)
                    writer.add_scalar("train/lr", lr, step)
                    # the epoch at the step's start
                    writer.add_scalar("train/epoch", progress / steps_per_epoch, step)
                    if method.uses_momentum:
                        writer.add_scalar("train/tau", momentum, step)
                    writer.add_scalar("perf/views_per_s", views_per_s, step)
                    writer.add_scalar("perf/data_wait_fraction", views.wait_s / elapsed, step)
                    spread = _embedding_std(method, views.last[0])
                    if torch.isfinite(spread).all():  # diverged weights fail the next loss check
                        writer.add_histogram("collapse/embedding_std", spread, step)
                last_log, steps_since_log = time.perf_counter(), 0
                views.wait_s = 0.0
            every = config.run.checkpoint_every
            if every and step % every == 0 and index + 1 < steps_per_epoch:
                checkpoint_now(epoch, index + 1)
            if index + 1 < steps_per_epoch:
                probe_at(step, epoch_end=False)
        del views
        reading = None
        if unchecked_loss is not None:
            loss_value = check_finite(*unchecked_loss, dist.rank)
        checkpoint_now(epoch + 1, 0)
        probe_at(step, epoch_end=True)
        if dist.is_main and not config.run.progress:  # without bars, one line per epoch
            seconds = time.perf_counter() - epoch_started
            trained = steps_per_epoch - (first_step if epoch == start_epoch else 0)
            print(f"epoch {epoch + 1} of {config.optim.epochs}: loss {loss_value:.4f}, "
                  f"{2 * plan.global_batch * trained / seconds:.1f} views/s, "
                  f"{seconds:.1f} s", flush=True)
    bar.close()
    export_dir = run_dir / EXPORT_DIR
    if dist.is_main:
        # a finished run resumed with a smaller optim.epochs trains no further
        export_backbone(method.online_encoder, export_dir, config,
                        epochs=max(start_epoch, config.optim.epochs), steps=step,
                        probe=probe_summary(read_probe_log(run_dir / PROBE_FILE)))
        if writer is not None:
            writer.close()
    barrier(dist)
    return PretrainResult(run_dir, export_dir, step, loss_value)


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
                self.last = tuple(view.to(device, non_blocking=True) for view in batch)
            else:
                images = batch.to(device, non_blocking=True)
                generator = torch.Generator(device=device).manual_seed(
                    hash((self.config.run.seed, self.dist.rank, step, micro)) % 2**62)
                self.last = tuple(augment_view(images, view, self.config.data.crop_size,
                                               generator)
                                  for view in (augment.view1, augment.view2))
            yield self.last


@torch.no_grad()
def _embedding_std(method: SSLMethod, views: torch.Tensor) -> torch.Tensor:
    """Per-dimension std of normalised projections: values near 0 signal collapse."""
    was_training = method.training
    method.eval()
    projections = method.embed(views[:64].float())
    method.train(was_training)
    return torch.nn.functional.normalize(projections, dim=1).std(dim=0).cpu()


def _check_resumable(checkpoint: dict, config: PretrainConfig, run_dir: Path) -> None:
    saved, current = checkpoint.get("config", {}), to_dict(config)
    pairs = {"model": (saved.get("model"), current["model"]),
             "method": (saved.get("method"), current["method"]),
             "optim.name": (saved.get("optim", {}).get("name"), current["optim"]["name"])}
    for key, (before, now) in pairs.items():
        if before != now:
            raise ValueError(f"{run_dir}: its checkpoint was made with another {key} "
                             f"({before}, now {now}); use a new run.out")


def _restore_optimizer(backend: Backend, checkpoint: dict, config: PretrainConfig,
                       run_dir: Path) -> None:
    if bool(checkpoint.get(SHARDS_KEY)) != backend.sharded_optimizer:
        saved_run = checkpoint.get("config", {}).get("run", {})
        raise ValueError(
            f"{run_dir}: its checkpoint keeps the optimizer state "
            f"{'sharded' if checkpoint.get(SHARDS_KEY) else 'whole'} (run.backend="
            f"{saved_run.get('backend', 'ddp')}, run.zero_stage={saved_run.get('zero_stage', 0)}"
            f"), which run.backend={config.run.backend}, run.zero_stage="
            f"{config.run.zero_stage} cannot load; resume with the same settings")
    if backend.sharded_optimizer:
        backend.load_shards(shard_files(run_dir, checkpoint))
    else:
        backend.load_optimizer_state(checkpoint["optimizer"])


def _resume_step(checkpoint: dict, plan: BatchPlan) -> int:
    """Optimizer steps of the checkpoint's epoch to skip: exactly its position when the
    batching is unchanged, else as many as its consumed samples fill (elastic restart)."""
    position = int(checkpoint.get("position", 0))
    saved_batch = int(checkpoint.get("global_batch", plan.global_batch))
    if (checkpoint.get("world_size"), saved_batch, checkpoint.get("grad_accum", 1)) == \
            (plan.world_size, plan.global_batch, plan.grad_accum):
        return position
    return plan.resume_point(position * saved_batch)


def _log_view_pairs(writer: SummaryWriter, view1: torch.Tensor, view2: torch.Tensor,
                    step: int, count: int = 8) -> None:
    pairs = torch.stack([view1[:count], view2[:count]], dim=1).flatten(0, 1).float().cpu()
    low = pairs.amin(dim=(1, 2, 3), keepdim=True)
    high = pairs.amax(dim=(1, 2, 3), keepdim=True)
    writer.add_images("views/pairs", (pairs - low) / (high - low + 1e-6), step)
