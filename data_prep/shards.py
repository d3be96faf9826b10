"""WebDataset shards for pretraining: planned in patient order, written in parallel.

Each sample holds ``image.npy`` (source dtype), ``mask.npy`` when labeled and
``meta.json`` (patient, volume, slice, frame, spacing, normalisation, split). Keys have
no dots, so every WebDataset reader (and DALI's) splits key and extension the same way.
Shard boundaries are planned from the staged units before anything is written, so each
shard can be written by its own process and the result never depends on the worker
count. Tars are written with :mod:`tarfile` (plain POSIX tars, fixed member times and
owners, so the same input gives byte-identical shards).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.atomic import atomic_path, atomic_write_text
from data_prep.checksums import sha256_file
from data_prep.dali_index import default_index_path, format_index, read_samples
from data_prep.slices import SliceRecord
from data_prep.staging import Piece

SHARD_PATTERN = "pretrain-%06d.tar"
_SAMPLE_OVERHEAD = 4 * tarfile.BLOCKSIZE + 512  # tar headers and padding, .npy headers, meta


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_sample(record: SliceRecord) -> list[tuple[str, bytes]]:
    """(member name, bytes) of one sample, in the order WebDataset writers use."""
    if "." in record.key:
        raise ValueError(f"sample key {record.key!r} must not contain dots")
    members = {"image.npy": encode_npy(record.image),
               "meta.json": json.dumps(record.meta()).encode()}
    if record.mask is not None:
        members["mask.npy"] = encode_npy(record.mask)
    return [(f"{record.key}.{ext}", data) for ext, data in sorted(members.items())]


def plan_shards(sample_bytes: Iterable[int], max_bytes: int, max_samples: int) -> list[int]:
    """Samples per shard, in order: a shard closes before it would pass either bound."""
    sizes: list[int] = []
    count = total = 0
    for size in sample_bytes:
        size += _SAMPLE_OVERHEAD
        if count and (count == max_samples or total + size > max_bytes):
            sizes.append(count)
            count = total = 0
        count, total = count + 1, total + size
    if count:
        sizes.append(count)
    return sizes


def write_shard(path: Path, records: Iterable[SliceRecord]) -> ShardInfo:
    """Write one shard atomically, then its DALI index; one header scan checks the tar,
    counts its samples and gives the index."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for record in records:
            for name, data in encode_sample(record):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                info.uname = info.gname = "medssl"
                tar.addfile(info, io.BytesIO(data))
    samples = read_samples(path)
    atomic_write_text(default_index_path(path), format_index(samples))
    return ShardInfo(name=path.name, samples=len(samples), bytes=path.stat().st_size,
                     sha256=sha256_file(path))


def write_planned_shard(path: Path, pieces: list[Piece]) -> ShardInfo:
    return write_shard(path, (record for volume, start, stop in pieces
                              for record in volume.records(range(start, stop))))
