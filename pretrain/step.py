"""One optimisation step of a self-supervised method, shared by the engine and benchmarks."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from pretrain.methods.base import SSLMethod


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf; no checkpoint is written from that state."""


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA unless fp32 is asked for; plain fp32 on CPU by default."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def ssl_step(trained: nn.Module, method: SSLMethod, optimizer: torch.optim.Optimizer,
             view1: torch.Tensor, view2: torch.Tensor, *, lr: float, momentum: float,
             precision: str = "auto", channels_last: bool = False) -> torch.Tensor:
    """Forward both views, step the optimizer, let the method move its target (BYOL);
    return the loss (on device).

    ``trained`` is what runs the forward pass (the DDP wrapper or a compiled module),
    ``method`` the plain module. The loss is returned without a host sync so the next
    step can be queued while this one runs.
    """
    if channels_last:
        view1 = view1.contiguous(memory_format=torch.channels_last)
        view2 = view2.contiguous(memory_format=torch.channels_last)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast_for(view1.device, precision):
        loss = trained(view1, view2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    method.after_step(momentum)
    return loss.detach()


def check_finite(loss: torch.Tensor, step: int, rank: int) -> float:
    value = float(loss)
    if not math.isfinite(value):
        raise NonFiniteLossError(f"loss is {value} at step {step} on rank {rank}; the run "
                                 "stops and its last checkpoint is left untouched")
    return value
