"""The pretraining loader: shards -> decoded 1-channel images, split across ranks/workers."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from data_prep.manifest import Manifest
from data_prep.shard_reader import image_stream, shard_paths


def epoch_length(data_path: str, requested: int) -> int:
    """Samples per epoch: the configured number, or the shards' slice count."""
    if requested > 0:
        return requested
    return int(Manifest.read(data_path).counts["pretrain_slices"])


def build_loader(data_path: str, *, per_rank_batch: int, workers: int, shuffle_buffer: int,
                 seed: int, rank: int, pin_memory: bool) -> DataLoader:
    """An endless DataLoader of (B, 1, H, W) float32 batches; the engine cuts epochs."""
    paths = shard_paths(data_path)
    needed = max(1, workers)
    if len(paths) < needed:
        raise ValueError(f"{data_path}: {len(paths)} shards cannot feed {needed} workers; "
                         "prepare with a larger min_shards")
    stream = image_stream(paths, seed=seed + 7919 * rank, shuffle_buffer=shuffle_buffer)
    # Each worker reshuffles and re-reads its shards forever; epochs are counted in steps.
    return DataLoader(
        stream.repeat(), batch_size=per_rank_batch, num_workers=workers, pin_memory=pin_memory,
        drop_last=True, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed + rank),
    )
