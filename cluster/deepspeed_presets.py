"""DeepSpeed configurations for pretraining: ZeRO stage 0, 1 or 2, as plain dicts.

medssl builds its own optimizer (LARS or AdamW, with bias/norm exclusion) and learning-rate
schedule, and hands the optimizer to ``deepspeed.initialize``; these configs therefore have
no ``optimizer`` or ``scheduler`` section. The batch sizes come from the medssl config:
``train_micro_batch_size_per_gpu`` is the per-rank batch of one forward/backward and
``gradient_accumulation_steps`` how many of them make one optimizer step; DeepSpeed derives
``train_batch_size`` (= micro batch x accumulation x world size) itself, so a preset stays
valid at any world size.

What the stages shard across data-parallel ranks: 0 nothing (plain data parallelism),
1 the optimizer state, 2 the optimizer state and the gradients. Stage 3 (parameters too)
is left out on purpose: encoders for 2D segmentation fit on one GPU many times over, and
stage 3 would slow every forward pass with parameter gathers.
"""

from __future__ import annotations

from typing import Any

ZERO_STAGES = (0, 1, 2)


def micro_batch_size(global_batch: int, world_size: int, grad_accum: int = 1) -> int:
    """Per-rank micro batch for medssl's *global* ``data.batch_size``; it must divide evenly."""
    for name, value in (("global batch", global_batch), ("world size", world_size),
                        ("gradient accumulation steps", grad_accum)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    per_step = world_size * grad_accum
    if global_batch % per_step:
        raise ValueError(f"global batch {global_batch} is not divisible by world size "
                         f"{world_size} x gradient accumulation {grad_accum}")
    return global_batch // per_step


def deepspeed_config(stage: int, micro_batch: int, grad_accum: int = 1, bf16: bool = True,
                     *, gradient_clipping: float | None = None) -> dict[str, Any]:
    """A DeepSpeed config dict for pretraining with ZeRO ``stage`` (0, 1 or 2).

    ``bf16`` (use it on CUDA) enables DeepSpeed's ``torch_autocast`` section: weights,
    optimizer state and gradient reduction stay fp32 while convolutions and matmuls run
    in bf16 -- the same numerics as medssl's own ``run.precision=bf16``. DeepSpeed's
    ``bf16`` section is not used: it casts the parameters but not the buffers to bf16, and
    a BatchNorm layer then fails on the dtype mismatch (seen with DeepSpeed 0.19).
    ``gradient_clipping`` is the max global gradient norm, or None for no clipping.
    """
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage!r}")
    if micro_batch < 1:
        raise ValueError(f"micro batch must be >= 1, got {micro_batch}")
    if grad_accum < 1:
        raise ValueError(f"gradient accumulation steps must be >= 1, got {grad_accum}")
    if gradient_clipping is not None and not gradient_clipping > 0:
        raise ValueError(f"gradient clipping must be a norm > 0, got {gradient_clipping}")

    zero: dict[str, Any] = {"stage": stage}
    if stage == 2:
        # Reduce gradient buckets while backward is still running, into one contiguous
        # buffer (less fragmentation); costs a few bucket-sized buffers of memory.
        zero.update(overlap_comm=True, contiguous_gradients=True)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero,
        # ZeRO refuses optimizers outside its tested list (Adam/AdamW/...) unless allowed;
        # medssl's LARS is such an optimizer. Stage 0 ignores the flag.
        "zero_allow_untested_optimizer": True,
        # medssl logs its own scalars to TensorBoard and the console; keep DeepSpeed's
        # periodic "step=..., lr=..." line out of the progress bars.
        "steps_per_print": 1_000_000_000,
    }
    if bf16:
        config["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16",
            # DeepSpeed's default list (Linear, Conv) would all-reduce those gradients in
            # bf16; an empty list keeps the reduction fp32, like medssl's DDP path.
            "lower_precision_safe_modules": [],
        }
    # DeepSpeed clips at norm 1.0 unless told otherwise; medssl's DDP path does not clip,
    # so "no clipping" is written out explicitly (0 disables it).
    config["gradient_clipping"] = 0.0 if gradient_clipping is None else float(gradient_clipping)
    return config


def check_deepspeed_config(config: dict[str, Any]) -> Any:
    """Parse ``config`` with DeepSpeed's own ``DeepSpeedConfig``; return the parsed object.

    Needs DeepSpeed installed; works without a process group (it then assumes a world of
    one). Raises ValueError naming the problem when DeepSpeed rejects the config, or when
    the installed DeepSpeed silently ignores a section this config relies on.
    """
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError as exc:
        raise ValueError(f"cannot check the config: DeepSpeed is not importable ({exc})") from exc

    try:
        parsed = DeepSpeedConfig(dict(config))
    except (AssertionError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"DeepSpeed rejects the config: {exc}") from exc
    if config.get("torch_autocast", {}).get("enabled") and not getattr(
            parsed, "torch_autocast_enabled", False):
        raise ValueError("the installed DeepSpeed ignores the torch_autocast section; "
                         "upgrade DeepSpeed or turn bf16 off")
    return parsed
