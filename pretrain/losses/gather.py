"""Cross-rank gathering for losses that need the global batch, with gradients that add up.

The convention every loss in this package follows (see ``simclr.py``, ``barlow_twins.py``,
``vicreg.py``):

    The value each rank returns equals the single-process loss on the concatenated global
    batch, and after data-parallel gradient *averaging* (what DDP, FSDP and DeepSpeed do)
    the parameter gradients equal the single-process gradients.

Why :func:`gather_with_grad` makes that work: its backward *sums* the gradients that every
rank computed for the gathered tensor and hands each rank the rows it contributed. When
each rank evaluates the same global loss ``L`` on the gathered tensor, every rank computes
the same ``dL/dZ``, so rank ``r`` receives ``world_size * dL/dz_r`` for its own rows; its
parameter gradient is then ``world_size`` times its share of the full-batch gradient, and
the average over ranks is exactly ``dL/dtheta``. A loss that only evaluates the local rows'
share ``L_r`` of ``L = sum_r L_r`` must therefore return ``world_size * L_r`` for its
gradient (``nt_xent_loss`` does, and fixes up the reported value with
:func:`global_value_local_gradient`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when a process group is initialised and holds more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (the default group), 1 when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (the default group), 0 when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group)
    return 0


class _GatherWithSummedGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gathered gradient over ranks and
    returns this rank's rows (all-reduce then slice: one collective that every backend has;
    the tensors are embeddings, so the extra traffic over a reduce-scatter is negligible).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd may share it
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = dist.get_rank(ctx.group) * ctx.rows
        return grad[start:start + ctx.rows], None


def gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (rank order), keeping the autograd graph.

    Backward sums, over ranks, the gradient each rank computed for the gathered tensor and
    returns the rows this rank contributed (see the module docstring for why that is the
    right scaling under DDP). Every rank must pass a tensor of the same shape: the global
    batch is ``world_size * len(x)`` and rank ``r`` holds rows ``r*len(x):(r+1)*len(x)``.
    Identity when not running distributed, so single-process code pays nothing.

    Not ``torch.distributed.nn.functional.all_gather``, which has the same backward: it is
    deprecated in torch 2.14 (a FutureWarning per process) and raises under torch.compile,
    whereas dynamo traces this function (collectives and all) into the compiled graph. Its
    replacement in ``torch.distributed._functional_collectives`` is private API whose name
    changed between releases, and imports torch._dynamo on first use even in eager code.
    tests/test_losses.py pins the summing backward numerically on real processes.
    """
    if not is_distributed(group):
        return x
    group = group if group is not None else dist.group.WORLD
    return _GatherWithSummedGrad.apply(x.contiguous(), group)


def global_value_local_gradient(
    local_share: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Given this rank's share ``L_r`` of a loss ``L = sum_r L_r``, return a tensor whose value
    is ``L`` on every rank and whose gradient is that of ``world_size * L_r``.

    The gradient scaling makes the DDP-averaged gradient equal ``dL/dtheta`` for a loss whose
    local share is computed against gathered tensors (the gather's backward already adds
    the other ranks' contributions to this rank's rows). The value is summed across ranks
    without autograd, so logging and early stopping see the global loss on every rank.
    Costs one scalar all-reduce; a no-op when not running distributed.
    """
    if not is_distributed(group):
        return local_share
    total = local_share.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    scaled = local_share * world_size(group)
    return scaled + (total - scaled.detach())


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 embeddings up to float32 for the loss; float64 (tests) stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
