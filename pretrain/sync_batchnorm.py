"""BatchNorm with statistics over the global batch of all ranks, on any device.

Self-supervised methods such as BYOL depend on BatchNorm statistics of the whole global
batch; with per-rank statistics a multi-process run optimises a different objective
from a single-process run on the same global batch. PyTorch's ``nn.SyncBatchNorm``
only runs on CUDA, so CPU (gloo) runs need their own: :class:`GlobalBatchNorm`.

How the global statistics are formed: each rank computes its per-channel mean and
biased variance with a stable two-pass kernel (``torch.var_mean``, in float32 or
wider), turns them into count, sum and sum of squares in float64, and one all-reduce
adds those up over the ranks. Counts, not means, are added, so ranks with different
batch sizes are weighted correctly; float64 keeps ``E[x^2] - E[x]^2`` free of
cancellation. The all-reduce is autograd-aware (its backward all-reduces the incoming
gradients), which makes the backward of the global statistics exact without a
hand-written BatchNorm backward.

:func:`convert_sync_batchnorm` swaps a model's BatchNorm layers: PyTorch's fused
``nn.SyncBatchNorm`` on CUDA (through timm's converter, which keeps timm's
``BatchNormAct2d`` activation), :class:`GlobalBatchNorm` elsewhere. Parameters and
buffers are carried over as the same tensors, so state-dict keys, optimizer references
and ``requires_grad`` are unchanged.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = ["GlobalBatchNorm", "GlobalBatchNormAct2d", "convert_sync_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the gradients over ranks too.

    Every rank's loss depends on the reduced tensor, so the gradient of the total loss
    with respect to one rank's contribution is the sum of all ranks' output gradients.
    (``torch.distributed.nn.functional.all_reduce`` does the same but is deprecated in
    recent PyTorch and warns on every call.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        reduced = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
        return reduced

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        reduced = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=ctx.group)
        return reduced, None


def _all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    # torch.compile (2.14) traces this Function, collective and backward included, with no
    # graph break; checked on two gloo ranks against eager outputs and gradients.
    return _AllReduceSum.apply(tensor, group)


def _distributed_world_size(group) -> int:
    """Ranks in ``group`` (``None``: the default group); 1 without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of all ranks of ``process_group`` in training mode.

    In eval mode, and without a process group of more than one rank, it is exactly
    ``nn.BatchNorm1d/2d/3d`` (the same ``F.batch_norm`` call). Accepts ``(N, C)``,
    ``(N, C, L)``, ``(N, C, H, W)`` (any memory format) and ``(N, C, D, H, W)``;
    ``input_dims`` restricts the accepted ranks (conversion sets it from the replaced
    layer, e.g. ``(2, 3)`` for a BatchNorm1d). Ranks may hold different batch sizes,
    even empty ones, but every rank must call every training-mode forward (and its
    backward), as with ``nn.SyncBatchNorm``.

    Statistics are computed in float32 (float64 for float64 input) with autocast off;
    the output has the input's dtype. The running variance is updated with the unbiased
    global variance and ``momentum`` (``None``: cumulative average), like BatchNorm.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        input_dims: tuple[int, ...] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group
        self.input_dims = input_dims

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if self.input_dims is not None and input.dim() not in self.input_dims:
            expected = " or ".join(f"{d}D" for d in self.input_dims)
            raise ValueError(f"expected {expected} input (got {input.dim()}D input)")
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or _distributed_world_size(self.process_group) <= 1:
            return super().forward(input)  # nn.BatchNorm's own path, bit for bit
        self._check_input_dim(input)
        return self._global_forward(input, self.process_group)

    def _momentum_factor(self) -> float:
        """Advance ``num_batches_tracked``; the running-average factor, as BatchNorm does."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
        return factor

    def _global_forward(self, input: torch.Tensor, group) -> torch.Tensor:
        factor = self._momentum_factor()
        channels = input.shape[1]
        reduce_dims = [0, *range(2, input.dim())]
        compute_dtype = torch.promote_types(input.dtype, torch.float32)
        with torch.autocast(input.device.type, enabled=False):
            x = input.to(compute_dtype)
            local_count = x.numel() // channels if channels else 0
            if local_count > 0:
                local_var, local_mean = torch.var_mean(x, dim=reduce_dims, correction=0)
            else:  # an empty shard: zero statistics, still part of the graph
                local_var = local_mean = x.sum(dim=reduce_dims)
            local_mean = local_mean.double()
            local_sum = local_mean * local_count
            local_sum_sq = (local_var.double() + local_mean * local_mean) * local_count
            count_entry = local_sum.new_full((1,), float(local_count))
            totals = _all_reduce_sum(torch.cat([local_sum, local_sum_sq, count_entry]), group)
            total_sum, total_sum_sq = totals[:channels], totals[channels:2 * channels]
            count = totals[2 * channels:]

            if count.device.type == "cpu" and not torch.compiler.is_compiling():
                self._check_count(int(count.detach()), input)  # no device sync on CPU
            mean = total_sum / count
            var = (total_sum_sq / count - mean * mean).clamp_min(0.0)  # biased

            if self.track_running_stats and self.running_mean is not None:
                self._update_running_stats(mean.detach(), var.detach(), count, factor)

            scale = torch.rsqrt(var + self.eps)
            if self.weight is not None:
                scale = scale * self.weight.double()
            shift = -mean * scale
            if self.bias is not None:
                shift = shift + self.bias.double()
            shape = [1, channels] + [1] * (input.dim() - 2)
            out = x * scale.to(compute_dtype).view(shape) + shift.to(compute_dtype).view(shape)
        return out.to(input.dtype)

    @staticmethod
    def _check_count(count: int, input: torch.Tensor) -> None:
        if count <= 1:  # the same count, and so the same error, on every rank
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"{count} over all ranks (local input size {list(input.shape)})")

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor,
                              count: torch.Tensor, factor: float) -> None:
        assert self.running_mean is not None and self.running_var is not None
        unbiased_var = var * (count / (count - 1))
        self.running_mean.mul_(1.0 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1.0 - factor).add_(unbiased_var.to(self.running_var.dtype),
                                                 alpha=factor)


class GlobalBatchNormAct2d(GlobalBatchNorm):
    """:class:`GlobalBatchNorm` followed by ``drop`` and ``act``, in place of timm's
    ``BatchNormAct2d`` / ``SyncBatchNormAct``; the same submodule names keep the
    state-dict keys (an activation with parameters, such as PReLU, included)."""

    def __init__(self, num_features: int, *args, act: nn.Module | None = None,
                 drop: nn.Module | None = None, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()  # timm's registration order
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(input)))


def _timm_norm_act_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """timm's BatchNorm+activation classes and their forward functions.

    Looked up without importing timm: if its module is not loaded, no model can hold
    instances of its classes (and importing timm costs seconds).
    """
    norm_act = sys.modules.get("timm.layers.norm_act")
    if norm_act is None:
        return (), ()
    BatchNormAct2d, SyncBatchNormAct = norm_act.BatchNormAct2d, norm_act.SyncBatchNormAct
    return (BatchNormAct2d, SyncBatchNormAct), (BatchNormAct2d.forward, SyncBatchNormAct.forward)


def _input_dims_of(module: _BatchNorm) -> tuple[int, ...] | None:
    if isinstance(module, nn.BatchNorm1d):
        return (2, 3)
    if isinstance(module, nn.BatchNorm2d):
        return (4,)
    if isinstance(module, nn.BatchNorm3d):
        return (5,)
    return None  # SyncBatchNorm and others: any input of 2 or more dimensions


def _to_global(module: _BatchNorm, process_group) -> nn.Module:
    """The GlobalBatchNorm replacing ``module``, or ``module`` itself when its class has a
    forward of its own that a replacement would lose (with a warning)."""
    act_types, act_forwards = _timm_norm_act_types()
    forward = type(module).forward
    plain = forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward)
    with_act = isinstance(module, act_types) and forward in act_forwards
    if not (plain or with_act):
        warnings.warn(f"convert_sync_batchnorm: {type(module).__qualname__} defines its own "
                      "forward and is left as is; its statistics stay per rank",
                      stacklevel=3)
        return module
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(f"convert_sync_batchnorm: {type(module).__qualname__} is not "
                         "initialised yet; run one forward pass before converting")

    kwargs = dict(eps=module.eps, momentum=module.momentum, affine=module.affine,
                  track_running_stats=module.track_running_stats,
                  process_group=process_group, input_dims=_input_dims_of(module),
                  device="meta")  # every tensor is replaced by the original's below
    if with_act:
        converted: GlobalBatchNorm = GlobalBatchNormAct2d(
            module.num_features, act=getattr(module, "act", None),
            drop=getattr(module, "drop", None), **kwargs)
    else:
        converted = GlobalBatchNorm(module.num_features, **kwargs)
    # The same Parameter and buffer objects: requires_grad, optimizer state and any
    # sharing with other modules carry over.
    converted.weight = module.weight
    converted.bias = module.bias
    converted.running_mean = module.running_mean
    converted.running_var = module.running_var
    converted.num_batches_tracked = module.num_batches_tracked
    converted._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    converted.train(module.training)
    if hasattr(module, "qconfig"):
        converted.qconfig = module.qconfig
    return converted


def _convert_to_global(module: nn.Module, process_group) -> nn.Module:
    converted = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = _to_global(module, process_group)
    for name, child in module.named_children():
        converted.add_module(name, _convert_to_global(child, process_group))
    return converted


def convert_sync_batchnorm(module: nn.Module, device_type: str,
                           process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Make every BatchNorm layer of ``module`` use global-batch statistics.

    ``device_type`` is where the model runs: on ``"cuda"`` the layers become PyTorch's
    fused ``nn.SyncBatchNorm`` (timm's ``BatchNormAct2d`` becomes timm's
    ``SyncBatchNormAct``, keeping its activation); elsewhere :class:`GlobalBatchNorm`
    (``GlobalBatchNormAct2d`` for timm's norm+act layers). Returns the converted module,
    which may be ``module`` itself with its children replaced, like PyTorch's converter.
    The state-dict keys stay the same. Converting is harmless in a single-process run:
    the layers then compute exactly what BatchNorm does.
    """
    if device_type == "cuda":
        try:
            from timm.layers import convert_sync_batchnorm as timm_convert
        except ImportError:  # pragma: no cover - timm is a dependency
            return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
        return timm_convert(module, process_group)
    return _convert_to_global(module, process_group)
