"""Batched spatial and intensity augmentation of image and mask together, for fine-tuning.

Like :mod:`pretrain.augment`, this runs on whole batches on the training device (the GPU
when there is one), with per-sample random parameters drawn from one ``torch.Generator``,
so a run is reproducible from its seed. Segmentation adds one constraint: the mask must
follow the image exactly. Both are therefore moved by the same sampling grid, the image
with bilinear and the mask with nearest-neighbour interpolation (so a mask only ever holds
class ids it had, never a blend of two). Intensity changes touch the image only.

Per sample, in this order: flips; one affine resampling (rotation, scale, translation);
gamma; contrast; brightness; Gaussian noise (the intensity order of ``pretrain.augment``).
Each operation fires with its own probability; a sample it does not fire on keeps its
values bit for bit, and an operation that is off draws no random numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from finetune.config import SegAugmentConfig
from pretrain.augment import adjust_contrast, adjust_gamma, uniform


def augment_pair(images: torch.Tensor, masks: torch.Tensor, config: SegAugmentConfig,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment images (B, C, H, W) float and their masks (B, H, W) int64 together.

    Returns new tensors of the same shapes, dtypes and device (or the inputs themselves
    when nothing is on). Random numbers come from ``generator`` on its own device and the
    per-sample parameters are moved to the images'; a generator on the images' device
    avoids copying the noise field across.
    """
    if not config.enabled:
        return images, masks
    if masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"masks {tuple(masks.shape)} do not match images "
                         f"{tuple(images.shape)}: expected (B, H, W) for (B, C, H, W)")
    images, masks = random_flips(images, masks, config, generator)
    images, masks = random_affine(images, masks, config, generator)
    return random_intensity(images, config, generator), masks


def _draw(prob: float, low: float, high: float, neutral: float, batch: int,
          generator: torch.Generator, device: torch.device,
          log: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-sample (fired, value) for one operation, or None when it cannot fire.

    ``value`` is uniform (log-uniform with ``log``) in [low, high] where it fired and
    ``neutral`` elsewhere. Both are drawn on the generator's device and then moved, so
    a CPU generator still drives a GPU batch.
    """
    if prob <= 0 or low == high == neutral:
        return None
    draw_on = generator.device
    fired = torch.rand(batch, generator=generator, device=draw_on) < prob
    if log:
        value = torch.exp(uniform(math.log(low), math.log(high), batch, generator, draw_on))
    else:
        value = uniform(low, high, batch, generator, draw_on)
    value = torch.where(fired, value, neutral)
    return fired.to(device), value.to(device)


def random_flips(images: torch.Tensor, masks: torch.Tensor, config: SegAugmentConfig,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each sample's image and mask together, each axis with its own chance.

    Flips are exact permutations, so they are done by indexing rather than folded into the
    affine grid: bilinear resampling at mirrored pixel centres is only equal up to rounding.
    They commute in distribution with the symmetric rotation and shift drawn afterwards.
    """
    for prob, axis in ((config.hflip, -1), (config.vflip, -2)):
        if prob <= 0:
            continue
        fired = torch.rand(images.shape[0], generator=generator, device=generator.device)
        fired = (fired < prob).to(images.device)
        images = torch.where(fired.view(-1, 1, 1, 1), images.flip(axis), images)
        masks = torch.where(fired.view(-1, 1, 1), masks.flip(axis), masks)
    return images, masks


def affine_theta(angle: torch.Tensor, scale: torch.Tensor, shift_x: torch.Tensor,
                 shift_y: torch.Tensor, aspect: float = 1.0) -> torch.Tensor:
    """``affine_grid`` matrices (B, 2, 3) that rotate the content by ``angle`` (radians)
    about the image centre, zoom it by ``scale`` and move it by ``shift_*`` (normalised
    units: 2 is a whole side). ``aspect`` is height / width, so rotation acts on pixels,
    not on the stretched [-1, 1] grid.

    affine_grid maps output coordinates to input ones, so this is the inverse of the content
    transform: input = R(-angle) / scale @ (output - shift).
    """
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    a, b = cos, sin * aspect
    c, d = -sin / aspect, cos
    theta = torch.stack([a, b, -(a * shift_x + b * shift_y),
                         c, d, -(c * shift_x + d * shift_y)], dim=1)
    return theta.view(-1, 2, 3)


def warp_pair(images: torch.Tensor, masks: torch.Tensor,
              theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample images (bilinear) and masks (nearest) on the same grid from ``theta``.

    Outside the image, each image channel is padded with its own minimum: MRI is z-scored
    per volume, so 0 is mid-grey tissue while the minimum is what air (the background a
    scanner shows beyond the body) looks like; a constant 0 would draw a bright frame for the
    model to learn. Masks are padded with 0, the background class, which is what lies there.
    """
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    # Sample the offset from the minimum with zero padding, so the border blends into it.
    lowest = images.amin(dim=(2, 3), keepdim=True)
    moved = F.grid_sample(images - lowest, grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False) + lowest
    # Nearest sampling returns stored values unchanged; class ids are exact in float32.
    labels = F.grid_sample(masks[:, None].float(), grid.float(), mode="nearest",
                           padding_mode="zeros", align_corners=False)
    return moved, labels[:, 0].round().to(masks.dtype)


def random_affine(images: torch.Tensor, masks: torch.Tensor, config: SegAugmentConfig,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random rotation, zoom and shift per sample, applied to image and mask alike.

    Samples none of these fired on keep their exact values (resampling with an identity
    grid is only equal up to rounding); a config with all three off skips resampling.
    """
    params = _affine_params(config, images.shape[0], generator, images.device)
    if params is None:
        return images, masks
    moved, angle, scale, shift_x, shift_y = params
    _, _, height, width = images.shape
    work = images.to(torch.promote_types(images.dtype, torch.float32))
    theta = affine_theta(angle, scale, shift_x, shift_y, aspect=height / width)
    warped, warped_masks = warp_pair(work, masks, theta)
    images = torch.where(moved.view(-1, 1, 1, 1), warped.to(images.dtype), images)
    masks = torch.where(moved.view(-1, 1, 1), warped_masks, masks)
    return images, masks


def _affine_params(config: SegAugmentConfig, batch: int, generator: torch.Generator,
                   device: torch.device) -> tuple[torch.Tensor, ...] | None:
    """Per-sample (moved, angle, scale, shift_x, shift_y), or None when all are off."""
    rotation = math.radians(config.rotation)
    angle = _draw(config.rotation_prob, -rotation, rotation, 0.0, batch, generator, device)
    scale = _draw(config.scale_prob, *config.scale, 1.0, batch, generator, device, log=True)
    shift_x = _draw(config.translate_prob, -config.translate, config.translate, 0.0, batch,
                    generator, device)
    shift_y = None
    if shift_x is not None:  # one chance moves the sample, each axis by its own amount
        other = uniform(-config.translate, config.translate, batch, generator,
                         generator.device).to(device)
        shift_y = (shift_x[0], torch.where(shift_x[0], other, 0.0))
    draws = (angle, scale, shift_x, shift_y)
    if all(draw is None for draw in draws):
        return None
    neutral = (0.0, 1.0, 0.0, 0.0)
    values = [torch.full((batch,), fill, device=device) if draw is None else draw[1]
              for draw, fill in zip(draws, neutral)]
    moved = torch.stack([draw[0] for draw in draws if draw is not None]).any(dim=0)
    # Normalised units span 2 per side, so a fraction f of the side is a shift of 2 f.
    return moved, values[0], values[1], 2 * values[2], 2 * values[3]


def random_intensity(images: torch.Tensor, config: SegAugmentConfig,
                     generator: torch.Generator) -> torch.Tensor:
    """Gamma, contrast, brightness and noise, each per sample with its own chance.

    Computed in at least float32 (gamma's power in half precision loses the dark end) and
    returned in the input dtype.
    """
    batch, device = images.shape[0], images.device
    out = images.to(torch.promote_types(images.dtype, torch.float32))
    gamma = _draw(config.gamma_prob, *config.gamma, 1.0, batch, generator, device, log=True)
    if gamma is not None:
        out = _where(gamma[0], adjust_gamma(out, gamma[1]), out)
    contrast = _draw(config.contrast_prob, 1 - config.contrast, 1 + config.contrast, 1.0,
                     batch, generator, device)
    if contrast is not None:
        out = _where(contrast[0], adjust_contrast(out, contrast[1]), out)
    brightness = _draw(config.brightness_prob, -config.brightness, config.brightness, 0.0,
                       batch, generator, device)
    if brightness is not None:
        out = _where(brightness[0], out + brightness[1].view(-1, 1, 1, 1), out)
    noise = _draw(config.noise_prob, 0.0, config.noise_std, 0.0, batch, generator, device)
    if noise is not None:
        field = torch.randn(out.shape, generator=generator, device=generator.device)
        out = _where(noise[0], out + field.to(device, out.dtype) * noise[1].view(-1, 1, 1, 1),
                     out)
    return out if out.dtype == images.dtype else out.to(images.dtype)


def _where(fired: torch.Tensor, changed: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per sample: ``changed`` where the operation fired, ``kept`` bit for bit elsewhere."""
    return torch.where(fired.view(-1, 1, 1, 1), changed, kept)
