"""Pretraining checkpoints: atomic writes, weights-only loads, latest-first resume.

A checkpoint holds the whole state of a run: online and target networks, optimizer, the
number of finished epochs and of batches consumed in the current one (the data
position), the step, and every rank's random-number generator states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from cluster.atomic import atomic_path
from cluster.distributed import DistInfo

CHECKPOINT_DIR = "checkpoints"
LATEST = "last.pt"


def save_checkpoint(run_dir: Path, state: dict[str, Any], keep_as: str | None = None) -> Path:
    """Write ``checkpoints/last.pt`` atomically (and a kept copy named ``keep_as``)."""
    folder = run_dir / CHECKPOINT_DIR
    targets = [folder / LATEST] + ([folder / keep_as] if keep_as else [])
    for target in targets:
        with atomic_path(target) as tmp:
            torch.save(state, tmp)
    return targets[0]


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
