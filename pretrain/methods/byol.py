"""BYOL: an online network (encoder, projector, predictor) regresses a momentum target."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pretrain.losses.byol import byol_loss


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """BYOL's projector/predictor head: Linear, BatchNorm, ReLU, Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim),
    )


class BYOL(nn.Module):
    """Holds the online and target networks; ``forward`` returns the symmetrised loss."""

    def __init__(self, encoder: nn.Module, feature_dim: int, hidden: int, projection_dim: int):
        super().__init__()
        self.online_encoder = encoder
        self.online_projector = mlp(feature_dim, hidden, projection_dim)
        self.predictor = mlp(projection_dim, hidden, projection_dim)
        self.target_encoder = copy.deepcopy(encoder)
        self.target_projector = copy.deepcopy(self.online_projector)
        for param in self.target_parameters():
            param.requires_grad_(False)

    def target_parameters(self):
        yield from self.target_encoder.parameters()
        yield from self.target_projector.parameters()

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        views = torch.cat([view1, view2])
        predictions = self.predictor(self.online_projector(self.online_encoder(views)))
        with torch.no_grad():
            targets = self.target_projector(self.target_encoder(views))
        p1, p2 = predictions.chunk(2)
        z1, z2 = targets.chunk(2)
        return byol_loss(p1, z2) + byol_loss(p2, z1)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        online = [*self.online_encoder.parameters(), *self.online_projector.parameters()]
        target = [*self.target_encoder.parameters(), *self.target_projector.parameters()]
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, online, alpha=1 - momentum)
