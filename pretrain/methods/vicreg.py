"""VICReg: invariance between views, variance and decorrelation within each view."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.losses.vicreg import vicreg_loss
from pretrain.methods.base import SSLMethod, mlp


class VICReg(SSLMethod):
    def __init__(self, encoder: nn.Module, feature_dim: int, hidden: int, projection_dim: int,
                 weights: tuple[float, float, float]):
        super().__init__()
        self.online_encoder = encoder
        self.projector = mlp(feature_dim, hidden, projection_dim, layers=3)
        self.weights = weights

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.per_view(self.embed, view1, view2)
        invariance, variance, covariance = self.weights
        return vicreg_loss(z1, z2, sim_weight=invariance, var_weight=variance,
                           cov_weight=covariance)
