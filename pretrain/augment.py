"""Batched augmentation on the training device, with per-sample random parameters.

DataLoader workers only read and decode; every random crop, flip, rotation and intensity
change happens here on whole batches (on the GPU when there is one). Only operations that
make sense for 1-channel intensity images are used: no hue, saturation or grayscale.

Per view, in this order (:mod:`pretrain.dali_augment` mirrors it for the DALI loader):
random resized crop, flips and rotation as one affine resampling; Gaussian blur; gamma;
contrast and brightness (together, for a ``jitter_prob`` share of the samples); Gaussian
noise. A setting that is off draws no random numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.config import ViewConfig

NO_BLUR_SIGMA = 1e-3  # a kernel whose side weights underflow to 0: the identity (as in DALI)


MIN_SPREAD = 1e-6  # intensity range below which an image counts as constant (gamma)


def uniform(low: float, high: float, n: int, generator: torch.Generator,
            device: torch.device) -> torch.Tensor:
    """``n`` per-sample values uniform in [low, high)."""
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def adjust_gamma(images: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Gamma (B,) on each image's own [min, max] rescaled to [0, 1], then scaled back.

    Gamma needs a [0, 1] input; rescaling by each image's own range keeps its span and
    leaves a constant image constant.
    """
    lowest = images.amin(dim=(1, 2, 3), keepdim=True)
    spread = images.amax(dim=(1, 2, 3), keepdim=True) - lowest
    unit = ((images - lowest) / spread.clamp(min=MIN_SPREAD)).clamp(0.0, 1.0)
    return lowest + spread * unit.pow(gamma.to(images.dtype).view(-1, 1, 1, 1))


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale each image's deviations from its own mean by ``factor`` (B,)."""
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return mean + (images - mean) * factor.to(images.dtype).view(-1, 1, 1, 1)


def crop_theta(width: torch.Tensor, height: torch.Tensor, angle: torch.Tensor,
               shift_x: torch.Tensor, shift_y: torch.Tensor, flip_x: torch.Tensor,
               flip_y: torch.Tensor, aspect: float = 1.0) -> torch.Tensor:
    """Affine matrices (B, 2, 3) in ``affine_grid`` coordinates for crops rotated by
    ``angle`` (radians) about their centre, that stay inside the image.

    ``width``/``height`` are the crop's sides as fractions of the image's, ``shift_*`` in
    [-1, 1] place its centre within the room left, ``flip_*`` are +-1 and ``aspect`` is the
    image's height / width (rotation acts in pixels, not in stretched grid units). A rotated
    crop is shrunk, keeping its aspect ratio, until its bounding box fits the image.
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Half-extents of the rotated crop's bounding box, as fractions of the image's.
    reach_x = cos.abs() * width + sin.abs() * height * aspect
    reach_y = sin.abs() * width / aspect + cos.abs() * height
    shrink = 1.0 / torch.maximum(torch.maximum(reach_x, reach_y), torch.ones_like(reach_x))
    width, height = width * shrink * flip_x, height * shrink * flip_y
    theta = torch.stack([
        cos * width, -sin * height * aspect, shift_x * (1 - reach_x * shrink),
        sin * width / aspect, cos * height, shift_y * (1 - reach_y * shrink),
    ], dim=1)
    return theta.view(-1, 2, 3)


def crop_flip_theta(batch: int, view: ViewConfig, generator: torch.Generator,
                    device: torch.device, aspect: float = 1.0) -> torch.Tensor:
    """Random :func:`crop_theta` matrices of ``view``: area and log aspect ratio uniform in
    ``view.scale``/``view.ratio`` (sides clipped to the image), flips with probability
    ``view.hflip``/``view.vflip``, angle uniform in +-``view.rotation`` degrees."""
    area = uniform(view.scale[0], view.scale[1], batch, generator, device)
    log_ratio = uniform(math.log(view.ratio[0]), math.log(view.ratio[1]), batch, generator,
                         device)
    ratio = torch.exp(log_ratio)
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    shift_x = uniform(-1.0, 1.0, batch, generator, device)
    shift_y = uniform(-1.0, 1.0, batch, generator, device)
    flip_x = torch.where(torch.rand(batch, generator=generator, device=device) < view.hflip,
                         -1.0, 1.0)
    flip_y = torch.where(torch.rand(batch, generator=generator, device=device) < view.vflip,
                         -1.0, 1.0)
    if view.rotation > 0:  # drawn last: views without rotation keep their random stream
        angle = uniform(-view.rotation, view.rotation, batch, generator, device)
        angle = angle * (math.pi / 180.0)
    else:
        angle = torch.zeros(batch, device=device)
    return crop_theta(width, height, angle, shift_x, shift_y, flip_x, flip_y, aspect)


def mirror_indices(length: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of a side of ``length`` padded by ``radius`` on both ends with mirrored borders
    that do not repeat the edge pixel, mirrored again as often as a kernel wider than the
    image needs (as DALI pads; ``F.pad(mode="reflect")`` only allows radius < length)."""
    index = torch.arange(-radius, length + radius, device=device)
    if length == 1:
        return torch.zeros_like(index)
    period = 2 * (length - 1)
    index = index.abs() % period
    return torch.where(index < length, index, period - index)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with per-sample ``sigma`` (B,) in pixels.

    As DALI's ``fn.gaussian_blur``: a normalised kernel of radius ceil(3 sigma) and mirrored
    borders that do not repeat the edge pixel, also for a kernel wider than the image.
    ``radius`` caps the kernel for the whole batch (from the config, so no device sync).
    """
    batch, chans, height, width = images.shape
    if radius < 1:
        return images
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    sigma = sigma.to(images.dtype)[:, None]
    weights = torch.exp(-taps**2 / (2 * sigma**2))
    weights = torch.where(taps.abs() <= torch.ceil(3 * sigma), weights, 0.0)
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(chans, dim=0)
    # One group per (sample, channel): each gets its own kernel in a single conv call.
    out = images.reshape(1, batch * chans, height, width)
    out = F.conv2d(out.index_select(3, mirror_indices(width, radius, images.device)),
                   weights.view(batch * chans, 1, 1, -1), groups=batch * chans)
    out = F.conv2d(out.index_select(2, mirror_indices(height, radius, images.device)),
                   weights.view(batch * chans, 1, -1, 1), groups=batch * chans)
    return out.view(batch, chans, height, width)


def augment_view(images: torch.Tensor, view: ViewConfig, size: int,
                 generator: torch.Generator) -> torch.Tensor:
    """One augmented view (B, C, size, size), float32, of a batch (B, C, H, W)."""
    batch, chans, in_height, in_width = images.shape
    device = images.device
    theta = crop_flip_theta(batch, view, generator, device, aspect=in_height / in_width)
    grid = F.affine_grid(theta, [batch, chans, size, size], align_corners=False)
    # Crops stay inside the image; "border" only guards rounding at its very edge.
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    shape = (batch, 1, 1, 1)
    if view.blur_prob > 0:
        blurred = torch.rand(batch, generator=generator, device=device) < view.blur_prob
        sigma = uniform(*view.blur_sigma, batch, generator, device)
        sigma = torch.where(blurred, sigma, NO_BLUR_SIGMA)
        out = gaussian_blur(out, sigma, math.ceil(3 * view.blur_sigma[1]))
    low, high = view.gamma
    if (low, high) != (1.0, 1.0):
        out = adjust_gamma(out, torch.exp(uniform(math.log(low), math.log(high), batch,
                                                  generator, device)))
    jittered = None  # every sample, unless jitter_prob < 1
    if view.jitter_prob < 1 and (view.contrast > 0 or view.brightness > 0):
        jittered = torch.rand(batch, generator=generator, device=device) < view.jitter_prob
    if view.contrast > 0:
        factor = uniform(1 - view.contrast, 1 + view.contrast, batch, generator, device)
        if jittered is not None:
            factor = torch.where(jittered, factor, 1.0)
        out = adjust_contrast(out, factor)
    if view.brightness > 0:
        shift = uniform(-view.brightness, view.brightness, batch, generator, device)
        if jittered is not None:
            shift = torch.where(jittered, shift, 0.0)
        out = out + shift.view(shape)
    if view.noise_std > 0:
        sigma = uniform(0.0, view.noise_std, batch, generator, device)
        noise = torch.randn(out.shape, generator=generator, device=device)
        out = out + noise * sigma.view(shape)
    return out
