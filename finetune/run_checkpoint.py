"""A fine-tuning run's ``last.pt``: what it takes to continue after its last saved epoch.

Saved every ``checkpoint_every`` epochs and deleted once the run is complete. The file
is a plain dict of tensors and JSON-like values (``weights_only=True`` loads it): the
model's and the optimizer's state dicts, the epoch records so far (as ``metrics.json``
holds them), the optimizer steps taken and the seconds spent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from cluster.atomic import atomic_path
from finetune.run_metrics import EpochRecord

LAST_CHECKPOINT = "last.pt"


@dataclass
class RunCheckpoint:
    model: dict[str, torch.Tensor]  # the U-Net's state dict
    optimizer: dict[str, Any]  # the optimizer's state dict
    history: list[EpochRecord]  # every finished epoch, in order
    step: int  # optimizer steps taken
    elapsed: float  # training + validation seconds so far (the records' ``seconds``)

    @property
    def epochs(self) -> int:
        return len(self.history)


def save_checkpoint(path: Path, checkpoint: RunCheckpoint) -> None:
    """Write ``checkpoint`` atomically: a crash while saving keeps the previous one."""
    state = {"model": checkpoint.model, "optimizer": checkpoint.optimizer,
             "history": [asdict(record) for record in checkpoint.history],
             "step": checkpoint.step, "elapsed": checkpoint.elapsed}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, mmap: bool = False) -> RunCheckpoint | None:
    """The checkpoint in ``path``, its tensors on the CPU; None when there is none.

    ``mmap``: map the tensors instead of reading them (to look at the history alone).
    A file without the expected keys is a ``ValueError`` naming the file and the key.
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated, not a torch file, or objects that need code
        raise ValueError(f"{path}: unreadable fine-tuning checkpoint ({exc}); move it away "
                         "to train the run from its start") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a fine-tuning checkpoint (a {type(state).__name__})")
    names = [f.name for f in fields(RunCheckpoint)]
    for name in names:
        if name not in state:
            raise ValueError(f"{path}: missing key {name!r}")
    unknown = [key for key in state if key not in names]
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}")
    if not isinstance(state["history"], list):
        raise ValueError(f"{path}: key 'history' holds a {type(state['history']).__name__}, "
                         "not a list of epoch records")
    history = [EpochRecord.from_json(record, f"history[{i}]", path)
               for i, record in enumerate(state["history"])]
    return RunCheckpoint(state["model"], state["optimizer"], history, int(state["step"]),
                         float(state["elapsed"]))
