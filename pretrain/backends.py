"""Distributed backends of the pretraining loop: DDP, or a DeepSpeed engine.

Both run the same method and optimizer and take one optimizer step over
``optim.grad_accum`` micro batches; they differ in who averages gradients across ranks
and in where the optimizer state lives: whole on every rank (DDP, DeepSpeed ZeRO 0), or
sharded across ranks (ZeRO 1 and 2), each rank then saving its own shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cluster.distributed import DistInfo
from pretrain.methods import SSLMethod
from pretrain.step import ViewPairs, accumulated_step


class Backend(Protocol):
    method: SSLMethod  # the plain module: state dicts, export, embeddings
    sharded_optimizer: bool  # True: save_shard/load_shards hold the optimizer state

    def step(self, micro_batches: ViewPairs, count: int, *, lr: float,
             momentum: float) -> torch.Tensor: ...

    def train(self) -> None: ...

    def optimizer_state(self) -> dict[str, Any] | None: ...

    def load_optimizer_state(self, state: dict[str, Any]) -> None: ...

    def save_shard(self, folder: Path, rank: int) -> None: ...

    def load_shards(self, files: list[Path]) -> None: ...


class DDPBackend:
    """torch DistributedDataParallel (or the bare module in a world of one)."""

    sharded_optimizer = False

    def __init__(self, method: SSLMethod, optimizer: torch.optim.Optimizer, dist: DistInfo,
                 *, precision: str, channels_last: bool, compile: bool) -> None:
        if channels_last:  # in place: the optimizer keeps its parameters
            method.to(memory_format=torch.channels_last)
        self.method, self.optimizer = method, optimizer
        self.precision, self.channels_last = precision, channels_last
        trained: nn.Module = DistributedDataParallel(method) if dist.distributed else method
        # torch.compile of a module returns an OptimizedModule; its stubs say a callable
        self.trained = cast(nn.Module, torch.compile(trained)) if compile else trained

    def step(self, micro_batches: ViewPairs, count: int, *, lr: float,
             momentum: float) -> torch.Tensor:
        return accumulated_step(self.trained, self.method, self.optimizer, micro_batches,
                                count, lr=lr, momentum=momentum, precision=self.precision,
                                channels_last=self.channels_last)

    def train(self) -> None:
        self.trained.train()

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def save_shard(self, folder: Path, rank: int) -> None:
        raise NotImplementedError("DDP keeps the whole optimizer state on every rank")

    def load_shards(self, files: list[Path]) -> None:
        raise NotImplementedError("DDP keeps the whole optimizer state on every rank")


def build_backend(name: str, method: SSLMethod, optimizer: torch.optim.Optimizer,
                  dist: DistInfo, *, micro_batch: int, grad_accum: int, zero_stage: int,
                  precision: str, channels_last: bool, compile: bool) -> Backend:
    if name == "ddp":
        return DDPBackend(method, optimizer, dist, precision=precision,
                          channels_last=channels_last, compile=compile)
    if name == "deepspeed":
        from pretrain.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(method, optimizer, dist, micro_batch=micro_batch,
                                grad_accum=grad_accum, zero_stage=zero_stage,
                                precision=precision, channels_last=channels_last,
                                compile=compile)
    raise ValueError(f"run.backend: unknown backend {name!r} (ddp or deepspeed)")
