"""The pretraining loop: one process per device, DDP across processes and nodes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from cluster.config import to_dict
from cluster.distributed import DistInfo, barrier, init_distributed, shutdown
from cluster.run_dir import write_run_info
from data_prep.manifest import Manifest
from pretrain.augment import augment_view
from pretrain.checkpoint import gather_rng, load_latest, restore_rng, save_checkpoint
from pretrain.config import PretrainConfig
from pretrain.data import build_loader, epoch_length
from pretrain.export import export_backbone
from pretrain.methods import SSLMethod
from pretrain.model import build_model
from pretrain.optim import build_optimizer, scaled_lr
from pretrain.schedules import ema_momentum, warmup_cosine
from pretrain.step import check_finite, ssl_step
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
    dist_info = init_distributed(prefer_cuda=config.run.device == "auto",
                                 timeout_s=config.run.dist_timeout_s)
    try:
        return _train(config, dist_info)
    finally:
        shutdown(dist_info)


def _train(config: PretrainConfig, dist: DistInfo) -> PretrainResult:
    run_dir = Path(config.run.out)
    device = dist.device
    if config.data.batch_size % dist.world_size:
        raise ValueError(f"data.batch_size {config.data.batch_size} is not divisible by the "
                         f"world size {dist.world_size}")
    per_rank_batch = config.data.batch_size // dist.world_size
    steps_per_epoch = max(1, epoch_length(config.data.path, config.data.epoch_samples)
                          // config.data.batch_size)
    total_steps = steps_per_epoch * config.optim.epochs
    warmup_steps = int(config.optim.warmup_epochs * steps_per_epoch)
    peak_lr = scaled_lr(config.optim.lr, config.data.batch_size)

    torch.manual_seed(config.run.seed + dist.rank)
    channels_last = device.type == "cuda" and config.run.channels_last
    model = build_model(config).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.distributed and config.run.sync_batchnorm:
        # BatchNorm over the global batch: PyTorch's SyncBatchNorm on CUDA, ours elsewhere
        model = convert_sync_batchnorm(model, device.type)
    optimizer = build_optimizer(config.optim.name, model, lr=peak_lr,
                                weight_decay=config.optim.weight_decay,
                                momentum=config.optim.momentum, eta=config.optim.eta)
    start_epoch, step, position = 0, 0, 0
    checkpoint = load_latest(run_dir)
    if checkpoint is not None:
        _check_resumable(checkpoint, config, run_dir)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, step = int(checkpoint["epoch"]), int(checkpoint["step"])
        position = int(checkpoint.get("position", 0))
        restore_rng(checkpoint.get("rng", []), dist.rank, dist.world_size)
    method = model
    trained: nn.Module = DistributedDataParallel(model) if dist.distributed else model
    if config.run.compile:
        trained = torch.compile(trained)

    writer = None
    if dist.is_main:
        write_run_info(run_dir, config, {"world_size": dist.world_size})
        writer = SummaryWriter(str(run_dir / "tensorboard"))
    bar = tqdm(total=total_steps, initial=step, desc="pretrain", unit="step",
               disable=not (dist.is_main and config.run.progress))
    loss_value = float("nan")
    pending: tuple[torch.Tensor, int] | None = None  # checked one step late: no host sync
    last_log, steps_since_log = time.perf_counter(), 0
    wait_since_log = 0.0
    launch_step = step

    def checkpoint_now(epoch_done: int, batches_done: int) -> None:
        """Save the full state; never one whose last loss was not finite."""
        nonlocal pending, loss_value
        if pending is not None:
            loss_value = check_finite(*pending, dist.rank)
            pending = None
        rng = gather_rng(dist)
        if dist.is_main:
            keep = f"epoch{epoch_done:04d}.pt" if batches_done == 0 and \
                epoch_done in config.run.keep_epochs else None
            save_checkpoint(run_dir, {
                "model": method.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch_done, "position": batches_done, "step": step, "rng": rng,
                "world_size": dist.world_size, "config": to_dict(config),
            }, keep_as=keep)
        barrier(dist)

    for epoch in range(start_epoch, config.optim.epochs):
        trained.train()
        # One loader per epoch, seeded by the epoch: a resumed run sees the same batches
        # as an uninterrupted one, skipping those its checkpoint had already consumed.
        loader = build_loader(
            config.data.path, per_rank_batch=per_rank_batch, workers=config.data.workers,
            shuffle_buffer=config.data.shuffle_buffer, seed=config.run.seed + epoch,
            rank=dist.rank, pin_memory=device.type == "cuda",
        )
        batches = iter(loader)
        first = position if epoch == start_epoch else 0
        for _ in range(first):
            next(batches)
        for index in range(first, steps_per_epoch):
            wait_start = time.perf_counter()
            images = next(batches).to(device, non_blocking=True)
            wait_since_log += time.perf_counter() - wait_start
            generator = torch.Generator(device=device).manual_seed(
                hash((config.run.seed, dist.rank, step)) % 2**62)
            view1 = augment_view(images, config.augment.view1, config.data.crop_size, generator)
            view2 = augment_view(images, config.augment.view2, config.data.crop_size, generator)
            lr = warmup_cosine(step, total_steps, warmup_steps, peak_lr)
            momentum = ema_momentum(step, total_steps, config.method.tau_base)
            loss = ssl_step(trained, method, optimizer, view1, view2, lr=lr,
                            momentum=momentum, precision=config.run.precision,
                            channels_last=channels_last)
            if pending is not None:
                check_finite(*pending, dist.rank)
            pending = (loss, step)
            step += 1
            steps_since_log += 1
            bar.update(1)
            if writer is not None and step == launch_step + 1:
                _log_view_pairs(writer, view1, view2, step)
            every = config.run.checkpoint_every
            if every and step % every == 0 and index + 1 < steps_per_epoch:
                checkpoint_now(epoch, index + 1)
            if not (step % config.run.log_every == 0 or step == 1):
                continue
            if pending is not None:
                loss_value = check_finite(*pending, dist.rank)
                pending = None  # just checked
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_value:.4f}")
            if writer is not None:
                elapsed = time.perf_counter() - last_log
                views_per_s = 2 * config.data.batch_size * steps_since_log / elapsed
                writer.add_scalar("train/loss", loss_value, step)
                writer.add_scalar("train/lr", lr, step)
                if method.uses_momentum:
                    writer.add_scalar("train/tau", momentum, step)
                writer.add_scalar("perf/views_per_s", views_per_s, step)
                writer.add_scalar("perf/data_wait_fraction", wait_since_log / elapsed, step)
                spread = _embedding_std(method, view1)
                if torch.isfinite(spread).all():  # diverged weights fail the next loss check
                    writer.add_histogram("collapse/embedding_std", spread, step)
            last_log, steps_since_log, wait_since_log = time.perf_counter(), 0, 0.0
        del batches, loader
        if pending is not None:
            loss_value = check_finite(*pending, dist.rank)
        checkpoint_now(epoch + 1, 0)
    bar.close()
    export_dir = run_dir / "export"
    if dist.is_main:
        manifest = Manifest.read(config.data.path)
        export_backbone(method.online_encoder, export_dir, {
            "architecture": config.model.arch, "in_chans": config.model.in_chans,
            "num_features": method.online_encoder.num_features, "method": config.method.name,
            "epochs": config.optim.epochs, "steps": step, "init": config.model.init,
            "data": {"name": manifest.name, "path": str(Path(config.data.path).resolve()),
                     "pretrain_slices": manifest.counts["pretrain_slices"]},
        })
        if writer is not None:
            writer.close()
    barrier(dist)
    return PretrainResult(run_dir, export_dir, step, loss_value)


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


def _log_view_pairs(writer: SummaryWriter, view1: torch.Tensor, view2: torch.Tensor,
                    step: int, count: int = 8) -> None:
    pairs = torch.stack([view1[:count], view2[:count]], dim=1).flatten(0, 1).float().cpu()
    low = pairs.amin(dim=(1, 2, 3), keepdim=True)
    high = pairs.amax(dim=(1, 2, 3), keepdim=True)
    writer.add_images("views/pairs", (pairs - low) / (high - low + 1e-6), step)
