"""Opening one epoch's loader for the engine, resuming mid-epoch where a checkpoint left it.

``data.loader=webdataset`` (default) reads exact, resumable stretches (``pretrain.data``);
the checkpoint records every stretch of the current epoch, so a restart continues the
same stretch (same world size and batching: the same batches as an uninterrupted run) or
starts a new one over exactly the samples not yet delivered. ``data.loader=dali`` runs
the DALI pipeline, which also augments: its batches are view pairs already; DALI cannot
seek, so a resumed epoch reads and drops the batches its checkpoint had consumed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import torch

from cluster.distributed import DistInfo
from data_prep.shard_cache import ShardCache
from pretrain.batching import BatchPlan
from pretrain.config import PretrainConfig
from pretrain.data import Stretch, build_loader


@dataclass
class EpochReading:
    """An epoch's micro batches from step ``first`` on, and what a checkpoint records."""

    batches: Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    first: int
    accum: int
    stretch: Stretch | None = None  # None: DALI, positions not recorded
    history: list[Stretch] = field(default_factory=list)

    def stretches_at(self, steps_done: int) -> list[dict]:
        """The checkpoint entry after ``steps_done`` optimizer steps of this epoch."""
        if self.stretch is None or steps_done == 0:
            return []
        done = self.stretch.done + (steps_done - self.first) * self.accum
        return [asdict(s) for s in [*self.history, replace(self.stretch, done=done)]]


def open_epoch(config: PretrainConfig, plan: BatchPlan, dist: DistInfo, epoch: int,
               first: int, saved: list[dict]) -> EpochReading:
    """The loader of ``epoch`` starting at its optimizer step ``first``; ``saved`` is the
    checkpoint's stretches when resuming inside this epoch."""
    accum, data = plan.grad_accum, config.data
    seed = config.run.seed  # the epoch order mixes in the epoch itself
    if data.loader == "dali":
        return EpochReading(_dali_batches(config, plan, dist, epoch, first * accum), first, accum)
    stretch = Stretch(world_size=plan.world_size, micro_batch=plan.micro_batch,
                      workers=data.workers, block=data.shuffle_buffer,
                      batches=(plan.steps_per_epoch - first) * accum)
    history = [Stretch(**entry) for entry in saved]
    if history and history[-1].continues(stretch):
        stretch, history = history[-1], history[:-1]
    elif first and not history:
        print(f"warning: the checkpoint of epoch {epoch + 1} does not record which samples "
              "it read; the rest of the epoch is drawn from all of them", file=sys.stderr)
    cache = ShardCache(data.cache_dir, int(data.cache_max_gb * 2**30)) \
        if data.cache_dir else None
    loader = build_loader(data.path, seed=seed, epoch=epoch, rank=dist.rank, stretch=stretch,
                          history=history, epoch_samples=data.epoch_samples,
                          resampled=data.resampled, pin_memory=dist.device.type == "cuda",
                          read_ahead=data.read_ahead, cache=cache)
    return EpochReading(iter(loader), first, accum, stretch, history)


def _dali_batches(config: PretrainConfig, plan: BatchPlan, dist: DistInfo, epoch: int,
                  skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from pretrain.dali_loader import build_dali_loader

    pairs = build_dali_loader(
        config.data.path, per_rank_batch=plan.micro_batch, rank=dist.rank,
        world_size=plan.world_size, seed=config.run.seed + epoch, device=dist.device,
        shuffle_buffer=config.data.shuffle_buffer, threads=max(1, config.data.workers),
        views=(config.augment.view1, config.augment.view2), crop_size=config.data.crop_size)
    for _ in range(skip):
        next(pairs)
    return pairs  # type: ignore[return-value]
