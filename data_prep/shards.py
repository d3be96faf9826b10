"""WebDataset shard writer: byte-bounded tar shards of 2D slices for pretraining.

Each sample holds ``image.npy`` (source dtype), ``mask.npy`` when labeled and
``meta.json`` (patient, volume, slice, frame, spacing, normalisation, split). Keys have
no dots, so every WebDataset reader (and DALI's) splits key and extension the same way.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from cluster.atomic import atomic_write_text
from data_prep.checksums import sha256_file
from data_prep.dali_index import SHARD_GLOB, default_index_path, format_index, read_samples
from data_prep.slices import SliceRecord

SHARD_PATTERN = "pretrain-%06d.tar"


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


def encode_sample(record: SliceRecord) -> dict[str, bytes | str]:
    if "." in record.key:
        raise ValueError(f"sample key {record.key!r} must not contain dots")
    sample: dict[str, bytes | str] = {
        "__key__": record.key,
        "image.npy": encode_npy(record.image),
        "meta.json": json.dumps(record.meta()).encode(),
    }
    if record.mask is not None:
        sample["mask.npy"] = encode_npy(record.mask)
    return sample


class ShardSetWriter:
    """Write samples into ``folder/pretrain-NNNNNN.tar`` shards of bounded size and count."""

    def __init__(self, folder: Path, max_bytes: int, max_samples: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._writer = wds.ShardWriter(
            str(folder / SHARD_PATTERN), maxsize=max_bytes, maxcount=max_samples, verbose=0,
            mtime=0,  # fixed member times: the same input gives byte-identical shards
        )

    def write(self, record: SliceRecord) -> None:
        self._writer.write(encode_sample(record))

    def close(self) -> list[ShardInfo]:
        """Finish the last shard, then index and describe every shard.

        One header scan per shard both checks the tar, counts its samples and gives the
        index DALI's ``fn.readers.webdataset`` needs.
        """
        self._writer.close()
        infos = []
        for path in sorted(self.folder.glob(SHARD_GLOB)):
            samples = read_samples(path)
            atomic_write_text(default_index_path(path), format_index(samples))
            infos.append(ShardInfo(name=path.name, samples=len(samples),
                                   bytes=path.stat().st_size, sha256=sha256_file(path)))
        return infos

