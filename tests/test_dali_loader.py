"""The DALI loader (CPU pipelines): same images as the WebDataset path, rank split, views."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.dali_index import write_dali_index
from data_prep.manifest import Manifest
from data_prep.normalize import NormParams
from data_prep.shard_reader import iterate_shards, shard_paths
from data_prep.shards import SHARD_PATTERN, write_shard
from data_prep.slices import SliceRecord
from pretrain.augment import augment_view
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
