"""What every self-supervised method is to the engine: a module around one encoder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

ViewBatchNorm = Literal["separate", "joint"]
VIEW_BATCHNORM: tuple[str, ...] = ("separate", "joint")


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
    # How the two views pass through the networks, hence which samples share BatchNorm
    # statistics: "separate" (one pass per view, the reference BYOL, Barlow Twins and
    # VICReg code) or "joint" (one pass over both views, as SimCLR's).
    view_batchnorm: ViewBatchNorm = "joint"

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, momentum: float) -> None:
        """Called after each optimizer step (BYOL moves its target network here)."""

    def embed(self, views: torch.Tensor) -> torch.Tensor:
        return self.projector(self.online_encoder(views))

    def per_view(self, network: Callable[[torch.Tensor], torch.Tensor], view1: torch.Tensor,
                 view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``network`` applied to each view, in one pass or two as ``view_batchnorm`` says.

        In training mode a BatchNorm normalises by the statistics of the batch it sees, so
        a joint pass mixes both views' statistics; separate passes keep them per view (and
        under SyncBatchNorm each pass is still synchronised over every rank).
        """
        if self.view_batchnorm == "joint":
            first, second = network(torch.cat([view1, view2])).chunk(2)
            return first, second
        return network(view1), network(view2)
