"""Reading prepared shards: decoded, normalised slices, streamed or by sample number.

:func:`iterate_shards` streams whole shards in stored order (verification, tests).
:class:`IndexedShards` reads any samples by their global number through the index file
``prepare`` writes next to each tar (the one DALI reads), seeking straight to their bytes:
the pretraining loader uses it to split an epoch exactly across ranks and workers and to
resume mid-epoch without reading what it skips.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from cluster.storage import is_url, join, name_of
from cluster.storage.objects import read_range, read_text
from data_prep.dali_index import INDEX_SUFFIX
from data_prep.manifest import Manifest
from data_prep.normalize import apply_norm
from data_prep.shard_cache import ShardCache, ShardEntry


@dataclass
class DecodedSlice:
    key: str
    image: np.ndarray  # (H, W) or (C, H, W) float32, normalised
    raw: np.ndarray  # as stored, source dtype
    mask: np.ndarray | None
    meta: dict[str, Any]


def decode_npy(data: bytes | memoryview, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"sample {what}: cannot decode .npy ({exc})") from None


def decode_sample(sample: dict[str, Any]) -> DecodedSlice:
    """Decode one raw WebDataset sample (bytes per extension) into arrays."""
    key = sample["__key__"]
    source = f"{sample.get('__url__', '?')}:{key}"
    for required in ("image.npy", "meta.json"):
        if required not in sample:
            raise ValueError(f"sample {source}: missing {required}")
    meta = json.loads(sample["meta.json"])
    raw = decode_npy(sample["image.npy"], f"{source}/image.npy")
    mask = decode_npy(sample["mask.npy"], f"{source}/mask.npy") if "mask.npy" in sample else None
    return DecodedSlice(key=key, image=apply_norm(raw, meta["norm"]), raw=raw, mask=mask,
                        meta=meta)


def shard_paths(prepared_dir: str | Path) -> list[str]:
    """Every shard's path (or URL, for a dataset in an object store), in manifest order."""
    manifest = Manifest.read(prepared_dir)
    return [join(prepared_dir, "shards", s["name"]) for s in manifest.shards]


def iterate_shards(paths: list[str]) -> wds.WebDataset:
    """All samples of ``paths`` in order, decoded: for verification and tests."""
    return wds.WebDataset(paths, shardshuffle=False, empty_check=False).map(decode_sample)


def decode_image(image_npy: bytes | memoryview, meta_json: bytes,
                 where: str) -> np.ndarray:
    """A stored image normalised to float32, with a leading channel axis: (C, H, W)."""
    try:
        norm = json.loads(meta_json)["norm"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"sample {where}: meta.json has no readable norm ({exc})") from None
    image = apply_norm(decode_npy(image_npy, f"{where}/image.npy"), norm)
    return image[None] if image.ndim == 2 else image


# Columns of a shard's table: byte offset and size of image.npy and of meta.json.
_IMAGE_OFFSET, _IMAGE_SIZE, _META_OFFSET, _META_SIZE = range(4)
_RUN_SAMPLES = 256  # samples per read call at most (a 512 px int16 slice is 0.5 MiB)


@dataclass(frozen=True)
class RangedRead:
    """Samples of one shard with no gap between them: one read of bytes [begin, end)
    (one ranged GET on an object store)."""

    shard: int
    local: np.ndarray  # sample numbers within the shard, ascending (repeats allowed)
    slots: np.ndarray  # where each sample goes in the caller's output
    begin: int
    end: int


def index_location(shard: str) -> str:
    """``.../pretrain-NNNNNN.tar`` -> ``.../pretrain-NNNNNN.idx``, for a path or a URL."""
    return shard[:-len(".tar")] + INDEX_SUFFIX if shard.endswith(".tar") else \
        shard + INDEX_SUFFIX


class IndexedShards:
    """A prepared dataset's pretraining samples, numbered 0..N-1 in manifest shard order.

    Sample ``i`` lives in shard ``s`` where ``starts[s] <= i < starts[s + 1]``. Index files
    are parsed on first use of their shard, so a loader worker only parses what it reads.
    The dataset may be a local folder or an ``s3://`` URL; with a :class:`ShardCache`,
    remote shards are copied to local disk once and read from there.
    """

    def __init__(self, prepared_dir: str | Path, cache: ShardCache | None = None) -> None:
        manifest = Manifest.read(prepared_dir)
        self.locations = [join(prepared_dir, "shards", s["name"]) for s in manifest.shards]
        self.remote = is_url(prepared_dir)
        self.entries = [ShardEntry(url, int(s["bytes"]), str(s["sha256"]))
                        for url, s in zip(self.locations, manifest.shards)]
        self.counts = np.array([int(s["samples"]) for s in manifest.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.cache = cache if self.remote else None
        self._tables: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def table(self, shard: int) -> np.ndarray:
        """(samples, 4) int64: image.npy and meta.json offset/size of each sample."""
        if shard not in self._tables:
            self._tables[shard] = _parse_index(self.locations[shard], int(self.counts[shard]))
        return self._tables[shard]

    def load_tables(self, shards: Iterable[int], parallel: int = 8) -> None:
        """Parse the index files of ``shards`` now, ``parallel`` at a time: on an object
        store each costs a round trip that a loader worker would otherwise wait out
        inline when it first meets the shard (tables parsed before DataLoader workers
        fork are theirs too)."""
        todo = sorted({int(s) for s in shards} - set(self._tables))
        if len(todo) > 1 and parallel > 1:
            with ThreadPoolExecutor(min(parallel, len(todo))) as pool:
                tables = pool.map(lambda s: _parse_index(self.locations[s],
                                                         int(self.counts[s])), todo)
                self._tables.update(zip(todo, tables))
        for shard in todo:
            self.table(shard)

    def stored_image(self, number: int) -> np.ndarray:
        """Sample ``number``'s image as stored (source dtype and shape, not normalised)."""
        shard = int(np.searchsorted(self.starts, number, side="right")) - 1
        offset, size = self.table(shard)[number - self.starts[shard], :_IMAGE_SIZE + 1]
        data = read_range(self.locations[shard], int(offset), int(offset + size))
        return decode_npy(data, f"{self.locations[shard]}#{number}")

    def read(self, ids: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """The decoded images of samples ``ids``, in that order (one read at a time; the
        pretraining loader overlaps them with :func:`data_prep.read_ahead.read_ahead`)."""
        images: list[np.ndarray | None] = [None] * len(ids)
        for request in self.plan(ids):
            for slot, image in zip(request.slots, self.decode(request, self.fetch(request))):
                images[slot] = image
        return images  # type: ignore[return-value]

    def plan(self, ids: Sequence[int] | np.ndarray) -> list[RangedRead]:
        """The reads that fetch samples ``ids``: in file order, consecutive samples in one
        read, so a block of a shuffled epoch costs a few sequential reads however it was
        permuted."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"sample numbers must lie in [0, {len(self)})")
        by_file = np.argsort(ids, kind="stable")
        requests = []
        for shard, local, slots in _runs(ids[by_file], by_file, self.starts):
            rows = self.table(shard)[local]
            begin = int(min(rows[:, _IMAGE_OFFSET].min(), rows[:, _META_OFFSET].min()))
            end = int(max((rows[:, _IMAGE_OFFSET] + rows[:, _IMAGE_SIZE]).max(),
                          (rows[:, _META_OFFSET] + rows[:, _META_SIZE]).max()))
            requests.append(RangedRead(shard, local, slots, begin, end))
        return requests

    def fetch(self, request: RangedRead) -> bytes:
        """The bytes of one read: from the local cache when it holds the shard."""
        location = self.locations[request.shard]
        if self.cache is not None:
            copy = self.cache.lookup(self.entries[request.shard])
            if copy is not None:
                with contextlib.suppress(FileNotFoundError):  # evicted meanwhile
                    return read_range(copy, request.begin, request.end)
        return read_range(location, request.begin, request.end)  # short: truncated shard

    def decode(self, request: RangedRead, data: bytes) -> list[np.ndarray]:
        """Decode the samples of ``request`` from its bytes, in the request's order."""
        view, begin = memoryview(data), request.begin
        location = self.locations[request.shard]
        images = []
        for number, row in zip(request.local, self.table(request.shard)[request.local]):
            image_at, meta_at = row[_IMAGE_OFFSET] - begin, row[_META_OFFSET] - begin
            images.append(decode_image(view[image_at:image_at + row[_IMAGE_SIZE]],
                                       bytes(view[meta_at:meta_at + row[_META_SIZE]]),
                                       f"{location}#{number}"))
        return images


def _runs(sorted_ids: np.ndarray, slots: np.ndarray,
          starts: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Split sorted sample numbers into (shard, local numbers, output slots) runs that one
    bounded read covers: same shard, no gap between neighbours."""
    if not len(sorted_ids):
        return
    shards = np.searchsorted(starts, sorted_ids, side="right") - 1
    local = sorted_ids - starts[shards]
    breaks = np.flatnonzero((np.diff(shards) != 0) | (np.diff(local) > 1)) + 1
    for begin, end in zip(np.r_[0, breaks], np.r_[breaks, len(sorted_ids)]):
        # a run of many samples is read in pieces, so no single read grows unbounded
        for piece in range(begin, end, _RUN_SAMPLES):
            stop = min(end, piece + _RUN_SAMPLES)
            yield int(shards[piece]), local[piece:stop], slots[piece:stop]


def _parse_index(shard: str, expected: int) -> np.ndarray:
    """A shard's index file as a table; errors name the file and what is wrong."""
    index = index_location(shard)
    name = name_of(shard)
    try:
        lines = read_text(index).splitlines()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{index}: cannot read the index of {name} ({exc}); "
                                "prepare the dataset again, or write it with "
                                "data_prep.dali_index.write_dali_indices") from None
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != "v1.2" or header[1] != str(expected) or \
            len(lines) != expected + 1:
        raise ValueError(f"{index}: expected a v1.2 index of {expected} samples (the "
                         f"manifest's count for {name}), found header {header} and "
                         f"{len(lines) - 1} sample lines")
    table = np.empty((expected, 4), dtype=np.int64)
    for number, line in enumerate(lines[1:]):
        fields = line.split()
        members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2]))
                   for i in range(0, len(fields) - 3, 4)}
        if "image.npy" not in members or "meta.json" not in members:
            raise ValueError(f"{index}: sample {number} lacks image.npy or meta.json")
        table[number] = (*members["image.npy"], *members["meta.json"])
    return table
