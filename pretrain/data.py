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
from data_prep.read_ahead import read_ahead
from data_prep.shard_cache import ShardCache
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
                 skips: list[int], stretch: Stretch, read_ahead: int) -> None:
        super().__init__()
        self.shards, self.order, self.parts, self.skips = shards, order, parts, skips
        self.stretch, self.read_ahead = stretch, read_ahead

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        # A resumed stretch starts at the batch its reader ``done % readers`` owes, so the
        # DataLoader's first worker plays that reader and the round robin stays in step.
        reader = (slot + self.stretch.done) % self.stretch.readers
        part, skip, block = self.parts[reader], self.skips[reader], max(1, self.stretch.block)
        micro = self.stretch.micro_batch
        # Blocks start past the samples already delivered: skipped blocks are never read.
        blocks = [part[max(start, skip):start + block]
                  for start in range(skip - skip % block, len(part), block)]
        pending: list[np.ndarray] = []
        for images in self._blocks(blocks):
            for image in images:
                pending.append(image)
                if len(pending) == micro:
                    yield torch.from_numpy(np.stack(pending))
                    pending = []

    def _blocks(self, blocks: list[np.ndarray]) -> Iterator[list[np.ndarray]]:
        """Each block's images in delivery order. A block is read in file order (a few
        ranged reads, see ``IndexedShards.plan``); reads of this block and the next ones
        run ``read_ahead`` at a time while earlier ones are decoded."""
        requests = ((number, request) for number, positions in enumerate(blocks)
                    for request in self.shards.plan(self.order[positions]))
        current, images = 0, [None] * (len(blocks[0]) if blocks else 0)
        for (number, request), data in read_ahead(
                requests, lambda item: self.shards.fetch(item[1]), self.read_ahead):
            if number != current:
                yield images  # type: ignore[misc]  # every slot of the block is filled
                current, images = number, [None] * len(blocks[number])
            for slot, image in zip(request.slots, self.shards.decode(request, data)):
                images[slot] = image
        if blocks:
            yield images  # type: ignore[misc]


def build_loader(data_path: str, *, seed: int, epoch: int, rank: int, stretch: Stretch,
                 history: Sequence[Stretch] = (), epoch_samples: int = 0,
                 resampled: bool = False, pin_memory: bool = False, read_ahead: int = 8,
                 cache: ShardCache | None = None) -> DataLoader:
    """Rank ``rank``'s loader for one stretch of ``epoch``: exactly ``stretch.batches -
    stretch.done`` tensors (micro_batch, C, H, W) float32, the samples no earlier stretch of
    the epoch (``history``) delivered. ``data_path`` may be an ``s3://`` URL; each worker
    keeps ``read_ahead`` reads in flight, through ``cache`` when given."""
    shards = IndexedShards(data_path, cache=cache)
    length = pretrain_epoch_samples(data_path, epoch_samples, resampled)
    order = epoch_order(shards.counts, seed=seed, epoch=epoch, length=length,
                        resampled=resampled)
    unread = unread_positions(length, history, seed=seed, epoch=epoch)
    parts = [reader_positions(unread, stretch, rank=rank, reader=reader, seed=seed,
                              epoch=epoch, index=len(history))
             for reader in range(stretch.readers)]
    skips = [stretch.reader_batches(r, stretch.done) * stretch.micro_batch
             for r in range(stretch.readers)]
    if shards.remote:  # the index files this rank needs, before the workers fork
        shards.load_tables(np.searchsorted(shards.starts, order[np.concatenate(parts)],
                                           side="right") - 1, parallel=read_ahead)
    reader = _StretchReader(shards, order, parts, skips, stretch, read_ahead)
    return DataLoader(reader, batch_size=None, num_workers=stretch.workers,
                      pin_memory=pin_memory, persistent_workers=False)
