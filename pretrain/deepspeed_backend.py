"""The pretraining step under a DeepSpeed engine (ZeRO stage 0, 1 or 2), launched by torchrun.

medssl keeps its own optimizer, schedule and checkpoints: DeepSpeed runs forward,
backward, gradient averaging, accumulation and the (sharded) optimizer step. With ZeRO
1 and 2 each rank holds a shard of the optimizer state; it saves that shard itself,
stripped of the Python objects DeepSpeed puts beside the tensors, so that every
checkpoint file loads with ``torch.load(weights_only=True)``. The shards are written
"elastic" (merged and re-cut at load time), so a run may resume on another world size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cluster.atomic import atomic_path
from cluster.deepspeed_presets import deepspeed_config
from cluster.distributed import DistInfo
from pretrain.checkpoint import shard_name
from pretrain.methods import SSLMethod
from pretrain.optim import LARS
from pretrain.step import ViewPairs, over_micro_batches, uses_bf16

# Entries of a ZeRO optimizer state that are Python objects, not tensors: the loss scaler
# (static 1.0 without fp16; the engine keeps its own when the entry is absent), and the
# parameter-fragment map, used only by DeepSpeed's "universal" checkpoint conversion.
_OBJECT_ENTRIES = ("loss_scaler", "param_slice_mappings", "universal_checkpoint_info")


def _import_deepspeed() -> Any:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError(
            "run.backend=deepspeed needs DeepSpeed: install it after torch with "
            "`pip install --no-build-isolation deepspeed` (or use run.backend=ddp)"
        ) from exc
    return deepspeed


def _optimizer_step(optimizer: torch.optim.Optimizer) -> int:
    steps = [int(entry["step"]) for entry in optimizer.state.values() if "step" in entry]
    return max(steps, default=0)


class DeepSpeedBackend:
    def __init__(self, method: SSLMethod, optimizer: torch.optim.Optimizer, dist: DistInfo,
                 *, micro_batch: int, grad_accum: int, zero_stage: int, precision: str,
                 channels_last: bool, compile: bool) -> None:
        if zero_stage > 0 and isinstance(optimizer, LARS):
            # ZeRO flattens each parameter group into one tensor before the optimizer sees
            # it: LARS's per-layer trust ratio would become one ratio for the whole group.
            raise ValueError("optim.name=lars needs per-layer parameter norms, which ZeRO "
                             f"stage {zero_stage} flattens away; use run.zero_stage=0 or "
                             "optim.name=adamw")
        deepspeed = _import_deepspeed()
        config = deepspeed_config(zero_stage, micro_batch, grad_accum,
                                  bf16=uses_bf16(dist.device, precision))
        if zero_stage > 0:
            config["zero_optimization"]["elastic_checkpoint"] = True
        if not torch.distributed.is_initialized():
            # A world of one (plain `python -m pretrain`) has no process group, which
            # DeepSpeed needs: an in-process store makes one without opening a port.
            torch.distributed.init_process_group(
                "nccl" if dist.device.type == "cuda" else "gloo",
                store=torch.distributed.HashStore(), rank=0, world_size=1)
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on reading it
        self.method, self.base_optimizer = method, optimizer
        # DeepSpeed broadcasts each parameter as raw bytes at start-up, which needs the
        # default (contiguous) layout: channels_last stays a DDP-path speed-up.
        self.channels_last = False
        self.sharded_optimizer = zero_stage > 0
        # The BYOL target network is part of the module but has no gradients and is not in
        # the optimizer: DeepSpeed broadcasts it once, and the method's EMA keeps it in step.
        self.engine, *_ = deepspeed.initialize(model=method, optimizer=optimizer,
                                               config=config, dist_init_required=False)
        if compile:
            self.engine.compile()

    def step(self, micro_batches: ViewPairs, count: int, *, lr: float,
             momentum: float) -> torch.Tensor:
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr

        def forward_backward(view1: torch.Tensor, view2: torch.Tensor,
                             last: bool) -> torch.Tensor:
            loss = self.engine(view1, view2)
            self.engine.backward(loss)  # divides by the accumulation count itself
            self.engine.step()  # steps the optimizer after the last micro batch only
            return loss

        loss = over_micro_batches(micro_batches, count, forward_backward, self.channels_last)
        self.method.after_step(momentum)
        return loss

    def train(self) -> None:
        self.engine.train()

    def optimizer_state(self) -> dict[str, Any] | None:
        return None if self.sharded_optimizer else self.base_optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state)

    def save_shard(self, folder: Path, rank: int) -> None:
        state = dict(self.engine.optimizer.state_dict())
        for key in _OBJECT_ENTRIES:
            state.pop(key, None)
        state["zero_stage"] = int(state["zero_stage"])
        # DeepSpeed's elastic loader wants the step count of the optimizer's groups; torch's
        # Adam/AdamW keep it per parameter instead, so it is taken from there.
        state.setdefault("base_optimizer_state_step", _optimizer_step(self.base_optimizer))
        with atomic_path(folder / shard_name(rank)) as tmp:
            torch.save(state, tmp)

    def load_shards(self, files: list[Path]) -> None:
        states = []
        for path in files:
            try:
                states.append(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as exc:
                raise ValueError(f"{path}: unreadable ZeRO optimizer shard ({exc})") from None
        # Model weights are loaded already; the fp32 partitions come from the shards.
        self.engine.optimizer.load_state_dict(states, load_optimizer_states=True,
                                              load_from_fp32_weights=True)
