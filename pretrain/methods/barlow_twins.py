"""Barlow Twins: drive the cross-correlation of the two views' embeddings to identity."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.losses.barlow_twins import barlow_twins_loss
from pretrain.methods.base import SSLMethod, mlp


class BarlowTwins(SSLMethod):
    def __init__(self, encoder: nn.Module, feature_dim: int, hidden: int, projection_dim: int,
                 lambda_offdiag: float):
        super().__init__()
        self.online_encoder = encoder
        self.projector = mlp(feature_dim, hidden, projection_dim, layers=3)
        self.lambda_offdiag = lambda_offdiag

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.per_view(self.embed, view1, view2)
        return barlow_twins_loss(z1, z2, self.lambda_offdiag)
