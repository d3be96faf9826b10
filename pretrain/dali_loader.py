"""The DALI backend of the pretraining loader: same shards, same tensors as ``build_loader``.

DALI reads the shards through the index files ``prepare`` writes next to each tar
(:mod:`data_prep.dali_index`), decodes and normalises every image, and, given two view
configs, also augments them, on the GPU when the device is CUDA and on the CPU otherwise
(``device_id=None``). Each rank reads its own contiguous part of the samples
(``shard_id``/``num_shards``). DALI is an optional dependency: this module imports
without it and :func:`build_dali_loader` says how to install it.

A dataset at an ``s3://`` URL is read by DALI itself: it gets the shard and index URLs and
opens them with its bundled AWS SDK (endpoint ``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3``, region and credentials from the standard AWS places, read once per
process), one ranged GET per sample component, on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from cluster.storage import is_url, join, parent_of
from cluster.storage.objects import list_files
from data_prep.shard_reader import IndexedShards, index_location, shard_paths
from pretrain.config import ViewConfig

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class DaliNotInstalledError(ImportError):
    """The DALI backend was chosen but ``nvidia.dali`` cannot be imported."""


def require_dali() -> None:
    """Fail early, with the fix, when DALI (or its PyTorch plugin) cannot be imported."""
    try:
        import nvidia.dali  # the package first: its submodules may be imported already
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as exc:
        raise DaliNotInstalledError(
            "the DALI data backend needs NVIDIA DALI, which cannot be imported "
            f"({exc}); install it with `pip install -e '.[dali]'` (nvidia-dali-cuda130), "
            "or use the WebDataset loader") from exc


def index_paths(paths: list[str]) -> list[str]:
    """The DALI index file of each shard, which ``prepare`` writes next to it."""
    indices = [index_location(p) for p in paths]
    present = _present(indices)
    for tar, index in zip(paths, indices):
        if index not in present:
            raise FileNotFoundError(
                f"{index} does not exist: DALI needs an index file next to {tar}; prepare the "
                "dataset again, or write them with data_prep.dali_index.write_dali_indices")
    return indices


def _present(files: list[str]) -> set[str]:
    """Those of ``files`` that exist. On a store, one listing per folder: it also fails early,
    with medssl's retries and messages, where DALI would only say "S3 Object not found"."""
    if not files or not is_url(files[0]):
        return {f for f in files if Path(f).is_file()}
    return {join(folder, name) for folder in {parent_of(f) for f in files}
            for name in list_files(folder)}


def check_s3_endpoint(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse endpoint settings under which DALI would read another store than medssl.

    DALI sets its S3 client's endpoint from ``AWS_ENDPOINT_URL`` (``s3_client_manager.cc``),
    which thereby wins over ``AWS_ENDPOINT_URL_S3``; botocore and s3fs, which read the
    manifest and index files, prefer ``AWS_ENDPOINT_URL_S3``. Either one alone is read by
    both (DALI's AWS SDK honours ``AWS_ENDPOINT_URL_S3`` itself). Values are not printed:
    an endpoint may carry user information.
    """
    general, s3 = environ.get("AWS_ENDPOINT_URL"), environ.get("AWS_ENDPOINT_URL_S3")
    if general and s3 and general.rstrip("/") != s3.rstrip("/"):
        raise ValueError(
            "AWS_ENDPOINT_URL and AWS_ENDPOINT_URL_S3 differ: DALI's S3 reader would use "
            "AWS_ENDPOINT_URL and the rest of medssl AWS_ENDPOINT_URL_S3, two different "
            "stores; set only one of them, or both to the same endpoint")


def image_ndim(data_path: str) -> int:
    """Dimensions of the stored images (2 or 3): the pipeline's layout ops depend on it."""
    ndim = IndexedShards(data_path).stored_image(0).ndim
    if ndim not in (2, 3):
        raise ValueError(f"{data_path}: images must be (H, W) or (C, H, W), got {ndim} "
                         "dimensions")
    return ndim


def build_dali_loader(
    data_path: str, *, per_rank_batch: int, rank: int, world_size: int, seed: int,
    device: torch.device | str, shuffle_buffer: int, threads: int,
    views: tuple[ViewConfig, ViewConfig] | None = None, crop_size: int = 0,
) -> Iterator[Batch]:
    """An endless iterator of float32 batches: (B, C, H, W) normalised images, or with
    ``views`` two augmented views (B, C, crop_size, crop_size) each. ``data_path`` is a
    prepared dataset's folder or ``s3://`` URL.

    With ``shuffle_buffer > 1`` the shard order is permuted by ``seed`` (the same on every
    rank, so the ranks' parts stay disjoint) and samples pass a shuffle buffer; otherwise
    each rank reads its part in stored order. Random augmentation parameters depend only
    on ``seed`` and ``rank``: the same arguments give the same batches.
    """
    if per_rank_batch < 1 or threads < 1:
        raise ValueError(f"per_rank_batch and threads must be >= 1, got {per_rank_batch}, "
                         f"{threads}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if views is not None and crop_size < 1:
        raise ValueError(f"augmented views need crop_size >= 1, got {crop_size}")
    require_dali()
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from pretrain.dali_pipeline import build_pipeline

    paths = shard_paths(data_path)
    if is_url(data_path):
        check_s3_endpoint()
    if shuffle_buffer > 1:
        paths = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]
    indices = index_paths(paths)
    device = torch.device(device)
    device_id = None
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    pipe_seed = int(np.random.SeedSequence((seed, rank)).generate_state(1)[0] & 0x7FFFFFFF)
    pipe = build_pipeline(
        paths, indices, batch_size=per_rank_batch, shard_id=rank, num_shards=world_size,
        shuffle_buffer=shuffle_buffer, seed=pipe_seed, device_id=device_id, threads=threads,
        image_ndim=image_ndim(data_path), views=views, crop_size=crop_size)
    pipe.build()
    names = ["images"] if views is None else ["view1", "view2"]
    # No reader_name and size=-1: the iterator never ends, like build_loader's repeat().
    return _batches(DALIGenericIterator(pipe, names), names)


def _batches(iterator: Iterator[list[dict[str, torch.Tensor]]],
             names: list[str]) -> Iterator[Batch]:
    for (outputs,) in iterator:
        yield outputs[names[0]] if len(names) == 1 else (outputs[names[0]], outputs[names[1]])
