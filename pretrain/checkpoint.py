"""Pretraining checkpoints in a run folder: atomic writes, weights-only loads, latest-first
resume.

A checkpoint holds the whole state of a run: online and target networks, optimizer, the
number of finished epochs and of batches consumed in the current one (the data
position), the step, and every rank's random-number generator states. Its contents are
a :class:`~pretrain.checkpoint_state.PretrainCheckpoint`; this module places the files.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as torch_dist

from cluster.atomic import atomic_path
from cluster.distributed import DistInfo
from pretrain.checkpoint_state import PretrainCheckpoint, read_checkpoint

CHECKPOINT_DIR = "checkpoints"
LATEST = "last.pt"


_SHARD_PREFIX = "zero-step"
# the end-of-epoch copies run.keep_epochs asks for (fine-tuning sweeps read them by epoch)
_KEPT = re.compile(r"epoch(\d{4,})\.pt")


def kept_checkpoint_name(epoch: int) -> str:
    return f"epoch{epoch:04d}.pt"


def kept_checkpoint_epoch(path: Path) -> int | None:
    """The epoch of a kept end-of-epoch checkpoint (``RUN/checkpoints/epochNNNN.pt``);
    None for any other file."""
    match = _KEPT.fullmatch(path.name)
    return int(match.group(1)) if match and path.parent.name == CHECKPOINT_DIR else None


def shard_folder_name(step: int) -> str:
    return f"{_SHARD_PREFIX}{step:09d}"


def shard_name(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def save_checkpoint(run_dir: Path, state: PretrainCheckpoint,
                    keep_as: str | None = None) -> Path:
    """Write ``checkpoints/last.pt`` atomically (and a kept copy named ``keep_as``).

    With a sharded optimizer (DeepSpeed ZeRO 1-2) every rank has already written its
    shard into the folder ``state.zero_shards``; ``last.pt`` points at it, a kept copy
    gets a copy of its own, and shard folders no checkpoint points at are removed, only
    after ``last.pt`` has moved on to the new one.
    """
    folder = run_dir / CHECKPOINT_DIR
    with atomic_path(folder / LATEST) as tmp:
        torch.save(state.to_dict(), tmp)
    shards = state.zero_shards
    if keep_as:
        kept = state
        if shards:
            kept_shards = f"{Path(keep_as).stem}-zero"
            kept = replace(state, zero_shards=kept_shards)
            with atomic_path(folder / kept_shards) as tmp:
                shutil.copytree(folder / shards, tmp)
        with atomic_path(folder / keep_as) as tmp:
            torch.save(kept.to_dict(), tmp)
    for old in folder.glob(f"{_SHARD_PREFIX}*"):
        if old.name != shards and old.is_dir():
            shutil.rmtree(old)
    return folder / LATEST


def shard_files(run_dir: Path, checkpoint: PretrainCheckpoint) -> list[Path]:
    """The per-rank optimizer shard files a checkpoint points at, checked to exist."""
    folder = run_dir / CHECKPOINT_DIR / str(checkpoint.zero_shards)
    ranks = checkpoint.world_size or 0  # the reader requires it beside zero_shards
    files = [folder / shard_name(rank) for rank in range(ranks)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{run_dir / CHECKPOINT_DIR / LATEST}: optimizer shards missing: "
                         + ", ".join(missing))
    return files


def load_latest(run_dir: Path) -> PretrainCheckpoint | None:
    """The run's latest checkpoint, read strictly; None when it has none yet."""
    path = run_dir / CHECKPOINT_DIR / LATEST
    if not path.is_file():
        return None
    try:
        return read_checkpoint(path)
    except ValueError as exc:
        raise ValueError(f"{exc}; move it away to restart") from None


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def gather_rng(dist: DistInfo) -> list[dict[str, torch.Tensor]]:
    """Every rank's generator states, in rank order (collective: all ranks call it)."""
    if not dist.distributed:
        return [_rng_state()]
    states: list[dict[str, torch.Tensor] | None] = [None] * dist.world_size
    torch_dist.all_gather_object(states, _rng_state())
    return [state for state in states if state is not None]


def restore_rng(states: list[dict[str, torch.Tensor]], rank: int, world_size: int) -> None:
    """Restore this rank's generators; after an elastic change of world size the ranks
    keep their fresh per-rank seeds instead."""
    if len(states) != world_size:
        return
    torch.set_rng_state(states[rank]["torch"])
    if "cuda" in states[rank] and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[rank]["cuda"])
