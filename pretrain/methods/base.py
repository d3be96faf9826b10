"""What every self-supervised method is to the engine: a module around one encoder."""

from __future__ import annotations

import torch
from torch import nn


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2,
        last_norm: bool = False) -> nn.Sequential:
    """Projector/predictor head: (Linear, BatchNorm, ReLU) x (layers - 1), then Linear
    (optionally a final affine-free BatchNorm, as SimCLR v2 and Barlow Twins use)."""
    blocks: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        blocks += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden),
                   nn.ReLU(inplace=True)]
        width = hidden
    blocks.append(nn.Linear(width, out_dim, bias=not last_norm))
    if last_norm:
        blocks.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*blocks)


class SSLMethod(nn.Module):
    """``forward(view1, view2)`` returns the loss of a step. ``online_encoder`` is the
    network that gets exported; ``projector`` maps its features to the embedding space
    watched for collapse. Methods with a momentum target override ``after_step``."""

    online_encoder: nn.Module
    projector: nn.Module
    uses_momentum: bool = False

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, momentum: float) -> None:
        """Called after each optimizer step (BYOL moves its target network here)."""

    def embed(self, views: torch.Tensor) -> torch.Tensor:
        return self.projector(self.online_encoder(views))
