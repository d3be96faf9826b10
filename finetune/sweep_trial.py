"""One sweep trial inside a Ray Tune worker: a normal ``fine_tune`` in its run folder.

The run folder is the source of truth: on storage every node sees, or in an object store
with a node-local working copy (``finetune.run_folder``), fetched before the trial
trains and uploaded after each checkpoint, so a trial retried on another node continues
from its last uploaded epoch. ``fine_tune`` resumes from ``last.pt`` and returns a
complete run without training it again. The Tune checkpoint reported each epoch is a
small pointer (run folder, epoch) rather than a copy of ``last.pt``: a ResNet-50 U-Net's
weights and Adam state are ~400 MB, and copying them every epoch of 600 runs would cost
more than the training. It lets Tune know where a retried trial stands, and the trial
checks that the folder agrees.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from cluster.atomic import atomic_write_json
from cluster.config import from_dict
from finetune.config import FinetuneConfig
from finetune.run_checkpoint import LAST_CHECKPOINT, load_checkpoint
from finetune.run_folder import RunFolder
from finetune.run_metrics import METRICS_FILE, EpochRecord, RunMetrics, read_run_metrics
from finetune.sweep_config import FAULT_ENV, TRIAL_FILE, Trial
from finetune.train import fine_tune

POINTER_FILE = "position.json"
FAULT_MARKER = ".fault-injected"  # in a run folder: the test-only fault has fired


class InjectedFault(RuntimeError):
    """The test-only fault of ``MEDSSL_SWEEP_FAULT``."""


def run_trial(config: dict[str, Any]) -> None:
    """Tune's function trainable: ``config["run"]`` holds the trial and its fine-tuning
    config."""
    trial = Trial(**config["run"]["trial"])
    finetune = from_dict(FinetuneConfig, config["run"]["finetune"])
    folder = RunFolder(trial.run_dir)
    stored = folder.stored_metrics()
    if stored is not None and stored.complete:  # nothing to train, nothing to fetch
        tune.report(_final_metrics(stored))
        return
    run_dir = folder.open()
    cpus, gpus = _assigned_resources()
    torch.set_num_threads(max(1, int(cpus)))  # Ray's CPU share, so trials never oversubscribe
    if gpus > 0 and torch.cuda.is_available():
        cap_cuda_memory(gpus)
    else:
        finetune.device = "cpu"  # no GPU was given to this trial, even if the node has one
    started = time.monotonic()
    node_id = ray.get_runtime_context().get_node_id()
    info = _read_trial_info(run_dir)
    previous_seconds = float(info.get("wall_seconds", 0.0))
    info.update(trial=trial.key, node_id=node_id, torch_threads=torch.get_num_threads(),
                nodes=sorted({*info.get("nodes", []), node_id}))
    _check_pointer(trial.run_dir, run_dir)
    fault = _fault_epoch(trial, run_dir)
    every = finetune.checkpoint_every

    def report_epoch(record: EpochRecord) -> None:
        info["wall_seconds"] = round(previous_seconds + time.monotonic() - started, 3)
        atomic_write_json(run_dir / TRIAL_FILE, info)
        metrics = _epoch_metrics(record)
        if every and record.epoch % every == 0:
            with tempfile.TemporaryDirectory() as pointer:
                atomic_write_json(Path(pointer) / POINTER_FILE,
                                  {"run_dir": trial.run_dir, "epoch": record.epoch})
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(pointer))
        else:
            tune.report(metrics)
        if fault is not None and record.epoch == fault:
            (run_dir / FAULT_MARKER).touch()
            folder.upload(FAULT_MARKER)  # a retry on another node must see it too
            raise InjectedFault(f"{FAULT_ENV}: injected failure after epoch {fault}")

    context = {"trial": trial.key, "node_id": node_id, "torch_threads": torch.get_num_threads(),
               "ray_trial_id": tune.get_context().get_trial_id()}
    try:
        metrics = fine_tune(finetune, on_epoch=report_epoch, start_context=context,
                            folder=folder)
        info["wall_seconds"] = round(previous_seconds + time.monotonic() - started, 3)
        atomic_write_json(run_dir / TRIAL_FILE, info)
        folder.upload(TRIAL_FILE)
    finally:
        folder.close()  # a run in a store: its node-local copy goes (a retry fetches it)
    tune.report(_final_metrics(metrics))


def _final_metrics(metrics: RunMetrics) -> dict[str, Any]:
    return {"epoch": len(metrics.epochs),
            "val_dice": (metrics.convergence or {}).get("best_dice"),
            "test_dice": metrics.test.dice if metrics.test else None, "complete": True}


def cap_cuda_memory(fraction: float, cuda: Any = torch.cuda) -> float:
    """Cap this process's CUDA allocations to its GPU share; return the cap applied.

    With ``resources.gpu=0.25`` Ray lets four trials share a GPU, but nothing stops one
    from taking all of its memory and the others failing with out-of-memory errors.
    """
    cap = min(1.0, fraction)
    if cap < 1.0:
        cuda.set_per_process_memory_fraction(cap, 0)  # Ray shows the trial only its GPU
    return cap


def _assigned_resources() -> tuple[float, float]:
    assigned = ray.get_runtime_context().get_assigned_resources()
    return float(assigned.get("CPU", 1.0)), float(assigned.get("GPU", 0.0))


def _epoch_metrics(record: EpochRecord) -> dict[str, Any]:
    reported = {"epoch": record.epoch, "train_loss": record.train_loss,
                "images_per_s": record.train_images_per_s, "seconds": record.seconds,
                "complete": False}
    if record.val_dice is not None:  # an epoch between validations (val_every) has none
        reported["val_dice"] = record.val_dice
    return reported


def _read_trial_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / TRIAL_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _check_pointer(location: str, run_dir: Path) -> None:
    """A retried trial's Tune checkpoint must not be ahead of its run folder (``location``,
    worked on in ``run_dir``; behind means the folder lost epochs: another storage, or a
    deleted ``last.pt``)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as folder:
        pointer = json.loads((Path(folder) / POINTER_FILE).read_text())
    if pointer["run_dir"] != location:
        raise RuntimeError(f"Tune checkpoint names run folder {pointer['run_dir']}, "
                           f"this trial's is {location}")
    last = run_dir / LAST_CHECKPOINT
    checkpoint = load_checkpoint(last, mmap=True)
    saved = checkpoint.epochs if checkpoint is not None else None
    if saved is None and not _complete(run_dir):  # a complete run has deleted its last.pt
        raise RuntimeError(f"{run_dir}: Tune checkpoint is at epoch {pointer['epoch']} but "
                           f"the run folder holds no {LAST_CHECKPOINT} and no complete "
                           f"{METRICS_FILE}; is storage shared by every node?")
    if saved is not None and saved < pointer["epoch"]:
        raise RuntimeError(f"{last} holds {saved} epochs, Tune's checkpoint "
                           f"{pointer['epoch']}: the run folder lost epochs")


def _complete(run_dir: Path) -> bool:
    path = run_dir / METRICS_FILE
    return path.is_file() and read_run_metrics(path).complete


def _fault_epoch(trial: Trial, run_dir: Path) -> int | None:
    spec = os.environ.get(FAULT_ENV, "")
    key, _, epoch = spec.partition("@")
    if key != trial.key or (run_dir / FAULT_MARKER).exists():
        return None
    return int(epoch)
