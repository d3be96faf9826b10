"""One fine-tuning run: a U-Net on a label budget, validated every epoch."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from cluster.atomic import atomic_path, atomic_write_json
from cluster.config import to_dict
from cluster.run_dir import write_run_info
from data_prep.manifest import Manifest
from finetune.budgets import budget_subset, epoch_indices, finetune_epoch_samples
from finetune.config import FinetuneConfig
from finetune.convergence import convergence_metrics
from finetune.data import SliceSet, load_slices, require_whole_volumes, slice_patients
from finetune.device_data import DeviceSlices, place, place_splits
from finetune.metrics import SegmentationMetrics
from finetune.model import build_unet, initialise_encoder, set_encoder_frozen
from finetune.outputs import METRICS_FILE, write_outputs
from finetune.overlays import save_overlay
from finetune.step import autocast, build_step
from pretrain.schedules import warmup_cosine

BEST_WEIGHTS = "best.safetensors"
LAST_CHECKPOINT = "last.pt"
STARTS_FILE = "starts.jsonl"  # one line per time this run began training (fresh or resumed)

EpochCallback = Callable[[dict[str, Any]], None]


def train_run(config: FinetuneConfig, on_epoch: EpochCallback | None = None,
              start_context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, validate each epoch, test the best epoch; return (and write) the metrics.

    A run whose ``metrics.json`` is complete is returned as is; an interrupted run
    resumes from its last finished epoch. ``on_epoch`` receives each epoch's record after
    its checkpoint and ``metrics.json`` are on disk (a sweep reports it to Ray Tune).
    Every start that trains appends a line to ``starts.jsonl`` with ``start_context``
    (who ran it), so a run trained twice is visible.
    """
    if not config.data or not config.out:
        raise ValueError("data and out are required")
    run_dir = Path(config.out)
    done = _completed_metrics(run_dir, config)
    if done is not None:
        return done
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
    init_chain = initialise_encoder(model, config.arch, 1, config.init)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # the compiled module shares the model's parameters; state is saved from ``model``
    train_step = build_step(model, config, device)
    forward, optimizer = train_step.forward, train_step.optimizer
    train_data, val_data = place_splits(train_set, val_set, device, config.device_data_gb)

    samples = finetune_epoch_samples(len(subset), config.epoch_samples)
    steps_per_epoch = max(1, samples // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(config.warmup_epochs * steps_per_epoch)

    history: list[dict[str, Any]] = []
    best_dice, step, elapsed = -1.0, 0, 0.0
    resumed = _load_last(run_dir)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        history, step, elapsed = resumed["history"], resumed["step"], resumed["elapsed"]
        best_dice = max((h["val_dice"] for h in history if h["val_dice"] is not None),
                        default=-1.0)
        print(f"resuming from {run_dir / LAST_CHECKPOINT}: epoch {len(history) + 1} of "
              f"{config.epochs}, step {step} of {total_steps}", flush=True)
    run = {"train_slices": len(subset), "init_chain": init_chain,
           "data_on_device": {"train": train_data.resident, "val": val_data.resident},
           "compiled": train_step.compiled}
    write_run_info(run_dir, config, run)
    _log_start(run_dir, len(history), start_context)
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    bar = tqdm(range(len(history), config.epochs), desc=f"finetune {config.label} "
               f"b={config.budget} s={config.seed}", unit="epoch", leave=False,
               disable=not config.progress)
    for epoch in bar:
        start = time.perf_counter()
        rng = np.random.default_rng([config.seed, epoch])
        generator = torch.Generator(device=device).manual_seed(
            config.seed * 100_003 + epoch)
        order = torch.as_tensor(epoch_indices(np.arange(len(train_data)), samples, rng),
                                device=train_data.index_device())
        model.train()
        frozen = epoch < config.freeze_encoder_epochs
        set_encoder_frozen(model, frozen)  # after train(), which resets BatchNorm modes
        # summed on the device and read once per epoch: no host synchronisation per step
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for batch_start in range(0, steps_per_epoch * config.batch_size, config.batch_size):
            lr = warmup_cosine(step, total_steps, warmup_steps, config.lr,
                               start=config.warmup_start_lr)
            loss_sum += train_step(train_data, order[batch_start:batch_start + config.batch_size],
                                   generator, lr)
            step += 1
        train_loss = loss_sum.item() / steps_per_epoch
        train_seconds = time.perf_counter() - start
        validated = (epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs
        val = None
        if validated:
            val = evaluate(forward, val_data, val_set, manifest.class_names, device,
                           config.val_batch_size).summary(hd95=False)
        elapsed += time.perf_counter() - start
        record = {
            "epoch": epoch + 1, "step": step, "seconds": round(elapsed, 3),
            "train_loss": train_loss, "lr": lr, "encoder_frozen": frozen,
            "train_images_per_s": round(steps_per_epoch * config.batch_size / train_seconds, 2),
            **_validation_record(val),
        }
        history.append(record)
        _log_epoch(writer, record)
        if val is not None:
            bar.set_postfix(val_dice=f"{record['val_dice']:.3f}")
            if record["val_dice"] > best_dice:
                best_dice = record["val_dice"]
                _save_weights(model, run_dir / BEST_WEIGHTS)
        if config.checkpoint_every and (epoch + 1) % config.checkpoint_every == 0:
            _save_last(run_dir, model, optimizer, history, step, elapsed)
        atomic_write_json(run_dir / METRICS_FILE, _metrics(config, history, run, None))
        if on_epoch is not None:
            on_epoch(record)

    model.load_state_dict(safetensors.torch.load_file(str(run_dir / BEST_WEIGHTS)))
    summary = evaluate(forward, place(test_set, device, 0), test_set, manifest.class_names,
                       device, config.val_batch_size).summary()
    test = {"dice": summary["volume_dice"]["mean"], "iou": summary["volume_iou"]["mean"],
            "hd95_mm": summary["volume_hd95_mm"]["mean"],
            "dice_per_class": summary["volume_dice"]["per_class"], "summary": summary}
    for name, value in (("dice", test["dice"]), ("iou", test["iou"]),
                        ("hd95_mm", test["hd95_mm"])):
        if value is not None:
            writer.add_scalar(f"test/{name}", value, len(history))
    writer.close()
    _write_overlays(model, val_set, manifest.class_names, run_dir / "overlays", device,
                    config.overlays)
    metrics = _metrics(config, history, run, test)
    write_outputs(run_dir, metrics)
    atomic_write_json(run_dir / METRICS_FILE, metrics)  # last: it marks the run complete
    (run_dir / LAST_CHECKPOINT).unlink(missing_ok=True)
    return metrics


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


def _validation_record(val: dict[str, Any] | None) -> dict[str, Any]:
    """An epoch's validation fields; None where the epoch was not validated."""
    if val is None:
        return {"validated": False, "val_dice": None, "val_iou": None,
                "val_dice_per_class": None, "val_slice_dice": None}
    # the volume Dice selects the best epoch; a NaN (no foreground at all in the
    # validation split) counts as 0 so that selection stays defined
    return {"validated": True, "val_dice": val["volume_dice"]["mean"] or 0.0,
            "val_iou": val["volume_iou"]["mean"],
            "val_dice_per_class": val["volume_dice"]["per_class"],
            "val_slice_dice": val["slice_dice"]["mean"]}


def _metrics(config: FinetuneConfig, history: list[dict[str, Any]], run: dict[str, Any],
             test: dict[str, Any] | None) -> dict[str, Any]:
    validated = [h for h in history if h["val_dice"] is not None]
    return {
        "init": config.label, "arch": config.arch, "budget": config.budget,
        "budget_unit": config.budget_unit, "train_slices": run["train_slices"],
        "init_chain": run["init_chain"], "seed": config.seed, "epochs": history,
        "validation": {
            "every": config.val_every, "epochs": [h["epoch"] for h in validated],
            "convergence_basis": "validated epochs only; nothing interpolated"},
        # None until the first validation (the last epoch is always validated)
        "convergence": convergence_metrics(
            [h["val_dice"] for h in validated], [h["step"] for h in validated],
            [h["seconds"] for h in validated], config.dice_targets,
            [h["epoch"] for h in validated]) if validated else None,
        "test": test, "complete": test is not None, "run_dir": config.out,
        "config": to_dict(config),
    }


def _completed_metrics(run_dir: Path, config: FinetuneConfig) -> dict[str, Any] | None:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    if not metrics.get("complete"):
        return None
    # a run finished before a config key existed recorded no value for it: the default
    if {**to_dict(FinetuneConfig()), **metrics.get("config", {})} != to_dict(config):
        raise ValueError(f"{run_dir} holds a finished run with another config; "
                         "choose another out folder")
    return metrics


def _log_start(run_dir: Path, resume_epoch: int, context: dict[str, Any] | None) -> None:
    """Append one line to the run's start log (O_APPEND: whole lines, never rewritten)."""
    line = {"time": round(time.time(), 3), "host": socket.gethostname(), "pid": os.getpid(),
            "resume_epoch": resume_epoch, **(context or {})}
    with open(run_dir / STARTS_FILE, "a", encoding="utf-8") as log:
        log.write(json.dumps(line) + "\n")


def read_starts(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's start log: one dict per time it began training."""
    path = Path(run_dir) / STARTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _save_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(state, str(tmp))


def _save_last(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
               history: list[dict[str, Any]], step: int, elapsed: float) -> None:
    with atomic_path(run_dir / LAST_CHECKPOINT) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "history": history, "step": step, "elapsed": elapsed}, tmp)


def _load_last(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / LAST_CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _log_epoch(writer: SummaryWriter, record: dict[str, Any]) -> None:
    epoch = record["epoch"]
    writer.add_scalar("train/loss", record["train_loss"], epoch)
    writer.add_scalar("train/lr", record["lr"], epoch)
    writer.add_scalar("train/encoder_frozen", float(record["encoder_frozen"]), epoch)
    writer.add_scalar("perf/images_per_s", record["train_images_per_s"], epoch)
    if record["val_dice"] is None:  # not a validation epoch (val_every)
        return
    writer.add_scalar("val/dice", record["val_dice"], epoch)
    for key in ("val_iou", "val_slice_dice"):
        if record[key] is not None:
            writer.add_scalar(key.replace("val_", "val/"), record[key], epoch)
    for name, value in record["val_dice_per_class"].items():
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
