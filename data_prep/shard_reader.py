"""Reading prepared shards: decoded, normalised slices for pretraining loaders."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from data_prep.manifest import Manifest
from data_prep.normalize import apply_norm


@dataclass
class DecodedSlice:
    key: str
    image: np.ndarray  # (H, W) or (C, H, W) float32, normalised
    raw: np.ndarray  # as stored, source dtype
    mask: np.ndarray | None
    meta: dict[str, Any]


def decode_npy(data: bytes, what: str) -> np.ndarray:
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
    manifest = Manifest.read(prepared_dir)
    return [str(Path(prepared_dir) / "shards" / s["name"]) for s in manifest.shards]


def iterate_shards(paths: list[str]) -> wds.WebDataset:
    """All samples of ``paths`` in order, decoded: for verification and tests."""
    return wds.WebDataset(paths, shardshuffle=False, empty_check=False).map(decode_sample)


def image_stream(
    paths: list[str], *, seed: int, shuffle_buffer: int = 1000, split_by_node: bool = True
) -> wds.WebDataset:
    """An endless-per-epoch stream of normalised float32 images (C, H, W).

    Shards are shuffled each epoch and split across ranks and DataLoader workers, so
    workers only read and decode; augmentation runs batched on the training device.
    """
    dataset = wds.WebDataset(
        paths,
        shardshuffle=len(paths),
        seed=seed,
        nodesplitter=wds.split_by_node if split_by_node else wds.single_node_only,
        workersplitter=wds.split_by_worker,
        empty_check=False,
    )
    if shuffle_buffer > 1:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed)
    return dataset.map(lambda s: _with_channel_axis(decode_sample(s).image))


def _with_channel_axis(image: np.ndarray) -> np.ndarray:
    return image[None] if image.ndim == 2 else image
