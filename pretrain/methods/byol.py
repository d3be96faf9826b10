"""BYOL: an online network (encoder, projector, predictor) regresses a momentum target."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from pretrain.losses.byol import byol_loss
from pretrain.methods.base import SSLMethod, mlp


class BYOL(SSLMethod):
    """Online encoder + projector + predictor; the target is their EMA copy (no predictor)."""

    uses_momentum = True

    def __init__(self, encoder: nn.Module, feature_dim: int, hidden: int, projection_dim: int,
                 predictor_hidden: int | None = None):
        super().__init__()
        self.online_encoder = encoder
        self.projector = mlp(feature_dim, hidden, projection_dim)
        self.predictor = mlp(projection_dim, predictor_hidden or hidden, projection_dim)
        self.target_encoder = copy.deepcopy(encoder)
        self.target_projector = copy.deepcopy(self.projector)
        for param in self.target_parameters():
            param.requires_grad_(False)

    def target_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.target_encoder.parameters()
        yield from self.target_projector.parameters()

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        p1, p2 = self.per_view(self._predict, view1, view2)
        with torch.no_grad():
            z1, z2 = self.per_view(self._target, view1, view2)
        return byol_loss(p1, z2) + byol_loss(p2, z1)

    def _predict(self, views: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.online_encoder(views)))

    def _target(self, views: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_encoder(views))

    @torch.no_grad()
    def after_step(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online."""
        online: list[torch.Tensor] = [*self.online_encoder.parameters(),
                                      *self.projector.parameters()]
        target: list[torch.Tensor] = list(self.target_parameters())
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, online, alpha=1 - momentum)
