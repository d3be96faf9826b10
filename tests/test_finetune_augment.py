"""Fine-tuning augmentation: image and mask stay aligned, masks keep their class ids, flips
and rotations are exact, identity is identity, per-sample and seeded randomness, finite
intensities in the input dtype.

All on CPU: no GPU was available where these were written. The CUDA path is the same code
(the tensors' device decides where it runs); the CUDA test below runs only where one is.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cluster.config import ConfigError, from_dict
from finetune.augment import (
    SegAugmentConfig,
    affine_theta,
    augment_pair,
    warp_pair,
)

CLASSES = (0, 2, 5)  # gaps, so a blend of two ids that is rounded shows as a foreign id
# Every operation off: the starting point of tests that switch on one thing.
NOTHING = SegAugmentConfig(hflip=0.0, vflip=0.0, rotation_prob=0.0, scale_prob=0.0,
                           translate_prob=0.0, gamma_prob=0.0, contrast_prob=0.0,
                           brightness_prob=0.0, noise_prob=0.0)
GEOMETRY = dataclasses.replace(NOTHING, hflip=0.5, vflip=0.5, rotation=40.0, rotation_prob=1.0,
                               scale=(0.7, 1.4), scale_prob=1.0, translate=0.1,
                               translate_prob=1.0)
INTENSITY = {
    "gamma": dict(gamma=(0.5, 2.0), gamma_prob=1.0),
    "contrast": dict(contrast=0.5, contrast_prob=1.0),
    "brightness": dict(brightness=0.5, brightness_prob=1.0),
    "noise": dict(noise_std=0.3, noise_prob=1.0),
}
EVERYTHING = dataclasses.replace(GEOMETRY, **{k: v for op in INTENSITY.values()
                                               for k, v in op.items()})
# Everything at even odds: the coins themselves must come from the generator too.
HALF = dataclasses.replace(EVERYTHING, rotation_prob=0.5, scale_prob=0.5, translate_prob=0.5,
                           gamma_prob=0.5, contrast_prob=0.5, brightness_prob=0.5,
                           noise_prob=0.5)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def block_masks(batch: int, height: int = 48, width: int = 64, block: int = 8,
                seed: int = 0) -> torch.Tensor:
    """(B, H, W) int64 masks of random ``CLASSES`` in ``block``-pixel squares: large flat
    regions, so most pixels are far from a class boundary."""
    ids = torch.tensor(CLASSES)
    picks = torch.randint(len(CLASSES), (batch, height // block, width // block),
                          generator=seeded(seed))
    return ids[picks].repeat_interleave(block, 1).repeat_interleave(block, 2)


def images_of(masks: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) images whose channel 0 is the class id and channel 1 is 1 where the
    pixel's 3x3 neighbourhood holds one class (0 elsewhere).

    A bilinear sample whose channel 1 is 1 drew only on such pixels, all of one class, and
    the nearest pixel is one of them: there the mask must equal channel 0.
    """
    labels = masks[:, None].float()
    padded = torch.nn.functional.pad(labels, (1, 1, 1, 1), mode="replicate")
    spread = (torch.nn.functional.max_pool2d(padded, 3, stride=1)
              + torch.nn.functional.max_pool2d(-padded, 3, stride=1))
    return torch.cat([labels, (spread == 0).float()], dim=1)


def smooth_images(batch: int, height: int = 48, width: int = 64) -> torch.Tensor:
    """Distinct, asymmetric (B, 1, H, W) images, so any change of geometry shows."""
    rows = torch.linspace(-1, 1, height)[:, None]
    cols = torch.linspace(-1, 1, width)[None, :]
    shift = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1)
    return torch.sin(3 * cols + 2 * rows**2 + shift) + cols * rows


@pytest.mark.parametrize(("field", "value"), [
    ("hflip", 1.5), ("vflip", -0.1), ("rotation", 200.0), ("rotation_prob", 2.0),
    ("scale", (1.2, 0.8)), ("scale", (0.0, 1.0)), ("scale", (0.9, 1.0, 1.1)),
    ("translate", 0.6), ("gamma", (0.0, 1.0)), ("contrast", 1.0), ("brightness", -0.1),
    ("noise_std", math.nan), ("noise_prob", 1.1),
])
def test_config_rejects_out_of_range_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"augment {field} must be"):
        SegAugmentConfig(**{field: value})


def test_config_reads_from_a_mapping_with_lists() -> None:
    config = from_dict(SegAugmentConfig, {"scale": [0.9, 1.1], "rotation": 10})
    assert config.scale == (0.9, 1.1) and config.rotation == 10.0
    with pytest.raises(ConfigError, match="gamma"):
        from_dict(SegAugmentConfig, {"gamma": [2.0, 1.0]})


@pytest.mark.parametrize("config", [SegAugmentConfig(enabled=False), NOTHING],
                         ids=["disabled", "all-off"])
def test_identity_config_returns_inputs_unchanged(config: SegAugmentConfig) -> None:
    masks = block_masks(4)
    images = smooth_images(4)
    generator = seeded()
    state = generator.get_state()
    out_images, out_masks = augment_pair(images, masks, config, generator)
    assert torch.equal(out_images, images) and torch.equal(out_masks, masks)
    assert torch.equal(generator.get_state(), state)  # nothing off draws random numbers


@pytest.mark.parametrize(("field", "axis"), [("hflip", -1), ("vflip", -2)])
def test_forced_flip_equals_torch_flip(field: str, axis: int) -> None:
    masks = block_masks(3)
    images = smooth_images(3)
    config = dataclasses.replace(NOTHING, **{field: 1.0})
    out_images, out_masks = augment_pair(images, masks, config, seeded())
    assert torch.equal(out_images, images.flip(axis))
    assert torch.equal(out_masks, masks.flip(axis))


def test_image_and_mask_stay_aligned() -> None:
    masks = block_masks(16)
    images = images_of(masks)
    out_images, out_masks = augment_pair(images, masks, GEOMETRY, seeded())
    unambiguous = (out_images[:, 1] - 1).abs() < 1e-4
    assert unambiguous.float().mean() > 0.3  # enough pixels to make the check mean something
    assert torch.equal(out_masks[unambiguous], out_images[:, 0][unambiguous].round().long())
    assert not torch.equal(out_masks, masks)  # the geometry did move things


def test_masks_keep_only_their_class_ids_as_int64() -> None:
    masks = block_masks(16)
    _, out_masks = augment_pair(images_of(masks), masks, EVERYTHING, seeded())
    assert out_masks.dtype == torch.int64 and out_masks.shape == masks.shape
    assert set(out_masks.unique().tolist()) <= set(CLASSES)


def test_padding_is_the_image_minimum_and_background() -> None:
    masks = torch.full((2, 32, 32), 2, dtype=torch.int64)
    images = smooth_images(2, 32, 32) + torch.tensor([0.0, 3.0]).view(2, 1, 1, 1)
    shrink = affine_theta(torch.zeros(2), torch.full((2,), 0.5), torch.zeros(2),
                          torch.zeros(2))
    out_images, out_masks = warp_pair(images, masks, shrink)
    lowest = images.amin(dim=(1, 2, 3))
    assert torch.allclose(out_images[:, 0, 0, 0], lowest)  # a corner, outside the content
    assert (out_masks[:, :4, :] == 0).all() and (out_masks[:, 12:20, 12:20] == 2).all()


@pytest.mark.parametrize(("height", "width"), [(32, 32), (32, 64), (64, 32)])
def test_rotation_acts_on_pixels_not_on_the_stretched_grid(height: int, width: int) -> None:
    """A quarter turn of a centred 4 x 8 bar gives a centred 8 x 4 bar, also when the
    image is not square (ignoring the aspect would stretch it instead)."""
    masks = torch.zeros(1, height, width, dtype=torch.int64)
    cy, cx = height // 2, width // 2
    masks[0, cy - 2:cy + 2, cx - 4:cx + 4] = 1
    theta = affine_theta(torch.tensor([math.pi / 2]), torch.ones(1), torch.zeros(1),
                         torch.zeros(1), aspect=height / width)
    _, turned = warp_pair(torch.zeros(1, 1, height, width), masks, theta)
    expected = torch.zeros_like(masks)
    expected[0, cy - 4:cy + 4, cx - 2:cx + 2] = 1
    assert torch.equal(turned, expected)


def centred_disc(height: int, width: int, radius: float) -> torch.Tensor:
    """(1, H, W) int64: 1 inside a disc about the image centre."""
    rows = torch.arange(height)[:, None] + 0.5 - height / 2
    cols = torch.arange(width)[None, :] + 0.5 - width / 2
    return (rows**2 + cols**2 <= radius**2).long()[None]


@pytest.mark.parametrize(("height", "width"), [(32, 64), (64, 32)])
def test_random_rotation_keeps_a_centred_disc_round(height: int, width: int) -> None:
    masks = centred_disc(height, width, 10.0).expand(16, -1, -1)
    config = dataclasses.replace(NOTHING, rotation=90.0, rotation_prob=1.0)
    images = smooth_images(16, height, width)
    out_images, out_masks = augment_pair(images, masks, config, seeded())
    assert not torch.equal(out_images, images)  # it did rotate
    changed = (out_masks != masks).flatten(1).sum(dim=1)
    assert changed.max() <= 0.1 * masks[0].sum()  # boundary pixels only, not an ellipse


def test_zoom_and_shift_move_content_as_configured() -> None:
    masks = centred_disc(64, 64, 8.0).expand(32, -1, -1)
    images = smooth_images(32, 64, 64)
    zoom = dataclasses.replace(NOTHING, scale=(2.0, 2.0), scale_prob=1.0)
    _, zoomed = augment_pair(images, masks, zoom, seeded())
    assert torch.allclose(zoomed.flatten(1).sum(1).float(), 4.0 * masks[0].sum(), rtol=0.1)
    shift = dataclasses.replace(NOTHING, translate=0.2, translate_prob=1.0)
    _, shifted = augment_pair(images, masks, shift, seeded())
    assert (shifted.flatten(1).sum(1) == masks[0].sum()).all()  # moved, not cut or resized
    rows, cols = torch.arange(64.0)[:, None], torch.arange(64.0)[None, :]
    area = masks[0].sum()
    dy = (shifted * rows).flatten(1).sum(1) / area - (masks[0] * rows).sum() / area
    dx = (shifted * cols).flatten(1).sum(1) / area - (masks[0] * cols).sum() / area
    assert dx.abs().max() <= 0.2 * 64 + 1 and dy.abs().max() <= 0.2 * 64 + 1
    assert dx.abs().max() > 6 and dy.abs().max() > 6
    assert (dx - dy).abs().max() > 6  # each axis draws its own shift


def test_each_sample_gets_its_own_parameters() -> None:
    masks = block_masks(1).expand(32, -1, -1)
    images = smooth_images(1).expand(32, -1, -1, -1)
    # Flips and the noise field differ per sample anyway: leave them out to see the rest.
    config = dataclasses.replace(EVERYTHING, hflip=0.0, vflip=0.0, noise_prob=0.0)
    out_images, out_masks = augment_pair(images, masks, config, seeded())
    assert len({tuple(row.tolist()) for row in out_images.flatten(1)}) == 32
    assert len({tuple(row.tolist()) for row in out_masks.flatten(1)}) == 32
    # A coin per sample: some flipped, some not, each exactly one or the other.
    config = dataclasses.replace(NOTHING, hflip=0.5)
    flipped, _ = augment_pair(images, masks, config, seeded())
    is_flipped = (flipped == images.flip(-1)).flatten(1).all(dim=1)
    is_kept = (flipped == images).flatten(1).all(dim=1)
    assert (is_flipped | is_kept).all() and is_flipped.any() and is_kept.any()


def test_same_seed_same_result_other_seed_differs() -> None:
    masks = block_masks(8)
    images = images_of(masks)
    first = augment_pair(images, masks, HALF, seeded(7))
    again = augment_pair(images, masks, HALF, seeded(7))
    other = augment_pair(images, masks, HALF, seeded(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("op", [*INTENSITY, "all"])
def test_intensity_ops_keep_dtype_and_finite_values_and_leave_masks(
        op: str, dtype: torch.dtype) -> None:
    masks = block_masks(4, 32, 32)
    images = smooth_images(4, 32, 32)
    images[0] = 0.5  # a constant image: its range is 0, gamma must not divide by it
    images = images.to(dtype)
    settings = {k: v for o in INTENSITY.values() for k, v in o.items()} if op == "all" \
        else INTENSITY[op]
    out_images, out_masks = augment_pair(images, masks, dataclasses.replace(NOTHING, **settings),
                                         seeded())
    assert out_images.dtype == dtype and out_images.shape == images.shape
    assert torch.isfinite(out_images).all()
    assert not torch.equal(out_images, images)
    assert torch.equal(out_masks, masks)


def test_gamma_keeps_each_image_range() -> None:
    images = smooth_images(4) * torch.tensor([1.0, 2.0, 5.0, 0.1]).view(4, 1, 1, 1)
    masks = block_masks(4)
    config = dataclasses.replace(NOTHING, **INTENSITY["gamma"])
    out, _ = augment_pair(images, masks, config, seeded())
    assert torch.allclose(out.amin(dim=(1, 2, 3)), images.amin(dim=(1, 2, 3)), atol=1e-5)
    assert torch.allclose(out.amax(dim=(1, 2, 3)), images.amax(dim=(1, 2, 3)), atol=1e-5)


def test_operations_that_do_not_fire_leave_samples_exact() -> None:
    """A sample no operation fired on comes back bit for bit, even with others moving."""
    config = dataclasses.replace(HALF, hflip=0.0, vflip=0.0, rotation_prob=0.3,
                                 scale_prob=0.3, translate_prob=0.3, gamma_prob=0.3,
                                 contrast_prob=0.3, brightness_prob=0.3, noise_prob=0.3)
    masks = block_masks(64)
    images = smooth_images(64)  # not integers: rescaling them and back would show
    out_images, out_masks = augment_pair(images, masks, config, seeded())
    same = (out_images == images).flatten(1).all(dim=1)
    assert same.any() and not same.all()
    assert torch.equal(out_masks[same], masks[same])


def test_rejects_masks_that_do_not_match_images() -> None:
    with pytest.raises(ValueError, match="masks"):
        augment_pair(torch.zeros(2, 1, 8, 8), torch.zeros(2, 8, 9, dtype=torch.int64),
                     SegAugmentConfig(), seeded())


# Not run where this was written (no GPU there): the same code on CUDA tensors, with a
# generator on the GPU as the training loop would pass, and with a CPU generator.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("generator_device", ["cuda", "cpu"])
def test_runs_on_cuda(generator_device: str) -> None:
    masks = block_masks(8).cuda()
    images = images_of(masks.cpu()).cuda()
    generator = torch.Generator(device=generator_device).manual_seed(0)
    out_images, out_masks = augment_pair(images, masks, EVERYTHING, generator)
    assert out_images.device == images.device and out_masks.device == masks.device
    assert out_masks.dtype == torch.int64 and torch.isfinite(out_images).all()
    assert set(out_masks.unique().tolist()) <= set(CLASSES)
