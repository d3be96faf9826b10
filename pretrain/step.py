"""One optimisation step of a self-supervised method, shared by the engine and benchmarks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
from torch import nn

from pretrain.methods.base import SSLMethod

# The micro batches of one optimizer step, each a pair of augmented views.
ViewPairs = Iterable[tuple[torch.Tensor, torch.Tensor]]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf; no checkpoint is written from that state."""


def uses_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast on CUDA unless fp32 is asked for; plain fp32 on CPU by default."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_for(device: torch.device, precision: str):
    if uses_bf16(device, precision):
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
    return accumulated_step(trained, method, optimizer, [(view1, view2)], 1, lr=lr,
                            momentum=momentum, precision=precision,
                            channels_last=channels_last)


def accumulated_step(trained: nn.Module, method: SSLMethod,
                     optimizer: torch.optim.Optimizer,
                     micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int,
                     *, lr: float, momentum: float, precision: str = "auto",
                     channels_last: bool = False) -> torch.Tensor:
    """One optimizer step over ``count`` micro batches of view pairs; return their mean loss.

    Gradients of the micro batches add up locally (DDP's ``no_sync``) and are averaged
    across ranks once, in the last backward pass. Each micro batch is a batch of its own
    for the loss and for BatchNorm, as in every accumulation scheme: SimCLR's negatives
    and BatchNorm statistics come from the micro batch, not the whole step.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)

    def forward_backward(view1: torch.Tensor, view2: torch.Tensor, last: bool) -> torch.Tensor:
        # DDP's no_sync; a plain module has none (and every last micro batch syncs)
        no_sync = None if last else getattr(trained, "no_sync", None)
        with no_sync() if no_sync is not None else nullcontext():
            with autocast_for(view1.device, precision):
                loss = trained(view1, view2)
            (loss / count).backward()
        return loss

    loss = over_micro_batches(micro_batches, count, forward_backward, channels_last)
    optimizer.step()
    method.after_step(momentum)
    return loss


MicroStep = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


def over_micro_batches(micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int,
                       forward_backward: MicroStep, channels_last: bool) -> torch.Tensor:
    """Run ``forward_backward(view1, view2, is_last)`` on each of exactly ``count`` micro
    batches; return the mean of their losses, detached (no host sync)."""
    total, seen = None, 0
    for view1, view2 in micro_batches:
        if channels_last:
            view1 = view1.contiguous(memory_format=torch.channels_last)
            view2 = view2.contiguous(memory_format=torch.channels_last)
        seen += 1
        loss = forward_backward(view1, view2, seen == count).detach()
        total = loss if total is None else total + loss
    if total is None or seen != count:
        raise ValueError(f"an optimizer step needs {count} micro batches, got {seen}")
    return total / count


def check_finite(loss: torch.Tensor, step: int, rank: int) -> float:
    value = float(loss)
    if not math.isfinite(value):
        raise NonFiniteLossError(f"loss is {value} at step {step} on rank {rank}; the run "
                                 "stops and its last checkpoint is left untouched")
    return value
