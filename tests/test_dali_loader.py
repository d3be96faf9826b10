"""The DALI loader (CPU pipelines): same images as the WebDataset path, rank split, views."""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import math
import re
import shutil
import sys
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_prep.dali_index import write_dali_index
from data_prep.manifest import Manifest
from data_prep.normalize import NormParams
from data_prep.shard_reader import iterate_shards, shard_paths
from data_prep.shards import SHARD_PATTERN, write_shard
from data_prep.slices import SliceRecord
from pretrain.augment import (
    adjust_contrast,
    adjust_gamma,
    augment_view,
    crop_flip_theta,
    crop_theta,
)
from pretrain.config import ViewConfig
from pretrain.dali_loader import DaliNotInstalledError, build_dali_loader

BATCH = 16  # does not divide the phantom's 286 slices: the epoch ends inside a batch
CROP = 32
PLAIN = ViewConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, brightness=0.0,
                   contrast=0.0)  # no randomness at all: a resize of the whole image


FULL = ViewConfig(rotation=15.0, gamma=(0.7, 1.5), blur_prob=0.5, vflip=0.5,
                  noise_std=0.1)  # every operation on


def loader(data: Path, **overrides):
    args = dict(per_rank_batch=BATCH, rank=0, world_size=1, seed=0, device="cpu",
                shuffle_buffer=0, threads=1)
    return build_dali_loader(str(data), **{**args, **overrides})


def take(batches, count: int) -> np.ndarray:
    """The first ``count`` samples of an image stream, as one (count, C, H, W) array."""
    samples = [next(batches).numpy() for _ in range(math.ceil(count / BATCH))]
    return np.concatenate(samples)[:count]


def stored_images(data: Path) -> np.ndarray:
    """Every image as the WebDataset path decodes it, in stored order, with a channel axis."""
    images = [s.image for s in iterate_shards(shard_paths(data))]
    return np.stack([i[None] if i.ndim == 2 else i for i in images])


@pytest.fixture(scope="module")
def reference(prepared: Path) -> np.ndarray:
    return stored_images(prepared)


def write_dataset(folder: Path, like: Path, records: list[SliceRecord]) -> Path:
    """A prepared dataset of ``records`` in two shards, with ``like``'s manifest otherwise."""
    (folder / "shards").mkdir(parents=True)
    half = len(records) // 2
    infos = [write_shard(folder / "shards" / (SHARD_PATTERN % i), part)
             for i, part in enumerate((records[:half], records[half:]))]
    manifest = dataclasses.replace(Manifest.read(like),
                                   shards=[dataclasses.asdict(i) for i in infos])
    manifest.write(folder)
    return folder


def record(key: str, image: np.ndarray, norm: NormParams) -> SliceRecord:
    return SliceRecord(key=key, patient="p", volume="v", frame=0, slice_index=0, image=image,
                       mask=None, spacing=(1.0, 1.0, 1.0), norm=norm, split="train")


def test_decoded_images_equal_the_webdataset_path(prepared: Path,
                                                  reference: np.ndarray) -> None:
    batches = loader(prepared)
    first = next(batches)
    assert first.shape == (BATCH, 1, 64, 64) and first.dtype == torch.float32
    images = np.concatenate([first.numpy(), take(batches, len(reference) - BATCH)])
    assert images.dtype == reference.dtype and np.array_equal(images, reference)  # bit-exact


def test_dtypes_clipping_and_channels_decode_like_the_webdataset_path(
    prepared: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    shape = (24, 20)
    gray = [
        record("u8", rng.integers(0, 256, shape).astype(np.uint8), NormParams(100.0, 50.0)),
        record("ct", rng.integers(-1024, 3000, shape).astype(np.int16),
               NormParams(40.5, 120.25, -160.0, 240.0)),  # a CT window: both bounds clip
        record("u16", rng.integers(0, 65536, shape).astype(np.uint16),
               NormParams(3e4, 1e4, None, 5e4)),
        record("f32", rng.normal(3.0, 2.0, shape).astype(np.float32),
               NormParams(3.0, 2.0, 0.5, None)),
    ]
    data = write_dataset(tmp_path / "gray", prepared, gray)
    assert np.array_equal(take(loader(data), len(gray)), stored_images(data))

    colour = [record(f"rgb{i}", rng.integers(0, 256, (3, *shape)).astype(np.uint8),
                     NormParams(127.5, 64.0)) for i in range(4)]
    data = write_dataset(tmp_path / "colour", prepared, colour)
    assert np.array_equal(take(loader(data), len(colour)), stored_images(data))
    view1, view2 = next(loader(data, views=(ViewConfig(), ViewConfig()), crop_size=CROP))
    assert view1.shape == view2.shape == (BATCH, 3, CROP, CROP)


def test_two_ranks_split_one_epoch(prepared: Path, reference: np.ndarray) -> None:
    total = len(reference)
    parts = []
    for rank in (0, 1):
        size = (rank + 1) * total // 2 - rank * total // 2  # DALI's split of the samples
        parts.append(take(loader(prepared, rank=rank, world_size=2), size))
    # Each rank reads a contiguous part: together, every sample exactly once.
    assert len(parts[0]) + len(parts[1]) == total
    assert np.array_equal(np.concatenate(parts), reference)


def test_shuffled_stream_reads_the_same_images_in_another_order(
    prepared: Path, reference: np.ndarray
) -> None:
    known = {image.tobytes() for image in reference}
    shuffled = take(loader(prepared, shuffle_buffer=64, seed=3), 4 * BATCH)
    assert all(image.tobytes() in known for image in shuffled)
    assert not np.array_equal(shuffled, reference[: len(shuffled)])


def test_views_have_the_layout_and_are_reproducible(prepared: Path) -> None:
    views = (ViewConfig(), FULL)

    def two_batches(seed: int) -> list[torch.Tensor]:
        batches = loader(prepared, views=views, crop_size=CROP, shuffle_buffer=64, seed=seed,
                         threads=2)
        return [view for _ in range(2) for view in next(batches)]

    first = two_batches(seed=5)
    for view in first:
        assert view.shape == (BATCH, 1, CROP, CROP) and view.dtype == torch.float32
        assert torch.isfinite(view).all()
        flat = view.flatten(1)
        assert torch.cdist(flat, flat).add(torch.eye(BATCH)).min() > 0  # all samples differ
    assert not torch.equal(first[0], first[1])  # the two views of a batch differ
    again = two_batches(seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = two_batches(seed=6)
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize(("crop", "hflip", "vflip"), [(32, 1.0, 0.0), (48, 0.0, 1.0)])
def test_crop_geometry_matches_the_torch_augmentation(
    prepared: Path, reference: np.ndarray, crop: int, hflip: float, vflip: float
) -> None:
    view = dataclasses.replace(PLAIN, hflip=hflip, vflip=vflip)
    dali_view, _ = next(loader(prepared, views=(view, view), crop_size=crop))
    images = torch.from_numpy(reference[:BATCH])
    torch_view = augment_view(images, view, crop, torch.Generator().manual_seed(0))
    torch.testing.assert_close(dali_view, torch_view, rtol=0, atol=1e-4)


def test_blur_and_gamma_match_the_torch_augmentation(prepared: Path,
                                                    reference: np.ndarray) -> None:
    # Fixed sigma and gamma: both paths compute the same deterministic view.
    view = dataclasses.replace(PLAIN, hflip=1.0, blur_prob=1.0, blur_sigma=(1.5, 1.5),
                               gamma=(0.8, 0.8))
    dali_view, _ = next(loader(prepared, views=(view, view), crop_size=48))
    images = torch.from_numpy(reference[:BATCH])
    torch_view = augment_view(images, view, 48, torch.Generator().manual_seed(0))
    torch.testing.assert_close(dali_view, torch_view, rtol=0, atol=1e-4)


def test_jitter_prob_gates_contrast_and_brightness_as_in_the_torch_augmentation(
        prepared: Path, reference: np.ndarray) -> None:
    # jitter_prob 0: no sample changes, whatever the ranges; 1: every sample moves.
    never = dataclasses.replace(PLAIN, contrast=0.5, brightness=0.5, jitter_prob=0.0)
    always = dataclasses.replace(never, jitter_prob=1.0)
    gated, jittered = next(loader(prepared, views=(never, always), crop_size=64))
    images = torch.from_numpy(reference[:BATCH])
    # identity warp, no intensity change (up to the rounding of mean + (x - mean) * 1)
    torch.testing.assert_close(gated, images, rtol=0, atol=1e-5)
    torch.testing.assert_close(augment_view(images, never, 64, torch.Generator()), gated,
                               rtol=0, atol=1e-5)
    change = (jittered - images).flatten(1).abs().amax(1)
    assert (change > 1e-3).all()


def test_rotated_crops_stay_inside_the_image() -> None:
    dali = pytest.importorskip("nvidia.dali")
    from pretrain.dali_augment import crop_matrix

    height, width, size, batch = 40.0, 64.0, 16, 256
    view = ViewConfig(scale=(0.08, 1.0), ratio=(0.5, 2.0), hflip=0.5, vflip=0.5, rotation=180.0)
    pipe = dali.Pipeline(batch_size=batch, num_threads=1, device_id=None, seed=1)
    with pipe:
        sides = [dali.fn.external_source(source=lambda: [np.float32(height)] * batch),
                 dali.fn.external_source(source=lambda: [np.float32(width)] * batch)]
        pipe.set_outputs(crop_matrix(*sides, view, size))
    pipe.build()
    matrices = np.stack([np.array(m) for m in pipe.run()[0]])
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]]).T
    source = matrices @ corners  # the output's corners, in source pixels
    assert source.min() >= -1e-4
    assert source[:, 0].max() <= width + 1e-4 and source[:, 1].max() <= height + 1e-4


def test_gamma_rescales_by_the_image_range(prepared: Path, reference: np.ndarray) -> None:
    view = dataclasses.replace(PLAIN, gamma=(2.0, 2.0))
    gamma_view, plain = next(loader(prepared, views=(view, PLAIN), crop_size=64))
    assert torch.equal(plain, torch.from_numpy(reference[:BATCH]))  # identity warp
    low = plain.amin(dim=(1, 2, 3), keepdim=True)
    high = plain.amax(dim=(1, 2, 3), keepdim=True)
    expected = low + (high - low) * ((plain - low) / (high - low)) ** 2
    torch.testing.assert_close(gamma_view, expected, rtol=1e-5, atol=1e-5)


def test_bad_metadata_names_the_sample(prepared: Path, tmp_path: Path) -> None:
    data = shutil.copytree(prepared / "shards", tmp_path / "data" / "shards").parent
    shutil.copy2(prepared / "manifest.json", data)
    tar = data / "shards" / Manifest.read(data).shards[0]["name"]
    with tarfile.open(tar) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive if m.isreg()]
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as archive:
        for member, payload in members:
            if member.name.endswith(".meta.json"):
                meta = json.loads(payload)
                del meta["norm"]
                payload = json.dumps(meta).encode()
                member.size = len(payload)
            archive.addfile(member, io.BytesIO(payload))
    write_dali_index(tar)
    with pytest.raises(RuntimeError, match=rf"{re.escape(str(tar))}:\d+:\S+meta\.json: "
                                           r"no usable 'norm' entry"):
        next(loader(data))


def test_missing_index_file_is_named(prepared: Path, tmp_path: Path) -> None:
    data = shutil.copytree(prepared / "shards", tmp_path / "data" / "shards").parent
    shutil.copy2(prepared / "manifest.json", data)
    index = sorted((data / "shards").glob("*.idx"))[-1]
    index.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(index))):
        loader(data)


def test_missing_dali_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali now fails
    with pytest.raises(DaliNotInstalledError, match=r"pip install -e '\.\[dali\]'") as error:
        loader(tmp_path)
    assert isinstance(error.value, ImportError)


def test_pretraining_runs_on_the_dali_loader(prepared: Path, tmp_path: Path) -> None:
    """``data.loader=dali`` through the engine: DALI's batches arrive as view pairs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.engine import pretrain
    from tests.conftest import small_pretrain_config

    config = small_pretrain_config(prepared, tmp_path / "run")
    config.data.loader, config.optim.epochs = "dali", 1
    result = pretrain(config)
    assert result.steps == 3 and math.isfinite(result.final_loss)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    (pairs,) = events.Images("views/pairs")
    assert (pairs.width, pairs.height) == (CROP * 8, CROP * 2)  # 16 views in a 8x2 grid


# ---- Each augmentation operation, DALI path (pretrain.dali_augment) against the torch path
# (pretrain.augment), with fixed parameters: degenerate ranges where the config allows them,
# else the deterministic building blocks fed the same per-sample numbers in both paths.


@pytest.fixture(scope="module")
def dali_aug() -> ModuleType:
    pytest.importorskip("nvidia.dali")
    return importlib.import_module("pretrain.dali_augment")


def constant(batch: list[Any]) -> Callable[[], list[Any]]:
    """An ``external_source`` callback without parameters (one would receive DALI's
    iteration number), giving ``batch`` every time."""
    return lambda: batch


def run_dali(graph: Callable[..., Any], images: np.ndarray, *per_sample: Sequence[float],
             seed: int = 1) -> torch.Tensor:
    """``graph(images, *per_sample)`` in a CPU pipeline (``device_id=None``, as the loader
    builds here): ``images`` (B, C, H, W) enter as HWC, each ``per_sample`` sequence as one
    float32 scalar per sample; the output comes back (B, C, h, w)."""
    dali = pytest.importorskip("nvidia.dali")
    hwc = [np.ascontiguousarray(image.transpose(1, 2, 0), dtype=np.float32) for image in images]
    pipe = dali.Pipeline(batch_size=len(images), num_threads=1, device_id=None, seed=seed)
    with pipe:
        nodes = [dali.fn.external_source(source=constant(hwc), layout="HWC")]
        nodes += [dali.fn.external_source(source=constant([np.float32(v) for v in values]))
                  for values in per_sample]
        pipe.set_outputs(graph(*nodes))
    pipe.build()
    (out,) = pipe.run()
    stacked = np.stack([np.array(sample) for sample in out])
    return torch.from_numpy(stacked.transpose(0, 3, 1, 2) if out.layout() == "HWC" else stacked)


def both_views(dali_aug: ModuleType, images: np.ndarray, view: ViewConfig, size: int,
               seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``view`` of ``images`` (B, C, H, W) by the DALI path and by the torch path."""
    from nvidia.dali import types

    def graph(x: Any) -> Any:
        shape = x.shape(dtype=types.FLOAT)
        return dali_aug.augment_view(x, shape[0], shape[1], view, size)

    torch_view = augment_view(torch.from_numpy(images), view, size,
                              torch.Generator().manual_seed(seed))
    return run_dali(graph, images, seed=seed), torch_view


def sample_images(batch: int, chans: int = 1, height: int = 40, width: int = 56) -> np.ndarray:
    """Smooth structure plus pixel noise: blur, gamma and geometry all change them visibly."""
    rng = np.random.default_rng(batch * 100 + chans)
    rows, cols = np.mgrid[0:height, 0:width] / max(height, width)
    phase = rng.uniform(0, 6, (batch, chans, 1, 1))
    return (np.sin(7 * cols + 3 * rows**2 + phase) + 0.3 * rng.normal(
        size=(batch, chans, height, width))).astype(np.float32)


def test_place_crop_warps_like_crop_theta(dali_aug: ModuleType) -> None:
    """Fixed sides, angles, placements and flips: the DALI matrix and warp resample exactly
    the pixels the torch matrix and grid_sample do, on a non-square image, rotated crops
    touching its edges included."""
    from nvidia.dali import fn, types

    images = sample_images(6, chans=2, height=40, width=64)
    size = 24
    params = {  # per sample: crop_w, crop_h, angle, shift_x, shift_y, flip_x, flip_y
        "crop_w": [1.0, 0.5, 0.7, 0.3, 0.9, 0.6],
        "crop_h": [1.0, 0.8, 0.4, 0.3, 0.5, 1.0],
        "angle": np.radians([0.0, 0.0, 30.0, -90.0, 170.0, 45.0]).tolist(),
        "shift_x": [0.0, 1.0, -1.0, 0.3, -0.5, 1.0],
        "shift_y": [0.0, -1.0, 0.5, 1.0, 0.2, -1.0],
        "flip_x": [1.0, -1.0, 1.0, -1.0, 1.0, -1.0],
        "flip_y": [1.0, 1.0, -1.0, -1.0, 1.0, 1.0],
    }

    def graph(x: Any, w: Any, h: Any, angle: Any, sx: Any, sy: Any, fx: Any, fy: Any) -> Any:
        shape = x.shape(dtype=types.FLOAT)
        matrix = dali_aug.place_crop(shape[0], shape[1], w, h, angle, sx, sy, fx, fy, size)
        return fn.warp_affine(x, matrix=matrix, size=[size, size],
                              interp_type=types.INTERP_LINEAR)

    dali_view = run_dali(graph, images, *params.values())
    batch, chans, height, width = images.shape
    theta = crop_theta(*(torch.tensor(v) for v in params.values()), aspect=height / width)
    grid = F.affine_grid(theta, [batch, chans, size, size], align_corners=False)
    torch_view = F.grid_sample(torch.from_numpy(images), grid, mode="bilinear",
                               padding_mode="border", align_corners=False)
    torch.testing.assert_close(dali_view, torch_view, rtol=0, atol=1e-4)


def coordinate_images(batch: int, height: int, width: int) -> np.ndarray:
    """(B, 2, H, W) images whose pixels hold their own x and y in ``affine_grid`` units: a
    bilinear view of them holds each output pixel's source point, i.e. the view's matrix."""
    xs, ys = (2 * np.arange(width) + 1) / width - 1, (2 * np.arange(height) + 1) / height - 1
    grid = np.stack(np.meshgrid(xs, ys))
    return np.ascontiguousarray(np.broadcast_to(grid, (batch, 2, height, width)), np.float32)


def recovered_theta(view: torch.Tensor) -> torch.Tensor:
    """The (B, 2, 3) ``affine_grid`` matrices of views of :func:`coordinate_images`."""
    size = view.shape[-1]
    dest = (2 * torch.arange(size, dtype=torch.float64) + 1) / size - 1
    rows, cols = torch.meshgrid(dest, dest, indexing="ij")
    design = torch.stack([cols.flatten(), rows.flatten(), torch.ones(size * size,
                                                                     dtype=torch.float64)], 1)
    points = view.double().flatten(2).transpose(1, 2)  # (B, size^2, 2)
    theta = (torch.linalg.pinv(design) @ points).transpose(1, 2)
    # Exactly affine: every sample point lay inside the image, so nothing was clamped.
    assert (design @ theta.transpose(1, 2) - points).abs().max() < 1e-5
    return theta


@pytest.mark.parametrize(("scale", "ratio", "hflip", "vflip", "rotation"), [
    (0.25, 1.0, 1.0, 0.0, 0.0),
    (0.3, 2.0, 0.0, 1.0, 0.0),
    (0.8, 2.0, 1.0, 1.0, 0.0),  # width sqrt(1.6) clipped to the whole image
    (0.25, 0.5, 0.0, 1.0, 30.0),
    (0.6, 0.4, 1.0, 0.0, 20.0),  # height clipped, then shrunk so the rotated crop fits
])
def test_crop_sides_flips_placement_and_rotation_are_drawn_alike(
    dali_aug: ModuleType, scale: float, ratio: float, hflip: float, vflip: float,
    rotation: float
) -> None:
    """Fixed area, aspect ratio and flips (random placement and angle): in both paths each
    sample's matrix is ``crop_theta`` of those sides and flips at its own angle, within
    +-rotation, and its centre leaves the crop inside the image."""
    height, width, batch = 48, 64, 32
    view = ViewConfig(scale=(scale, scale), ratio=(ratio, ratio), hflip=hflip, vflip=vflip,
                      rotation=rotation, brightness=0.0, contrast=0.0)
    ones = torch.ones(batch, dtype=torch.float64)
    crop_w, crop_h = min(math.sqrt(scale * ratio), 1.0), min(math.sqrt(scale / ratio), 1.0)
    flip_x, flip_y = -1.0 if hflip else 1.0, -1.0 if vflip else 1.0
    aspect = height / width
    for path in both_views(dali_aug, coordinate_images(batch, height, width), view, 16):
        theta = recovered_theta(path)
        # theta[:, :, 0] is (cos, sin / aspect) times the flipped, shrunk crop width.
        angle = torch.atan2(theta[:, 1, 0] * aspect * flip_x, theta[:, 0, 0] * flip_x)
        assert angle.abs().max() <= math.radians(rotation) + 1e-5
        # Shifts of +-1 put the crop's centre as far off the image's as it may go.
        expected = crop_theta(crop_w * ones, crop_h * ones, angle, ones, ones, flip_x * ones,
                              flip_y * ones, aspect)
        torch.testing.assert_close(theta[:, :, :2], expected[:, :, :2], rtol=0, atol=1e-5)
        room = expected[:, :, 2]
        assert (theta[:, :, 2].abs() <= room + 1e-5).all()
        drawn = room > 0.05  # placements spread over the room left (32 draws)
        assert (theta[:, :, 2][drawn].abs() > 0.5 * room[drawn]).any(dim=0).all()
        if rotation:
            assert angle.abs().max() > 0.5 * math.radians(rotation)


@pytest.mark.parametrize(("size", "sigma"), [(32, 0.5), (24, 2.0), (8, 3.0)])
def test_blur_matches_the_torch_augmentation_for_a_fixed_sigma(
    dali_aug: ModuleType, size: int, sigma: float
) -> None:
    # (8, 3.0): a kernel of radius 9, wider than the 8-pixel view; both mirror repeatedly.
    view = dataclasses.replace(PLAIN, blur_prob=1.0, blur_sigma=(sigma, sigma))
    dali_view, torch_view = both_views(dali_aug, sample_images(4, chans=2), view, size)
    plain, _ = both_views(dali_aug, sample_images(4, chans=2), PLAIN, size)
    assert (dali_view - plain).abs().amax(dim=(1, 2, 3)).min() > 1e-2  # blurred indeed
    torch.testing.assert_close(dali_view, torch_view, rtol=0, atol=1e-4)


def test_blur_prob_blurs_some_samples_and_leaves_the_others_in_both_paths(
    dali_aug: ModuleType
) -> None:
    images, size = sample_images(16), 32
    fixed = dataclasses.replace(PLAIN, blur_prob=1.0, blur_sigma=(1.5, 1.5))
    blurred, _ = both_views(dali_aug, images, fixed, size)
    plain, _ = both_views(dali_aug, images, PLAIN, size)
    for path in both_views(dali_aug, images, dataclasses.replace(fixed, blur_prob=0.5), size):
        is_blurred = (path - blurred).abs().amax(dim=(1, 2, 3)) < 1e-4
        is_plain = (path - plain).abs().amax(dim=(1, 2, 3)) < 1e-4
        assert torch.all(is_blurred ^ is_plain) and 0 < is_blurred.sum() < len(images)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_gamma_matches_the_torch_augmentation_for_a_fixed_exponent(
    dali_aug: ModuleType, gamma: float
) -> None:
    view = dataclasses.replace(PLAIN, vflip=1.0, gamma=(gamma, gamma))
    dali_view, torch_view = both_views(dali_aug, sample_images(4, chans=2), view, 24)
    torch.testing.assert_close(dali_view, torch_view, rtol=0, atol=1e-4)


def test_adjust_gamma_matches_the_torch_building_block(dali_aug: ModuleType) -> None:
    images = sample_images(4, chans=2)
    images[3] = 0.7  # constant: stays constant (no division by its zero range)
    gammas = [0.5, 0.8, 1.7, 2.0]
    dali_out = run_dali(dali_aug.adjust_gamma, images, gammas)
    torch_out = adjust_gamma(torch.from_numpy(images), torch.tensor(gammas))
    torch.testing.assert_close(dali_out, torch_out, rtol=0, atol=1e-5)
    assert torch.equal(dali_out[3], torch.from_numpy(images[3]))


def test_adjust_contrast_matches_the_torch_building_block(dali_aug: ModuleType) -> None:
    images = sample_images(4, chans=2)  # two channels: one mean over both, in both paths
    factors = [0.6, 1.0, 1.35, 1.9]
    dali_out = run_dali(dali_aug.adjust_contrast, images, factors)
    torch_out = adjust_contrast(torch.from_numpy(images), torch.tensor(factors))
    torch.testing.assert_close(dali_out, torch_out, rtol=0, atol=2e-6)
    torch.testing.assert_close(dali_out[1], torch.from_numpy(images[1]), rtol=0, atol=2e-6)


@pytest.mark.parametrize(("contrast", "brightness", "jitter_prob"), [
    (0.3, 0.2, 0.5), (0.3, 0.0, 1.0), (0.0, 0.2, 1.0)])
def test_contrast_brightness_and_their_gate_act_alike_in_both_paths(
    dali_aug: ModuleType, contrast: float, brightness: float, jitter_prob: float
) -> None:
    """Each output sample is exactly mean + (x - mean) * factor + shift of its input: the
    per-sample factor and shift, read back by regression, lie in 1 +- contrast and
    +-brightness, move together under the jitter_prob gate, and are exactly 1 and 0 for
    samples the gate leaves out."""
    images = sample_images(64, height=24, width=24)
    view = dataclasses.replace(PLAIN, contrast=contrast, brightness=brightness,
                               jitter_prob=jitter_prob)
    x = torch.from_numpy(images).flatten(1).double()
    x_dev = x - x.mean(1, keepdim=True)
    for path in both_views(dali_aug, images, view, 24):  # the whole-image crop: identity
        out = path.flatten(1).double()
        out_dev = out - out.mean(1, keepdim=True)
        factor = (x_dev * out_dev).sum(1) / (x_dev**2).sum(1)
        shift = out.mean(1) - x.mean(1)  # contrast keeps each image's mean
        assert (out_dev - factor[:, None] * x_dev).abs().max() < 1e-5
        moved = ((factor - 1).abs() > 1e-5) | (shift.abs() > 1e-5)
        assert (factor[moved] - 1).abs().max() <= contrast + 1e-5
        assert shift[moved].abs().max() <= brightness + 1e-5
        if contrast:
            assert ((factor[moved] - 1).abs() > 1e-5).all()
            assert factor.max() - factor.min() > contrast  # spread over 1 +- contrast
        if brightness:
            assert (shift[moved].abs() > 1e-5).all()
            assert shift.max() - shift.min() > brightness
        assert ((factor[~moved] - 1).abs() < 1e-5).all() and (shift[~moved].abs() < 1e-5).all()
        if jitter_prob == 1:
            assert moved.all()
        else:  # Binomial(64, 0.5): 32 +- 4, within 5 standard deviations
            assert abs(int(moved.sum()) - 32) <= 20


def test_add_noise_has_the_asked_standard_deviation(dali_aug: ModuleType) -> None:
    images = sample_images(4, height=128, width=128)  # 16384 pixels: std to about 0.6%
    sigmas = [0.0, 0.01, 0.1, 1.0]
    noise = run_dali(dali_aug.add_noise, images, sigmas) - torch.from_numpy(images)
    pixels = noise[0].numel()
    assert torch.equal(noise[0], torch.zeros_like(noise[0]))  # sigma 0: the input itself
    for sample, sigma in zip(noise[1:], sigmas[1:]):
        assert abs(sample.std().item() / sigma - 1) < 0.03
        assert abs(sample.mean().item()) < 5 * sigma / math.sqrt(pixels)


def test_noise_std_is_uniform_per_sample_in_both_paths(dali_aug: ModuleType) -> None:
    """Different generators, same law: each sample gets zero-mean Gaussian noise whose std
    (read back over its 2304 pixels to about 1.5%) is uniform in [0, noise_std]."""
    noise_std, batch = 0.2, 128
    images = sample_images(batch, height=48, width=48)
    view = dataclasses.replace(PLAIN, noise_std=noise_std)
    for path in both_views(dali_aug, images, view, 48):  # the whole-image crop: identity
        noise = (path - torch.from_numpy(images)).flatten(1).double()
        sigma = noise.std(1)
        assert (noise.mean(1).abs() <= 5 * sigma / math.sqrt(noise.shape[1]) + 1e-6).all()
        assert sigma.max() <= noise_std * 1.08
        # Kolmogorov-Smirnov distance to U(0, noise_std); 0.2 is beyond the 0.1% level.
        drawn = (sigma / noise_std).sort().values
        steps = torch.arange(batch + 1, dtype=torch.float64) / batch
        assert max((steps[1:] - drawn).max(), (drawn - steps[:-1]).max()) < 0.2


def test_settings_that_are_off_draw_and_change_nothing(dali_aug: ModuleType) -> None:
    """noise_std 0, gamma (1, 1), blur_prob 0, contrast and brightness 0: the whole-image
    crop comes out unchanged in both paths, and the torch path draws only the geometry."""
    images = sample_images(8, height=32, width=32)
    dali_view, torch_view = both_views(dali_aug, images, PLAIN, 32)
    assert torch.equal(dali_view, torch.from_numpy(images))
    torch.testing.assert_close(torch_view, torch.from_numpy(images), rtol=0, atol=1e-6)
    used, geometry_only = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    augment_view(torch.from_numpy(images), PLAIN, 32, used)
    crop_flip_theta(8, PLAIN, geometry_only, torch.device("cpu"))
    assert torch.equal(used.get_state(), geometry_only.get_state())
