"""The WebDataset-shard loader: exact epoch split across nodes, ranks and workers, shard
shuffling, resampling, and resuming an epoch without reading what was consumed."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.distributed import DistInfo
from data_prep.manifest import Manifest
from data_prep.shard_reader import IndexedShards, RangedRead, iterate_shards, shard_paths
from pretrain.batching import plan_batches
from pretrain.data import Stretch, build_loader, pretrain_epoch_samples
from pretrain.epoch_loader import open_epoch
from pretrain.epoch_plan import epoch_order, unread_positions
from tests.conftest import small_pretrain_config


def digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image, dtype=np.float32).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def sample_of(prepared: Path) -> dict[str, int]:
    """Image digest -> sample number; the phantom's slices are all distinct."""
    images = [s.image for s in iterate_shards(shard_paths(prepared))]
    table = {digest(i[None] if i.ndim == 2 else i): n for n, i in enumerate(images)}
    assert len(table) == len(images)
    return table


def delivered(prepared: Path, sample_of: dict[str, int], stretch: Stretch, rank: int,
              **kwargs: object) -> list[list[int]]:
    """Sample numbers of each batch rank ``rank`` receives."""
    batches = build_loader(str(prepared), seed=3, epoch=kwargs.pop("epoch", 0), rank=rank,
                           stretch=stretch, **kwargs)
    out = []
    for batch in batches:
        assert batch.dtype == torch.float32 and batch.shape[0] == stretch.micro_batch
        out.append([sample_of[digest(image.numpy())] for image in batch])
    return out


def test_indexed_reads_equal_the_streamed_shards(prepared: Path) -> None:
    shards = IndexedShards(prepared)
    streamed = [s.image for s in iterate_shards(shard_paths(prepared))]
    assert len(shards) == len(streamed) == Manifest.read(prepared).counts["pretrain_slices"]
    ids = np.random.default_rng(0).permutation(len(shards))[:100]
    for image, number in zip(shards.read(np.r_[ids, ids[:3]]), np.r_[ids, ids[:3]]):
        assert image.dtype == np.float32
        np.testing.assert_array_equal(image[0], streamed[number])


@pytest.mark.parametrize(("nodes", "ranks_per_node", "workers"),
                         [(1, 1, 0), (1, 2, 2), (2, 2, 2), (3, 1, 1)])
def test_an_epoch_is_split_without_duplicates_or_gaps(
        prepared: Path, sample_of: dict[str, int], nodes: int, ranks_per_node: int,
        workers: int) -> None:
    world, micro = nodes * ranks_per_node, 8
    total = len(sample_of)
    batches = total // (world * micro)
    stretch = Stretch(world_size=world, micro_batch=micro, workers=workers, block=32,
                      batches=batches)
    per_rank = [delivered(prepared, sample_of, stretch, rank) for rank in range(world)]
    assert all(len(b) == batches for b in per_rank)  # every rank steps the same number
    seen = [n for rank in per_rank for batch in rank for n in batch]
    assert len(seen) == len(set(seen)) == batches * world * micro
    assert total - len(seen) < world * micro  # only a tail shorter than a global batch


def test_shards_are_reshuffled_every_epoch_and_seeded(prepared: Path,
                                                      sample_of: dict[str, int]) -> None:
    stretch = Stretch(world_size=1, micro_batch=8, workers=1, block=16, batches=30)
    epoch0 = delivered(prepared, sample_of, stretch, 0)
    assert delivered(prepared, sample_of, stretch, 0) == epoch0
    assert delivered(prepared, sample_of, stretch, 0, epoch=1) != epoch0
    counts = IndexedShards(prepared).counts
    first_shards = {int(np.searchsorted(np.cumsum(counts), epoch_order(
        counts, seed=3, epoch=e, length=int(counts.sum()), resampled=False)[0], "right"))
        for e in range(12)}
    assert len(first_shards) > 1  # the shard order changes between epochs
    # within a 16-sample block the samples are permuted, not in stored order
    flat = [n for batch in epoch0 for n in batch]
    assert any(np.diff(flat[i:i + 16]).min() < 0 for i in range(0, len(flat), 16))


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stretch_continues_with_the_same_batches(
        prepared: Path, sample_of: dict[str, int], workers: int) -> None:
    stretch = Stretch(world_size=2, micro_batch=8, workers=workers, block=24, batches=15)
    full = delivered(prepared, sample_of, stretch, 1)
    for done in (1, 4, 7):
        assert delivered(prepared, sample_of, replace(stretch, done=done), 1) == full[done:]


def test_resume_reads_none_of_the_consumed_samples(prepared: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    real_plan = IndexedShards.plan

    def counting_plan(self: IndexedShards, ids: np.ndarray) -> list[RangedRead]:
        reads.append(len(ids))
        return real_plan(self, ids)

    monkeypatch.setattr(IndexedShards, "plan", counting_plan)
    stretch = Stretch(world_size=1, micro_batch=8, workers=0, block=20, batches=30, done=17)
    assert len(list(build_loader(str(prepared), seed=0, epoch=0, rank=0,
                                 stretch=stretch))) == 13
    assert sum(reads) == 13 * 8


def test_elastic_restart_reads_exactly_the_unread_samples(
        prepared: Path, sample_of: dict[str, int]) -> None:
    """Two ranks consume 5 batches each, then the epoch goes on with three ranks."""
    before = Stretch(world_size=2, micro_batch=8, workers=2, block=32, batches=17, done=5)
    consumed = [n for rank in range(2)
                for batch in delivered(prepared, sample_of, replace(before, done=0), rank)[:5]
                for n in batch]
    unread = len(unread_positions(len(sample_of), [before], seed=3, epoch=0))
    assert unread == len(sample_of) - 80
    after = Stretch(world_size=3, micro_batch=6, workers=1, block=32,
                    batches=unread // 18)
    rest = [n for rank in range(3)
            for batch in delivered(prepared, sample_of, after, rank, history=[before])
            for n in batch]
    seen = consumed + rest
    assert len(seen) == len(set(seen))
    assert len(sample_of) - len(seen) < 18


def test_resampled_epochs_have_a_fixed_length(prepared: Path,
                                              sample_of: dict[str, int]) -> None:
    length = 2 * len(sample_of) + 10  # longer than the dataset: shards are drawn again
    with pytest.raises(ValueError, match=r"data\.resampled"):
        pretrain_epoch_samples(str(prepared), length)
    assert pretrain_epoch_samples(str(prepared), length, resampled=True) == length
    stretch = Stretch(world_size=2, micro_batch=8, workers=2, block=16,
                      batches=length // 16)
    ranks = [delivered(prepared, sample_of, stretch, rank, epoch_samples=length,
                       resampled=True) for rank in range(2)]
    assert [len(r) for r in ranks] == [length // 16] * 2
    seen = [n for rank in ranks for batch in rank for n in batch]
    assert len(set(seen)) < len(seen)  # drawn with replacement
    counts = IndexedShards(prepared).counts
    order = epoch_order(counts, seed=3, epoch=0, length=length, resampled=True)
    assert sorted(seen) == sorted(order[:len(seen)].tolist())
    again = epoch_order(counts, seed=3, epoch=1, length=length, resampled=True)
    assert not np.array_equal(order, again)


def test_damaged_index_files_are_named(prepared: Path, tmp_path: Path) -> None:
    copy = tmp_path / "data"
    shutil.copytree(prepared, copy)
    index = sorted((copy / "shards").glob("*.idx"))[1]
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines[:-1]) + "\n")
    stretch = Stretch(world_size=1, micro_batch=8, workers=0, block=0, batches=30)
    with pytest.raises(ValueError, match=rf"{index.name}: expected a v1.2 index of"):
        list(build_loader(str(copy), seed=0, epoch=0, rank=0, stretch=stretch))
    index.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{index.name}: cannot read the index"):
        list(build_loader(str(copy), seed=0, epoch=0, rank=0, stretch=stretch))


def test_a_stretch_longer_than_the_unread_epoch_is_refused(prepared: Path) -> None:
    stretch = Stretch(world_size=2, micro_batch=8, workers=0, block=0, batches=18)
    with pytest.raises(ValueError, match="needs 288 samples but only 286"):
        build_loader(str(prepared), seed=0, epoch=0, rank=0, stretch=stretch)


def test_engine_resume_continues_its_stretch_or_starts_a_new_one(prepared: Path,
                                                                  tmp_path: Path) -> None:
    config = small_pretrain_config(prepared, tmp_path / "run")
    config.data.epoch_samples, config.data.workers = 0, 0
    cpu = torch.device("cpu")
    two = plan_batches(config, 2, len(IndexedShards(prepared)))  # 17 steps of 2 x 8
    fresh = open_epoch(config, two, DistInfo(1, 2, 1, cpu), epoch=0, first=0, saved=[])
    saved = fresh.stretches_at(5)
    assert [(s["world_size"], s["batches"], s["done"]) for s in saved] == [(2, 17, 5)]
    assert fresh.stretches_at(0) == []  # an epoch's end records nothing

    # Restarted with the same world: the stretch goes on where it stopped.
    same = open_epoch(config, two, DistInfo(1, 2, 1, cpu), epoch=0, first=5, saved=saved)
    assert same.history == [] and same.stretch == Stretch(**saved[0])
    assert same.stretches_at(7)[0]["done"] == 7
    assert len(list(same.batches)) == 12

    # Restarted alone: a new stretch over what the two ranks left unread.
    one = plan_batches(config, 1, len(IndexedShards(prepared)))
    first = one.resume_point(5 * two.global_batch)
    alone = open_epoch(config, one, DistInfo(0, 1, 0, cpu), epoch=0, first=first, saved=saved)
    assert alone.history == [Stretch(**saved[0])]
    assert [(s["world_size"], s["batches"], s["done"]) for s in alone.stretches_at(6)] == \
        [(2, 17, 5), (1, 12, 1)]
    assert len(list(alone.batches)) == 12
