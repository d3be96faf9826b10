"""Pretraining checkpoints: atomic writes, weights-only loads, latest-first resume.

A checkpoint holds the whole state of a run: online and target networks, optimizer, the
number of finished epochs and of batches consumed in the current one (the data
position), the step, and every rank's random-number generator states.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from cluster.atomic import atomic_path
from cluster.distributed import DistInfo

CHECKPOINT_DIR = "checkpoints"
LATEST = "last.pt"


SHARDS_KEY = "zero_shards"  # folder (in checkpoints/) of the per-rank optimizer shards
_SHARD_PREFIX = "zero-step"


def shard_folder_name(step: int) -> str:
    return f"{_SHARD_PREFIX}{step:09d}"


def shard_name(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def save_checkpoint(run_dir: Path, state: dict[str, Any], keep_as: str | None = None) -> Path:
    """Write ``checkpoints/last.pt`` atomically (and a kept copy named ``keep_as``).

    With a sharded optimizer (DeepSpeed ZeRO 1-2) every rank has already written its
    shard into the folder ``state[SHARDS_KEY]``; ``last.pt`` points at it, a kept copy
    gets a copy of its own, and shard folders no checkpoint points at are removed, only
    after ``last.pt`` has moved on to the new one.
    """
    folder = run_dir / CHECKPOINT_DIR
    with atomic_path(folder / LATEST) as tmp:
        torch.save(state, tmp)
    shards = state.get(SHARDS_KEY)
    if keep_as:
        kept = state
        if shards:
            kept = {**state, SHARDS_KEY: f"{Path(keep_as).stem}-zero"}
            with atomic_path(folder / kept[SHARDS_KEY]) as tmp:
                shutil.copytree(folder / shards, tmp)
        with atomic_path(folder / keep_as) as tmp:
            torch.save(kept, tmp)
    for old in folder.glob(f"{_SHARD_PREFIX}*"):
        if old.name != shards and old.is_dir():
            shutil.rmtree(old)
    return folder / LATEST


def shard_files(run_dir: Path, checkpoint: dict[str, Any]) -> list[Path]:
    """The per-rank optimizer shard files a checkpoint points at, checked to exist."""
    folder = run_dir / CHECKPOINT_DIR / str(checkpoint[SHARDS_KEY])
    files = [folder / shard_name(rank) for rank in range(int(checkpoint["world_size"]))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{run_dir / CHECKPOINT_DIR / LATEST}: optimizer shards missing: "
                         + ", ".join(missing))
    return files


def load_latest(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / CHECKPOINT_DIR / LATEST
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{path}: unreadable checkpoint ({exc}); move it away to restart") from None


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
