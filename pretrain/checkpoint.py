"""Pretraining checkpoints: atomic writes, weights-only loads, latest-first resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cluster.atomic import atomic_path

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
