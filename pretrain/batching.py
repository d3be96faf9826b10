"""How a run's batches divide over ranks and micro batches, recomputed at every start.

An elastic launch (``torchrun --nnodes MIN:MAX``) may restart a run with another world
size. The plan is therefore derived from the world size each time a process starts,
never read back from a checkpoint: with a global ``data.batch_size`` the per-rank micro
batch shrinks or grows and the learning rate stays; with ``data.batch_per_rank`` the
global batch, and with it the (linearly scaled) learning rate, follows the world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pretrain.config import PretrainConfig
from pretrain.optim import scaled_lr


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    grad_accum: int  # micro batches per optimizer step
    micro_batch: int  # samples per rank in one forward/backward
    global_batch: int  # samples per optimizer step, all ranks together
    steps_per_epoch: int
    peak_lr: float

    def resume_point(self, epoch_samples_done: int) -> int:
        """Optimizer steps of the current epoch already covered by ``epoch_samples_done``
        samples (consumed under an earlier plan, possibly with another world size)."""
        return min(self.steps_per_epoch, math.ceil(epoch_samples_done / self.global_batch))


def plan_batches(config: PretrainConfig, world_size: int, epoch_samples: int) -> BatchPlan:
    accum = config.optim.grad_accum
    if accum < 1:
        raise ValueError(f"optim.grad_accum must be >= 1, got {accum}")
    if config.data.batch_per_rank > 0:
        micro = config.data.batch_per_rank
    else:
        per_step = world_size * accum
        if config.data.batch_size < 1 or config.data.batch_size % per_step:
            raise ValueError(
                f"data.batch_size {config.data.batch_size} is not divisible by world size "
                f"{world_size} x optim.grad_accum {accum}; change it, or set "
                "data.batch_per_rank for a global batch that follows the world size")
        micro = config.data.batch_size // per_step
    global_batch = micro * world_size * accum
    if epoch_samples < global_batch:
        raise ValueError(f"an epoch of {epoch_samples} samples is shorter than one global "
                         f"batch of {global_batch}; lower the batch or raise "
                         "data.epoch_samples")
    return BatchPlan(world_size=world_size, grad_accum=accum, micro_batch=micro,
                     global_batch=global_batch,
                     steps_per_epoch=epoch_samples // global_batch,
                     peak_lr=scaled_lr(config.optim.lr, global_batch))
