"""The pretraining loader: prepared shards -> batches of decoded 1-channel images.

Each epoch is split exactly across nodes, ranks and DataLoader workers by
:mod:`pretrain.epoch_plan`; workers only read and decode, through the shards' index files
(:class:`data_prep.shard_reader.IndexedShards`), and augmentation runs batched on the
training device. Why not WebDataset's own streaming pipeline: it splits whole shards, so
ranks get unequal sample counts (a DDP step then waits forever on the rank that ran
out), and it can only resume an epoch by reading everything before the resume point.
The shards stay WebDataset tars; DALI reads the same ones with the same index files.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.manifest import Manifest
from data_prep.shard_reader import IndexedShards
from pretrain.epoch_plan import Stretch, epoch_order, reader_positions, unread_positions

__all__ = ["Stretch", "build_loader", "pretrain_epoch_samples"]


def pretrain_epoch_samples(data_path: str, requested: int, resampled: bool = False) -> int:
    """Samples per epoch: the configured number, else the shards' slice count."""
    available = int(Manifest.read(data_path).counts["pretrain_slices"])
    if requested <= 0:
        return available
    if requested > available and not resampled:
        raise ValueError(f"data.epoch_samples {requested} exceeds the {available} slices of "
                         f"{data_path}; set data.resampled=true to draw shards with "
                         "replacement for a fixed epoch length")
    return requested


class _StretchReader(IterableDataset):
    """One rank's part of a stretch; each DataLoader worker yields its own batches."""

    def __init__(self, shards: IndexedShards, order: np.ndarray, parts: list[np.ndarray],
                 skips: list[int], stretch: Stretch) -> None:
        super().__init__()
        self.shards, self.order, self.parts, self.skips = shards, order, parts, skips
        self.stretch = stretch

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        # A resumed stretch starts at the batch its reader ``done % readers`` owes, so the
        # DataLoader's first worker plays that reader and the round robin stays in step.
        reader = (slot + self.stretch.done) % self.stretch.readers
        part, skip, block = self.parts[reader], self.skips[reader], max(1, self.stretch.block)
        micro = self.stretch.micro_batch
        pending: list[np.ndarray] = []
        # Read a block at a time (in file order, inside IndexedShards), starting past the
        # samples already delivered: skipped blocks are never read.
        for start in range(skip - skip % block, len(part), block):
            positions = part[max(start, skip):start + block]
            for image in self.shards.read(self.order[positions]):
                pending.append(image)
                if len(pending) == micro:
                    yield torch.from_numpy(np.stack(pending))
                    pending = []


def build_loader(data_path: str, *, seed: int, epoch: int, rank: int, stretch: Stretch,
                 history: Sequence[Stretch] = (), epoch_samples: int = 0,
                 resampled: bool = False, pin_memory: bool = False) -> DataLoader:
    """Rank ``rank``'s loader for one stretch of ``epoch``: exactly ``stretch.batches -
    stretch.done`` tensors (micro_batch, C, H, W) float32, the samples no earlier stretch of
    the epoch (``history``) delivered."""
    shards = IndexedShards(data_path)
    length = pretrain_epoch_samples(data_path, epoch_samples, resampled)
    order = epoch_order(shards.counts, seed=seed, epoch=epoch, length=length,
                        resampled=resampled)
    unread = unread_positions(length, history, seed=seed, epoch=epoch)
    parts = [reader_positions(unread, stretch, rank=rank, reader=reader, seed=seed,
                              epoch=epoch, index=len(history))
             for reader in range(stretch.readers)]
    skips = [stretch.reader_batches(r, stretch.done) * stretch.micro_batch
             for r in range(stretch.readers)]
    reader = _StretchReader(shards, order, parts, skips, stretch)
    return DataLoader(reader, batch_size=None, num_workers=stretch.workers,
                      pin_memory=pin_memory, persistent_workers=False)
