"""Batched augmentation: geometry stays inside the image, exact flips and rotations, blur and
gamma against references, finite float32 output, per-sample parameters, seeded views."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from cluster.config import ConfigError, from_dict
from pretrain.augment import NO_BLUR_SIGMA, augment_view, crop_flip_theta, crop_theta, gaussian_blur
from pretrain.config import AugmentConfig, PretrainConfig, ViewConfig

# No randomness at all: a resize of the whole image.
PLAIN = ViewConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, brightness=0.0,
                   contrast=0.0)
FULL = ViewConfig(scale=(0.2, 1.0), hflip=0.5, vflip=0.5, rotation=30.0, gamma=(0.5, 2.0),
                  blur_prob=0.5, blur_sigma=(0.5, 1.5), noise_std=0.1)
# Each operation alone, on top of a fixed whole-image crop.
SINGLE = {
    "crop": dict(scale=(0.2, 0.8)),
    "rotation": dict(rotation=20.0),
    "blur": dict(blur_prob=1.0, blur_sigma=(0.3, 2.0)),
    "gamma": dict(gamma=(0.5, 2.0)),
    "contrast": dict(contrast=0.5),
    "brightness": dict(brightness=0.5),
    "noise": dict(noise_std=0.2),
}


def smooth_images(batch: int, height: int = 16, width: int = 16) -> torch.Tensor:
    """A batch of distinct, non-symmetric images, so any change of geometry shows."""
    rows = torch.linspace(-1, 1, height)[:, None]
    cols = torch.linspace(-1, 1, width)[None, :]
    shift = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1)
    return torch.sin(3 * cols + 2 * rows**2 + shift) + cols * rows


def randn(*shape: int) -> torch.Tensor:
    """Seeded test images: every run checks the same values."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def views(images: torch.Tensor, view: ViewConfig, size: int = 12, seed: int = 0) -> torch.Tensor:
    return augment_view(images, view, size, torch.Generator().manual_seed(seed))


def crop_areas(view: ViewConfig, aspect: float) -> tuple[torch.Tensor, torch.Tensor]:
    """512 random crop matrices of ``view`` and their areas as fractions of the image."""
    theta = crop_flip_theta(512, view, torch.Generator().manual_seed(0), torch.device("cpu"),
                            aspect=aspect)
    return theta, torch.linalg.det(theta[:, :, :2]).abs()


@pytest.mark.parametrize("aspect", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("rotation", [0.0, 30.0, 180.0])
def test_crops_stay_inside_the_image(rotation: float, aspect: float) -> None:
    plain = ViewConfig(scale=(0.08, 1.0), ratio=(0.5, 2.0), hflip=0.5, vflip=0.5)
    theta, area = crop_areas(dataclasses.replace(plain, rotation=rotation), aspect)
    # The output's corners (every sample point lies in their convex hull) map inside [-1, 1].
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0],
                            [1.0, 1.0, 1.0]]).T
    assert (theta @ corners).abs().max() <= 1 + 1e-5
    # The angle is drawn last, so the same seed draws the same crops before rotation: a
    # rotated crop keeps its area where it fits and shrinks where it does not.
    _, unrotated = crop_areas(plain, aspect)
    assert (area <= unrotated + 1e-6).all()
    assert area.min() >= 0.08 - 1e-6 if rotation == 0 else (area < unrotated - 0.05).any()


@pytest.mark.parametrize(("hflip", "vflip", "dims"),
                         [(1.0, 0.0, (3,)), (0.0, 1.0, (2,)), (1.0, 1.0, (2, 3))])
def test_flips_are_exact(hflip: float, vflip: float, dims: tuple[int, ...]) -> None:
    images = randn(3, 2, 8, 8)
    out = views(images, dataclasses.replace(PLAIN, hflip=hflip, vflip=vflip), 8)
    torch.testing.assert_close(out, images.flip(dims), rtol=0, atol=1e-5)


def test_no_flip_no_crop_is_the_identity() -> None:
    images = randn(3, 1, 8, 8)
    torch.testing.assert_close(views(images, PLAIN, 8), images, rtol=0, atol=1e-5)


def test_quarter_turn_equals_rot90() -> None:
    images = randn(2, 1, 9, 9)
    one = torch.ones(2)
    theta = crop_theta(one, one, one * math.pi / 2, 0 * one, 0 * one, one, one)
    grid = F.affine_grid(theta, [2, 1, 9, 9], align_corners=False)
    out = F.grid_sample(images, grid, align_corners=False)
    torch.testing.assert_close(out, torch.rot90(images, 1, dims=(2, 3)), rtol=0, atol=1e-5)


def test_rotation_by_a_known_angle_rotates_a_linear_ramp() -> None:
    # Bilinear interpolation is exact on a linear image, so the rotated view is analytic.
    size, out_size, angle = 16, 10, math.radians(30)
    centred = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    ramp = (2 * centred[None, :] + 0.5 * centred[:, None]).expand(1, 1, size, size)
    one = torch.ones(1)
    theta = crop_theta(one, one, one * angle, 0 * one, 0 * one, one, one)
    out = F.grid_sample(ramp, F.affine_grid(theta, [1, 1, out_size, out_size],
                                            align_corners=False), align_corners=False)
    shrink = 1 / (math.cos(angle) + math.sin(angle))  # the rotated square must fit
    u = (2 * torch.arange(out_size) + 1) / out_size - 1  # output pixel centres in [-1, 1]
    u, v = u[None, :], u[:, None]
    x = shrink * (math.cos(angle) * u - math.sin(angle) * v) * size / 2
    y = shrink * (math.sin(angle) * u + math.cos(angle) * v) * size / 2
    torch.testing.assert_close(out[0, 0], 2 * x + 0.5 * y, rtol=0, atol=1e-4)


def test_rotation_of_a_non_square_image_is_a_rotation_in_pixels() -> None:
    height, width = 20, 40
    view = ViewConfig(rotation=45.0, hflip=0.5, vflip=0.5)
    theta = crop_flip_theta(64, view, torch.Generator().manual_seed(0), torch.device("cpu"),
                            aspect=height / width)
    pixels = torch.diag(torch.tensor([width / 2, height / 2])) @ theta[:, :, :2]
    gram = pixels.transpose(1, 2) @ pixels  # columns orthogonal: no shear, only scale
    assert gram[:, 0, 1].abs().max() < 1e-4 * gram.diagonal(dim1=1, dim2=2).max()
    out = views(randn(64, 1, height, width), view, 12)
    assert out.shape == (64, 1, 12, 12) and torch.isfinite(out).all()


def reference_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """A dense 2-D Gaussian of radius ceil(3 sigma) with mirrored borders, one image."""
    radius = math.ceil(3 * sigma)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(taps[:, None] ** 2 + taps[None, :] ** 2) / (2 * sigma**2))
    padded = F.pad(image[None].double(), (radius,) * 4, mode="reflect")
    return F.conv2d(padded, (kernel / kernel.sum())[None, None].expand(image.shape[0], 1, -1, -1),
                    groups=image.shape[0])[0].float()


def test_blur_matches_a_reference_gaussian_per_sample() -> None:
    images = randn(4, 2, 20, 24)
    sigma = torch.tensor([0.5, 1.0, 2.0, NO_BLUR_SIGMA])
    out = gaussian_blur(images, sigma, radius=6)
    for image, blurred, s in zip(images, out, sigma.tolist()):
        torch.testing.assert_close(blurred, reference_blur(image, s), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[3], images[3], rtol=0, atol=0)  # the identity
    variance = out.var(dim=(1, 2, 3))
    assert variance[2] < variance[1] < variance[0] < images[:3].var(dim=(1, 2, 3)).min()


def test_blur_probability_picks_samples() -> None:
    images = smooth_images(1).expand(64, 1, 16, 16) + randn(64, 1, 16, 16)
    fixed = dataclasses.replace(PLAIN, blur_prob=1.0, blur_sigma=(1.0, 1.0))
    torch.testing.assert_close(views(images, fixed, 16),
                               gaussian_blur(images, torch.ones(64), 3), rtol=0, atol=1e-5)
    out = views(images, dataclasses.replace(fixed, blur_prob=0.5), 16)
    unchanged = (out - images).flatten(1).abs().amax(1) < 1e-4
    assert 0 < unchanged.sum() < 64


def test_jitter_prob_picks_the_samples_whose_contrast_and_brightness_change() -> None:
    images = smooth_images(64)
    jitter = dataclasses.replace(PLAIN, contrast=0.5, brightness=0.5)
    unchanged = (views(images, dataclasses.replace(jitter, jitter_prob=0.0), 16) - images)
    assert unchanged.abs().max() < 1e-5  # the whole-image crop is the identity
    assert torch.equal(views(images, dataclasses.replace(jitter, jitter_prob=1.0), 16),
                       views(images, jitter, 16))  # 1 draws nothing extra: the default
    out = views(images, dataclasses.replace(jitter, jitter_prob=0.8), 16)
    kept = (out - images).flatten(1).abs().amax(1) < 1e-5
    assert 2 <= kept.sum() <= 26  # about 20% of 64 samples left alone
    # a jittered sample gets both changes: its mean and its spread move
    moved = ~kept
    mean_shift = (out - images).mean(dim=(1, 2, 3)).abs()
    spread = out.std(dim=(1, 2, 3)) / images.std(dim=(1, 2, 3))
    assert (mean_shift[moved] > 0).all() and ((spread[moved] - 1).abs() > 1e-4).all()


def test_gamma_rescales_by_each_image_range() -> None:
    images = randn(4, 1, 8, 8) * 3 + 1
    out = views(images, dataclasses.replace(PLAIN, gamma=(2.0, 2.0)), 8)
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    expected = low + (high - low) * ((images - low) / (high - low)) ** 2
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    random = views(images, dataclasses.replace(PLAIN, gamma=(0.5, 2.0)), 8)
    torch.testing.assert_close(random.amin(dim=(1, 2, 3)), low.flatten())  # range kept
    torch.testing.assert_close(random.amax(dim=(1, 2, 3)), high.flatten())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.uint8])
def test_output_is_finite_float32_for_any_input(dtype: torch.dtype) -> None:
    images = (randn(8, 1, 16, 16).abs() * 50).to(dtype)
    out = views(images, FULL)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("value", [0.0, -3.5, 1e4])
def test_constant_images_stay_constant_and_finite(value: float) -> None:
    images = torch.full((6, 1, 16, 16), value)
    intensity = dataclasses.replace(FULL, brightness=0.0, noise_std=0.0, contrast=0.5)
    out = views(images, intensity)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.full_like(out, value))
    assert torch.isfinite(views(images, FULL)).all()


@pytest.mark.parametrize("name", SINGLE)
def test_each_sample_gets_its_own_parameters(name: str) -> None:
    images = smooth_images(1).expand(16, 1, 16, 16)  # the same image 16 times
    out = views(images, dataclasses.replace(PLAIN, **SINGLE[name])).flatten(1)
    distances = torch.cdist(out, out) + torch.eye(16)
    assert distances.min() > 1e-4, name  # every pair of samples differs


def test_same_seed_same_views_other_seed_other_views() -> None:
    images = smooth_images(8)
    first, again, other = (views(images, FULL, seed=s) for s in (7, 7, 8))
    assert torch.equal(first, again)
    assert not torch.isclose(first, other).flatten(1).all(1).any()  # every sample differs


def test_channels_share_parameters_and_never_mix() -> None:
    # No colour operations: equal channels stay equal (noise aside, drawn per pixel).
    images = smooth_images(8).expand(8, 3, 16, 16)
    out = views(images, dataclasses.replace(FULL, noise_std=0.0))
    torch.testing.assert_close(out[:, 1:], out[:, :1].expand(8, 2, 12, 12), rtol=0, atol=1e-6)


def test_no_colour_operations_exist() -> None:
    names = {f.name for f in dataclasses.fields(ViewConfig)}
    assert not {n for n in names for w in ("hue", "saturation", "gray", "solarize") if w in n}


def test_default_views_are_asymmetric_like_byol() -> None:
    augment = AugmentConfig()
    assert augment.view1.blur_prob == 1.0 and augment.view2.blur_prob == 0.1
    assert augment.view1.noise_std == 0.0 < augment.view2.noise_std
    out = [views(smooth_images(4), v) for v in (augment.view1, augment.view2)]
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in out)


@pytest.mark.parametrize(("key", "value"), [("gamma", [0.0, 1.0]), ("blur_prob", 1.5),
                                            ("contrast", 1.0), ("rotation", -5.0),
                                            ("jitter_prob", 1.5),
                                            ("blur_sigma", [0.0, 1.0])])
def test_bad_settings_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"augment\.view2: {key} out of range"):
        from_dict(PretrainConfig, {"augment": {"view2": {key: value}}})
