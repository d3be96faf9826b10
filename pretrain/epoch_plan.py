"""Which samples each rank and loader worker reads in an epoch, exactly and resumably.

An epoch is an *order*: the shards in a random order (seeded by run seed and epoch, the
same on every rank), each shard's samples in stored order, cut to the epoch length. With
``data.resampled`` the shards are instead drawn with replacement until the fixed epoch
length is filled, so an epoch's length does not depend on the dataset's size.

The order is read in *stretches*: one stretch per (re)start of the epoch, each with one
world size, micro batch and worker count. A stretch cuts the samples still unread into
one contiguous part per rank and each part into one per worker (so every reader streams
through a few shards), and delivers ``batches`` micro batches per rank: every sample is
read at most once per epoch, and only a tail shorter than one global batch goes unread.
A worker shuffles its part in blocks of ``block`` samples (the shuffle buffer): one block
is read at a time, in file order, and emitted permuted. Because a block's permutation is
a pure function of the seed, a restarted stretch skips the blocks it had already
delivered without reading them, and a new stretch after an elastic restart (another
world size) is cut from exactly the samples the earlier stretches left unread.

Positions below index the epoch's order (not sample numbers: a resampled order may hold
a sample twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stretch:
    """One uninterrupted reading of (part of) an epoch; ``done`` counts micro batches per
    rank already delivered when the stretch is resumed."""

    world_size: int
    micro_batch: int
    workers: int  # DataLoader worker processes; 0 reads in the training process
    block: int  # shuffle block, samples; <= 1 keeps the order
    batches: int  # micro batches each rank delivers in this stretch
    done: int = 0

    def __post_init__(self) -> None:
        if min(self.world_size, self.micro_batch, self.batches) < 1 or self.workers < 0:
            raise ValueError(f"invalid loader stretch {self}")
        if not 0 <= self.done <= self.batches:
            raise ValueError(f"stretch done {self.done} outside 0..{self.batches}")

    @property
    def readers(self) -> int:
        return max(1, self.workers)

    def samples(self) -> int:
        """Samples the stretch takes from the unread order, all ranks together."""
        return self.world_size * self.batches * self.micro_batch

    def reader_batches(self, reader: int, upto: int | None = None) -> int:
        """Micro batches reader ``reader`` delivers among the rank's first ``upto``: the
        DataLoader takes batch ``j`` from worker ``j % workers``."""
        end = self.batches if upto is None else upto
        return len(range(reader, end, self.readers))

    def continues(self, fresh: Stretch) -> bool:
        """Whether resuming this (checkpointed) stretch delivers what the ``fresh`` one
        planned at restart would: same split, and exactly its remaining batches."""
        return (self.world_size, self.micro_batch, self.workers, self.block) == \
            (fresh.world_size, fresh.micro_batch, fresh.workers, fresh.block) and \
            self.batches - self.done == fresh.batches


def epoch_order(counts: Sequence[int] | np.ndarray, *, seed: int, epoch: int, length: int,
                resampled: bool) -> np.ndarray:
    """Sample numbers of one epoch, in reading order (see the module docstring)."""
    sizes = np.asarray(counts, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    total = int(starts[-1])
    if length < 1:
        raise ValueError(f"an epoch needs at least one sample, got length {length}")
    if not resampled and length > total:
        raise ValueError(f"an epoch of {length} samples is longer than the dataset's "
                         f"{total}; set data.resampled=true to draw shards with replacement")
    rng = np.random.default_rng([seed, epoch])
    pieces, have = [], 0
    shards = iter(rng.permutation(len(sizes))) if not resampled else None
    while have < length:
        shard = int(next(shards)) if shards is not None else int(rng.integers(len(sizes)))
        pieces.append(np.arange(starts[shard], starts[shard + 1]))
        have += int(sizes[shard])
    return np.concatenate(pieces)[:length]


def reader_positions(unread: np.ndarray, stretch: Stretch, *, rank: int, reader: int,
                     seed: int, epoch: int, index: int) -> np.ndarray:
    """Positions reader ``reader`` of ``rank`` delivers in stretch number ``index`` of the
    epoch, in delivery order (its contiguous part of ``unread``, block-shuffled)."""
    if len(unread) < stretch.samples():
        raise ValueError(f"stretch {stretch} needs {stretch.samples()} samples but "
                         f"only {len(unread)} of the epoch are unread")
    if not (0 <= rank < stretch.world_size and 0 <= reader < stretch.readers):
        raise ValueError(f"rank {rank} / reader {reader} outside stretch {stretch}")
    per_rank = stretch.batches * stretch.micro_batch
    sizes = [stretch.reader_batches(r) * stretch.micro_batch for r in range(stretch.readers)]
    begin = rank * per_rank + sum(sizes[:reader])
    part = unread[begin:begin + sizes[reader]].copy()
    if stretch.block > 1:
        rng = np.random.default_rng([seed, epoch, index, rank, reader])
        for start in range(0, len(part), stretch.block):
            part[start:start + stretch.block] = rng.permutation(part[start:start + stretch.block])
    return part


def unread_positions(length: int, history: Sequence[Stretch], *, seed: int,
                     epoch: int) -> np.ndarray:
    """Positions of the epoch not delivered by the earlier ``history`` stretches, in order."""
    unread = np.arange(length)
    for index, stretch in enumerate(history):
        delivered = [
            reader_positions(unread, stretch, rank=rank, reader=reader, seed=seed, epoch=epoch,
                             index=index)[:stretch.reader_batches(reader, stretch.done)
                                          * stretch.micro_batch]
            for rank in range(stretch.world_size) for reader in range(stretch.readers)]
        unread = unread[~np.isin(unread, np.concatenate(delivered))]
    return unread
