"""SimCLR: contrast each view against every other view of the global batch (InfoNCE)."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.losses.simclr import nt_xent_loss
from pretrain.methods.base import SSLMethod, mlp


class SimCLR(SSLMethod):
    def __init__(self, encoder: nn.Module, feature_dim: int, hidden: int, projection_dim: int,
                 temperature: float):
        super().__init__()
        self.online_encoder = encoder
        self.projector = mlp(feature_dim, hidden, projection_dim, last_norm=True)
        self.temperature = temperature

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.per_view(self.embed, view1, view2)
        return nt_xent_loss(z1, z2, self.temperature)
