"""BYOL's regression loss between online predictions and target projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.losses.gather import at_least_float32


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(p, z)`` averaged over the batch; the target receives no gradient.

    Computed in float32 even under bf16 autocast: the normalisation is sensitive to it.
    """
    p = F.normalize(at_least_float32(prediction), dim=-1)
    z = F.normalize(at_least_float32(target.detach()), dim=-1)
    return (2 - 2 * (p * z).sum(dim=-1)).mean()
