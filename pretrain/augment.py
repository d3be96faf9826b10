"""Batched augmentation on the training device, with per-sample random parameters.

DataLoader workers only read and decode; every random crop, flip and intensity change
happens here on whole batches (on the GPU when there is one). Only operations that make
sense for 1-channel intensity images are used: no hue, saturation or grayscale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.config import ViewConfig


def _uniform(low: float, high: float, n: int, generator: torch.Generator,
             device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def crop_flip_theta(batch: int, view: ViewConfig, generator: torch.Generator,
                    device: torch.device) -> torch.Tensor:
    """Affine matrices (B, 2, 3) in ``affine_grid`` coordinates for random resized crops
    that stay inside the image, with optional horizontal/vertical flips."""
    area = _uniform(view.scale[0], view.scale[1], batch, generator, device)
    log_ratio = _uniform(math.log(view.ratio[0]), math.log(view.ratio[1]), batch, generator,
                         device)
    ratio = torch.exp(log_ratio)
    # Crop width and height as fractions of the image side, clipped to the image.
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    center_x = (torch.rand(batch, generator=generator, device=device) * 2 - 1) * (1 - width)
    center_y = (torch.rand(batch, generator=generator, device=device) * 2 - 1) * (1 - height)
    flip_x = torch.where(torch.rand(batch, generator=generator, device=device) < view.hflip,
                         -1.0, 1.0)
    flip_y = torch.where(torch.rand(batch, generator=generator, device=device) < view.vflip,
                         -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = width * flip_x
    theta[:, 0, 2] = center_x
    theta[:, 1, 1] = height * flip_y
    theta[:, 1, 2] = center_y
    return theta


def augment_view(images: torch.Tensor, view: ViewConfig, size: int,
                 generator: torch.Generator) -> torch.Tensor:
    """One augmented view (B, C, size, size) of a float batch (B, C, H, W)."""
    batch, device = images.shape[0], images.device
    theta = crop_flip_theta(batch, view, generator, device)
    grid = F.affine_grid(theta, [batch, images.shape[1], size, size], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    shape = (batch, 1, 1, 1)
    if view.contrast > 0:
        factor = _uniform(1 - view.contrast, 1 + view.contrast, batch, generator, device)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = mean + (out - mean) * factor.view(shape)
    if view.brightness > 0:
        shift = _uniform(-view.brightness, view.brightness, batch, generator, device)
        out = out + shift.view(shape)
    if view.noise_std > 0:
        sigma = _uniform(0.0, view.noise_std, batch, generator, device)
        noise = torch.randn(out.shape, generator=generator, device=device)
        out = out + noise * sigma.view(shape)
    return out
