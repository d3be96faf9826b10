"""In-plane resampling/resizing: geometry, dtype and range preservation, label safety."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_prep.geometry import center_pad_crop
from data_prep.resample import (
    fit_to_size,
    new_spacing,
    resample_inplane,
    resampled_size,
    resize_inplane,
)


def _blob_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """Background 0 with an off-centre disc of label 3 and a square of label 1."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    plane = np.zeros(shape[:2], np.uint8)
    plane[(x - 0.6 * shape[0]) ** 2 + (y - 0.35 * shape[1]) ** 2 < (0.15 * shape[0]) ** 2] = 3
    plane[2:6, 2:6] = 1
    return np.repeat(plane[:, :, None], shape[2], axis=2)


def _centroid_mm(mask: np.ndarray, label: int, spacing: tuple[float, ...]) -> np.ndarray:
    """Centroid in mm, voxel centres at (i + 0.5) * spacing (the align_corners=False grid)."""
    points = np.argwhere(mask[:, :, 0] == label) + 0.5
    return points.mean(axis=0) * np.asarray(spacing[:2])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
def test_identity_when_target_equals_spacing(dtype: type) -> None:
    rng = np.random.default_rng(0)
    image = (rng.random((20, 17, 3)) * 100).astype(dtype)
    mask = _blob_mask((20, 17, 3))
    spacing = (1.25, 0.8, 6.0)
    out, out_mask, out_spacing = resample_inplane(image, mask, spacing, spacing[:2])
    assert out.dtype == image.dtype and np.array_equal(out, image)
    assert out_mask is not None and np.array_equal(out_mask, mask)
    assert out_spacing == spacing
    assert out is not image  # a copy: callers may modify it


def test_downsampling_constant_image_stays_constant() -> None:
    image = np.full((64, 48, 4), 1234, np.uint16)
    out, _, spacing = resample_inplane(image, None, (1.0, 1.0, 5.0), (2.0, 2.0))
    assert out.shape == (32, 24, 4) and out.dtype == np.uint16
    assert np.all(out == 1234)
    assert spacing == (2.0, 2.0, 5.0)


@pytest.mark.parametrize("shape,spacing,target", [
    ((100, 90, 2), (1.37, 1.37, 8.0), (1.0, 1.0)),
    ((37, 53, 2), (0.7, 1.9, 5.0), (1.5, 1.1)),
    ((5, 5, 1), (1.0, 1.0, 1.0), (3.0, 3.0)),
])
def test_physical_extent_preserved(shape: tuple[int, int, int], spacing: tuple[float, ...],
                                   target: tuple[float, float]) -> None:
    image = np.zeros(shape, np.float32)
    out, _, out_spacing = resample_inplane(image, None, spacing, target)
    for axis in (0, 1):
        assert out.shape[axis] == resampled_size(shape[axis], spacing[axis], target[axis])
        assert out.shape[axis] * out_spacing[axis] == pytest.approx(shape[axis] * spacing[axis])
        assert abs(out_spacing[axis] - target[axis]) <= target[axis] / out.shape[axis]
    assert out.shape[2] == shape[2] and out_spacing[2] == spacing[2]


def test_resampled_size_rounds_half_up_and_is_at_least_one() -> None:
    assert resampled_size(5, 1.0, 2.0) == 3  # 2.5 -> 3, not banker's 2
    assert resampled_size(3, 1.0, 100.0) == 1
    assert new_spacing((1.0, 2.0), (10, 10), (4, 5)) == (2.5, 4.0)


@pytest.mark.parametrize("target", [(2.3, 2.3), (0.55, 0.7), (1.6, 0.45)])
def test_mask_labels_subset_and_centroid_stays(target: tuple[float, float]) -> None:
    mask = _blob_mask((60, 50, 2))
    spacing = (1.0, 1.0, 5.0)
    image = mask.astype(np.int16)
    _, out_mask, out_spacing = resample_inplane(image, mask, spacing, target)
    assert out_mask is not None and out_mask.dtype == np.uint8
    assert set(np.unique(out_mask)) <= set(np.unique(mask))
    assert 3 in out_mask
    shift = _centroid_mm(out_mask, 3, out_spacing) - _centroid_mm(mask, 3, spacing)
    assert np.all(np.abs(shift) <= np.maximum(spacing[:2], out_spacing[:2]))


@pytest.mark.parametrize("shape", [(13, 40), (80, 31), (64, 64)])
def test_mask_matches_torch_nearest_exact(shape: tuple[int, int]) -> None:
    mask = np.random.default_rng(1).integers(0, 4, (50, 45, 3), dtype=np.uint8)
    _, ours = resize_inplane(np.zeros(mask.shape, np.float32), mask, shape)
    batch = torch.from_numpy(np.ascontiguousarray(mask.transpose(2, 0, 1)))[:, None]
    theirs = F.interpolate(batch, size=shape, mode="nearest-exact")[:, 0].numpy()
    assert np.array_equal(ours, theirs.transpose(1, 2, 0))


@pytest.mark.parametrize("target", [(0.5, 0.5), (3.0, 3.0), (0.7, 2.9)])
def test_uint16_extremes_never_wrap(target: tuple[float, float]) -> None:
    rng = np.random.default_rng(2)
    image = rng.choice(np.array([0, 1, 65534, 65535], np.uint16), size=(40, 40, 3))
    image[:20] = 65535  # large saturated areas at the top of the range
    image[:, :5] = 0
    out, _, _ = resample_inplane(image, None, (1.0, 1.0, 1.0), target)
    assert out.dtype == np.uint16
    assert out.min() >= image.min() and out.max() <= image.max()
    assert out.max() == 65535 and out.min() == 0  # saturated areas stay saturated


def test_int16_negative_hu_kept() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(-1024, 3072, (48, 48, 2)).astype(np.int16)
    image[:10] = -1024  # air
    image[-10:] = 32767
    out, _, _ = resample_inplane(image, None, (0.7, 0.7, 2.5), (1.5, 1.5))
    assert out.dtype == np.int16
    assert out.min() == -1024 and out.max() == 32767


def test_int16_full_range_survives_upsampling() -> None:
    image = np.zeros((8, 8, 1), np.int16)
    image[::2] = -32768
    image[1::2] = 32767
    out, _, _ = resample_inplane(image, None, (1.0, 1.0, 1.0), (0.3, 0.3))
    assert out.dtype == np.int16
    assert out.min() == -32768 and out.max() == 32767


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_input_stays_finite_and_in_range(dtype: type) -> None:
    image = np.random.default_rng(4).normal(0, 1e3, (33, 29, 4)).astype(dtype)
    for target in ((0.4, 0.4), (2.7, 1.9)):
        out, _, _ = resample_inplane(image, None, (1.0, 1.0, 1.0), target)
        assert out.dtype == dtype and np.isfinite(out).all()
        slack = 1e-3 if dtype == np.float32 else 1e-9
        assert out.min() >= image.min() - slack and out.max() <= image.max() + slack


def test_channels_resampled_independently() -> None:
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (30, 20, 2, 3)).astype(np.uint8)
    mask = _blob_mask((30, 20, 2))
    out, out_mask, _ = resample_inplane(image, mask, (1.0, 1.0, 1.0), (2.0, 2.0))
    assert out.shape == (15, 10, 2, 3) and out.dtype == np.uint8
    assert out_mask is not None and out_mask.shape == (15, 10, 2)
    for channel in range(3):
        single, _, _ = resample_inplane(image[..., channel], None, (1.0, 1.0, 1.0), (2.0, 2.0))
        assert np.array_equal(out[..., channel], single)


def test_pad_crop_is_lossless() -> None:
    image = np.random.default_rng(6).integers(0, 65536, (70, 50, 3)).astype(np.uint16)
    mask = _blob_mask((70, 50, 3))
    out, out_mask, scale = fit_to_size(image, mask, 64, "pad_crop")
    assert scale == (1.0, 1.0)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint16
    assert np.array_equal(out, center_pad_crop(image, 64, fill=int(image.min())))
    assert np.array_equal(out[:, 7:57], image[3:67])  # the kept voxels, bit for bit
    assert out_mask is not None and np.array_equal(out_mask[:, 7:57], mask[3:67])


def test_fit_keeps_aspect_and_pads_with_minimum() -> None:
    image = np.full((100, 50, 2), 500, np.int16)
    image[0, 0, 0] = -7  # the volume minimum: the default fill
    mask = np.ones((100, 50, 2), np.uint8)
    out, out_mask, scale = fit_to_size(image, mask, 64, "fit")
    assert out.shape == (64, 64, 2) and out.dtype == np.int16
    assert scale == (0.64, 0.64)
    assert np.all(out[:, :16] == -7) and np.all(out[:, 48:] == -7)  # 32 wide, padded 16+16
    assert out_mask is not None and np.all(out_mask[:, :16] == 0)
    assert np.all(out_mask[:, 16:48] == 1)


def test_fill_scales_shorter_side_and_crops() -> None:
    image = np.random.default_rng(7).random((40, 80, 1, 3)).astype(np.float32)
    out, out_mask, scale = fit_to_size(image, None, 64, "fill", fill=0.0)
    assert out.shape == (64, 64, 1, 3) and out_mask is None
    assert scale == (1.6, 1.6)


def test_fit_spacing_update_keeps_extent() -> None:
    image = np.zeros((90, 60, 1), np.uint8)
    spacing = np.array([1.2, 1.2])
    out, _, scale = fit_to_size(image, None, 32, "fit")
    resized = np.round(np.array(image.shape[:2]) * np.array(scale))
    assert np.allclose(resized * (spacing / scale), np.array(image.shape[:2]) * spacing)
    assert out.shape[:2] == (32, 32)


@pytest.mark.parametrize("call,message", [
    (lambda: resample_inplane(np.zeros((4, 4, 1)), None, (0.0, 1.0, 1.0), (1.0, 1.0)),
     "spacing"),
    (lambda: resample_inplane(np.zeros((4, 4, 1)), None, (1.0, 1.0, 1.0), (1.0, -2.0)),
     "target_spacing"),
    (lambda: resample_inplane(np.zeros((4, 4, 1)), None, (1.0, 1.0), (1.0, 1.0)), "3 values"),
    (lambda: resample_inplane(np.zeros((4, 4, 1)), np.zeros((4, 5, 1)), (1.0,) * 3, (1.0,) * 2),
     "mask shape"),
    (lambda: resample_inplane(np.zeros((4, 4)), None, (1.0,) * 3, (1.0,) * 2), "image must be"),
    (lambda: resample_inplane(np.zeros((4, 4, 1), bool), None, (1.0,) * 3, (2.0,) * 2),
     "not supported"),
    (lambda: fit_to_size(np.zeros((4, 4, 1)), None, 0), "size"),
    (lambda: fit_to_size(np.zeros((4, 4, 1)), None, 8, "stretch"), "unknown mode"),
    (lambda: fit_to_size(np.zeros((4, 4, 1), np.uint16), None, 8, "fit", fill=-1), "fill"),
])
def test_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
