"""What a pretraining checkpoint holds: one typed, versioned record and its strict reader.

``checkpoints/last.pt`` (and each kept ``epochNNNN.pt``) is a plain dict of tensors,
numbers, strings, lists and dicts, saved with ``torch.save`` and read back with
``weights_only=True`` only: nothing in it can run code when loaded. The dict's keys are
the fields of :class:`PretrainCheckpoint`. Files written before ``format_version`` existed
(the key is absent) still load: the keys added over time get the defaults the engine
always applied to them. ``pretrain.checkpoint`` writes the files and finds the latest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
# The exported network's entries in ``model`` (a method's state dict): SSLMethod.online_encoder
ENCODER_PREFIX = "online_encoder."
# What every file has had since the first one; a file without format_version needs no more.
LEGACY_REQUIRED = ("model", "config", "epoch", "step")


@dataclass(kw_only=True)
class PretrainCheckpoint:
    """The whole state of a run after ``epoch`` finished epochs and ``position`` optimizer
    steps of the next one. Defaults are those of files from before ``format_version``."""

    model: dict[str, torch.Tensor]  # the method's state dict: online, target, heads
    config: dict[str, Any]  # the run's resolved config (cluster.config.to_dict)
    epoch: int  # finished epochs
    step: int  # optimizer steps taken, all epochs together
    optimizer: dict[str, Any] | None = None  # whole optimizer state; None when sharded
    zero_shards: str | None = None  # folder in checkpoints/ of per-rank optimizer shards
    position: int = 0  # optimizer steps done in epoch ``epoch`` (the data position)
    global_batch: int | None = None  # samples per step when saved; None: unknown
    grad_accum: int = 1  # micro batches per step when saved
    world_size: int | None = None  # ranks when saved; None: unknown
    rng: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per rank, rank order
    # the current epoch's loader stretches (pretrain.epoch_loader.EpochReading.stretches_at)
    loader_stretches: list[dict[str, Any]] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The online encoder's weights under timm's names (the prefix removed): what an
        export holds and what ``model.init`` or fine-tuning's ``--init`` load."""
        return {key[len(ENCODER_PREFIX):]: value for key, value in self.model.items()
                if key.startswith(ENCODER_PREFIX)}

    def to_dict(self) -> dict[str, Any]:
        """The dict ``torch.save`` writes (the tensors themselves, not copies)."""
        return {entry.name: getattr(self, entry.name) for entry in fields(self)}

    @classmethod
    def from_dict(cls, data: object, source: str | Path) -> PretrainCheckpoint:
        """Check a loaded file's contents against the schema; ``source`` names it in errors."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: not a pretrain checkpoint (it holds a "
                             f"{type(data).__name__}, not a dict)")
        version = data.get("format_version")
        required: tuple[str, ...]
        if version is None:
            required = LEGACY_REQUIRED
        elif type(version) is int and version == FORMAT_VERSION:
            required = tuple(entry.name for entry in fields(cls))
        else:
            raise ValueError(f"{source}: checkpoint format_version {version!r} is not "
                             f"supported (expected {FORMAT_VERSION}, or none in files "
                             "from before format versions)")
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(f"{source}: not a pretrain checkpoint (no {', '.join(missing)})")
        unknown = sorted(str(key) for key in data if key not in _CHECKS)
        if unknown:
            raise ValueError(f"{source}: not a pretrain checkpoint (unknown key {unknown[0]!r})")
        for key, value in data.items():
            check, expected = _CHECKS[key]
            if not check(value):
                raise ValueError(f"{source}: checkpoint key {key!r} holds "
                                 f"{type(value).__name__}, expected {expected}")
        if data.get("zero_shards") and data.get("world_size") is None:
            raise ValueError(f"{source}: checkpoint key 'zero_shards' names optimizer shards "
                             "but 'world_size' does not say how many")
        return cls(**{**data, "format_version": FORMAT_VERSION})


def read_checkpoint(path: str | Path, *, mmap: bool = False) -> PretrainCheckpoint:
    """Load a pretrain checkpoint weights-only and check it; ``ValueError`` naming the file
    (and the key) when it is not one. ``mmap=True`` maps the file instead of reading the
    tensors into memory: for callers that need only the small entries (config, epoch,
    step)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise ValueError(f"{path}: not a pretrain checkpoint (cannot load it weights-only: "
                         f"{exc})") from None
    return PretrainCheckpoint.from_dict(data, path)


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is an int subclass, and no count


def _optional_int(value: object) -> bool:
    return value is None or _is_int(value)


def _tensor_dict(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _list_of(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: isinstance(value, list) and all(check(item) for item in value)


def _is_dict(value: object) -> bool:
    return isinstance(value, dict)


# Each key: a check of its value, and what the error says was expected.
_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "model": (_tensor_dict, "a dict of tensors"),
    "config": (_is_dict, "a dict"),
    "epoch": (_is_int, "an int"),
    "step": (_is_int, "an int"),
    "optimizer": (lambda value: value is None or _is_dict(value), "a dict or None"),
    "zero_shards": (lambda value: value is None or isinstance(value, str), "a str or None"),
    "position": (_is_int, "an int"),
    "global_batch": (_optional_int, "an int or None"),
    "grad_accum": (_is_int, "an int"),
    "world_size": (_optional_int, "an int or None"),
    "rng": (_list_of(_tensor_dict), "a list of dicts of tensors"),
    "loader_stretches": (_list_of(_is_dict), "a list of dicts"),
    "format_version": (_is_int, "an int"),
}
