"""The baseline for pretraining throughput: a BYOL step written with timm and PyTorch alone.

Nothing from medssl is used here, so the comparison measures what our engine, data path
and augmentation cost on top of the textbook step: a timm encoder with BYOL's projector
and predictor, a momentum copy, the symmetric cosine loss, AdamW and an EMA update.
"""

from __future__ import annotations

import copy

import timm
import torch
import torch.nn.functional as F
from torch import nn


def _head(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class PlainByol(nn.Module):
    def __init__(self, arch: str, in_chans: int, hidden: int, out_dim: int = 256,
                 img_size: int | None = None):
        super().__init__()
        # fixed-size models (ViTs) are built for the crop, as a textbook script would
        size = {} if img_size is None else {"img_size": img_size}
        self.encoder = timm.create_model(arch, pretrained=False, num_classes=0,
                                         in_chans=in_chans, **size)
        self.projector = _head(self.encoder.num_features, hidden, out_dim)
        self.predictor = _head(out_dim, hidden, out_dim)
        self.target = copy.deepcopy(nn.Sequential(self.encoder, self.projector))
        self.target.requires_grad_(False)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        views = torch.cat([view1, view2])
        p = F.normalize(self.predictor(self.projector(self.encoder(views))).float(), dim=-1)
        with torch.no_grad():
            z = F.normalize(self.target(views).float(), dim=-1)
        p1, p2 = p.chunk(2)
        z1, z2 = z.chunk(2)
        return (4 - 2 * (p1 * z2).sum(-1) - 2 * (p2 * z1).sum(-1)).mean()


def make_plain_step(arch: str, in_chans: int, hidden: int, device: torch.device, *,
                    bf16: bool, channels_last: bool, compile: bool,
                    img_size: int | None = None):
    """Return ``step(view1, view2)`` running one full BYOL optimisation step."""
    model = PlainByol(arch, in_chans, hidden, img_size=img_size).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile else model
    online = [p for p in model.parameters() if p.requires_grad]
    target = list(model.target.parameters())
    online_for_ema = [*model.encoder.parameters(), *model.projector.parameters()]
    optimizer = torch.optim.AdamW(online, lr=1e-4)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def step(view1: torch.Tensor, view2: torch.Tensor) -> None:
        view1 = view1.contiguous(memory_format=memory_format)
        view2 = view2.contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = forward(view1, view2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(target, online_for_ema, 0.004)

    return step
