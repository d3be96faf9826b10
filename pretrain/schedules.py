"""Step-wise schedules: warmup-cosine learning rate and BYOL's EMA momentum."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float,
                  final: float = 0.0, start: float = 0.0) -> float:
    """Linear warmup from ``start`` to ``peak`` over ``warmup_steps``, then cosine decay to
    ``final``.

    Warm-up step k (0-based) of W uses ``start + (peak - start) (k + 1) / W``: the ramp
    leaves ``start`` before the first step and reaches ``peak`` on the last warm-up step
    (at ``start`` 0, exactly the arithmetic of the plain 0 -> peak ramp).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return start + (peak - start) * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's target momentum: ``1 - (1 - base) (cos(pi k / K) + 1) / 2``, from base to 1."""
    progress = min(1.0, step / max(1, total_steps))
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2
