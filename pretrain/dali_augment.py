"""One augmented view of a batch inside a DALI pipeline, with per-sample random parameters.

The DALI counterpart of :mod:`pretrain.augment`: the same random resized crop, flips,
rotation, Gaussian blur, gamma, contrast, brightness and noise, with the same parameter
meaning and in the same order. Only operations that make sense for intensity images are
used: no hue, saturation or grayscale. Random numbers come from DALI's seeded generators,
so a pipeline seed fixes every view (they differ from the torch path's draws).

Crop, flips and rotation compose into one destination-to-source matrix per sample, so
each output pixel is interpolated once; a rotated crop shrinks until it fits the image, so
only image pixels are sampled (points within half a pixel of the edge repeat the border,
as ``grid_sample(padding_mode="border")`` does in the torch path).
"""

from __future__ import annotations

import math

from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.data_node import DataNode

from pretrain.augment import MIN_SPREAD, NO_BLUR_SIGMA
from pretrain.config import ViewConfig


def _uniform(low: float, high: float) -> DataNode:
    """Per-sample U(low, high); also valid for low == high, which DALI's range rejects."""
    return low + (high - low) * fn.random.uniform(range=[0.0, 1.0])


def _coin(probability: float) -> DataNode:
    """Per-sample 1 with ``probability``, else 0."""
    return fn.random.coin_flip(probability=probability, dtype=types.DALIDataType.INT32)


def crop_matrix(height: DataNode, width: DataNode, view: ViewConfig, size: int) -> DataNode:
    """Random :func:`place_crop` matrices of ``view``, drawn as
    :func:`pretrain.augment.crop_flip_theta` draws them: area and log aspect ratio uniform in
    ``view.scale``/``view.ratio`` (sides clipped to the image), flips with probability
    ``view.hflip``/``view.vflip``, angle uniform in +-``view.rotation`` degrees."""
    area = _uniform(*view.scale)
    ratio = dmath.exp(_uniform(math.log(view.ratio[0]), math.log(view.ratio[1])))
    crop_w = dmath.min(dmath.sqrt(area * ratio), 1.0)
    crop_h = dmath.min(dmath.sqrt(area / ratio), 1.0)
    flip_x, flip_y = 1 - 2 * _coin(view.hflip), 1 - 2 * _coin(view.vflip)
    angle = None
    if view.rotation > 0:
        angle = _uniform(-view.rotation, view.rotation) * (math.pi / 180.0)
    shift_x, shift_y = _uniform(-1.0, 1.0), _uniform(-1.0, 1.0)
    return place_crop(height, width, crop_w, crop_h, angle, shift_x, shift_y, flip_x, flip_y,
                      size)


def place_crop(height: DataNode, width: DataNode, crop_w: DataNode, crop_h: DataNode,
               angle: DataNode | None, shift_x: DataNode, shift_y: DataNode,
               flip_x: DataNode, flip_y: DataNode, size: int) -> DataNode:
    """(2, 3) destination-to-source matrices for ``fn.warp_affine``, in pixel units.

    As :func:`pretrain.augment.crop_theta`, per sample: ``crop_w``/``crop_h`` are the crop's
    sides as fractions of the image's, ``angle`` (radians, None for none) rotates it about
    its centre, ``flip_*`` are +-1; the crop shrinks until the rotated crop fits the image
    and ``shift_*`` in [-1, 1] place its centre within the room left:
    source = centre + R S (dest - size/2).
    """
    if angle is not None:
        cos, sin = dmath.cos(angle), dmath.sin(angle)
    else:  # per-sample tensors: fn.stack takes no Python constants
        cos, sin = 1.0 + 0.0 * crop_w, 0.0 * crop_w
    # Bounding box of the rotated crop, as fractions of the image's sides; shrink to fit.
    reach_x = dmath.abs(cos) * crop_w + dmath.abs(sin) * crop_h * height / width
    reach_y = dmath.abs(sin) * crop_w * width / height + dmath.abs(cos) * crop_h
    shrink = 1.0 / dmath.max(dmath.max(reach_x, reach_y), 1.0)
    scale_x = flip_x * crop_w * shrink * width / size
    scale_y = flip_y * crop_h * shrink * height / size
    m00, m01, m10, m11 = cos * scale_x, -sin * scale_y, sin * scale_x, cos * scale_y
    centre_x = width * 0.5 * (1.0 + shift_x * (1.0 - reach_x * shrink))
    centre_y = height * 0.5 * (1.0 + shift_y * (1.0 - reach_y * shrink))
    half = size / 2.0
    m02 = centre_x - (m00 + m01) * half
    m12 = centre_y - (m10 + m11) * half
    return fn.reshape(fn.stack(m00, m01, m02, m10, m11, m12), shape=[2, 3])


def adjust_gamma(images: DataNode, gamma: DataNode) -> DataNode:
    """Per-sample ``gamma`` on each image's own [min, max] rescaled to [0, 1] (gamma acts on
    [0, 1]), then scaled back, as :func:`pretrain.augment.adjust_gamma`."""
    lowest, highest = fn.reductions.min(images), fn.reductions.max(images)
    spread = highest - lowest
    return lowest + spread * dmath.pow((images - lowest) / dmath.max(spread, MIN_SPREAD), gamma)


def adjust_contrast(images: DataNode, factor: DataNode) -> DataNode:
    """Scale each image's deviations from its own mean by the per-sample ``factor``, as
    :func:`pretrain.augment.adjust_contrast`."""
    mean = fn.reductions.mean(images)
    return mean + (images - mean) * factor


def add_noise(images: DataNode, sigma: DataNode) -> DataNode:
    """Zero-mean Gaussian noise of per-sample standard deviation ``sigma``."""
    return fn.noise.gaussian(images, stddev=sigma)


def augment_view(images: DataNode, height: DataNode, width: DataNode, view: ViewConfig,
                 size: int) -> DataNode:
    """One view (C, size, size) of float HWC images; ``height``/``width`` are per-sample
    float scalars on the CPU (argument inputs such as the matrix must live there)."""
    out = fn.warp_affine(images, matrix=crop_matrix(height, width, view, size),
                         size=[size, size], interp_type=types.DALIInterpType.INTERP_LINEAR)
    if view.blur_prob > 0:
        blurred = _coin(view.blur_prob)
        sigma = blurred * _uniform(*view.blur_sigma) + (1 - blurred) * NO_BLUR_SIGMA
        out = fn.gaussian_blur(out, sigma=sigma)
    low, high = view.gamma
    if (low, high) != (1.0, 1.0):
        out = adjust_gamma(out, dmath.exp(_uniform(math.log(low), math.log(high))))
    jittered = None  # every sample, unless jitter_prob < 1
    if view.jitter_prob < 1 and (view.contrast > 0 or view.brightness > 0):
        jittered = _coin(view.jitter_prob)
    if view.contrast > 0:
        factor = _uniform(1 - view.contrast, 1 + view.contrast)
        if jittered is not None:
            factor = jittered * factor + (1 - jittered) * 1.0
        out = adjust_contrast(out, factor)
    if view.brightness > 0:
        shift = _uniform(-view.brightness, view.brightness)
        if jittered is not None:
            shift = jittered * shift
        out = out + shift
    if view.noise_std > 0:
        out = add_noise(out, _uniform(0.0, view.noise_std))
    return fn.transpose(out, perm=[2, 0, 1], output_layout="CHW")
