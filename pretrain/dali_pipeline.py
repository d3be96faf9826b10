"""The DALI pipeline of the pretraining data path: read shards, decode, normalise, augment.

Images are stored as ``.npy`` in their source dtype with the normalisation in
``meta.json`` (see :mod:`data_prep.normalize`). DALI decodes the ``.npy`` natively
(``fn.decoders.numpy``, straight to float32 as ``raw.astype(float32)`` does); the four
normalisation numbers are pulled out of each sample's JSON by a small Python function,
the one step DALI has no operator for. Clipping, offset and scale then run as DALI
arithmetic (on the GPU in GPU pipelines), in float32 exactly like
:func:`data_prep.normalize.apply_norm`.
"""

from __future__ import annotations

import json

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import Pipeline

from data_prep.normalize import NormParams
from pretrain.config import ViewConfig
from pretrain.dali_augment import augment_view


def norm_rows(metas: list[np.ndarray], sources: list[np.ndarray]) -> list[np.ndarray]:
    """Each sample's ``meta.json`` normalisation as float32 ``[offset, scale, low, high]``
    (missing bounds -inf/inf); ``sources`` are DALI's ``<tar>:<offset>:<member>`` strings."""
    rows = []
    for meta, source in zip(metas, sources):
        try:
            params = NormParams.from_values(json.loads(meta.tobytes())["norm"])
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            where = source.tobytes().decode(errors="replace")
            raise ValueError(f"{where}: no usable 'norm' entry ({exc!r})") from None
        rows.append(np.array(params.as_array(), dtype=np.float32))
    return rows


def read_samples(paths: list[str], index_paths: list[str], *, shard_id: int, num_shards: int,
                 shuffle_buffer: int) -> tuple[DataNode, DataNode]:
    """Encoded ``image.npy`` and ``meta.json`` of this rank's part of the shards (paths or
    ``s3://`` URLs, which DALI reads itself)."""
    # lazy_init: the reader opens its files (for URLs: HEAD and GET requests) in the first
    # run, on DALI's threads, instead of in build(), which holds the GIL throughout and
    # would stall every other Python thread of the process (an in-process S3 server too).
    outputs = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=["image.npy", "meta.json"],
        missing_component_behavior="error", shard_id=shard_id, num_shards=num_shards,
        random_shuffle=shuffle_buffer > 1, initial_fill=max(shuffle_buffer, 1),
        lazy_init=True)
    if outputs is None or isinstance(outputs, DataNode) or len(outputs) != 2:
        raise RuntimeError(f"DALI's webdataset reader returned {outputs!r}, "
                           "not one output per extension (image.npy, meta.json)")
    image, meta = outputs
    return image, meta


def decode(image: DataNode, *, image_ndim: int, channels_last: bool) -> DataNode:
    """Raw images as float32 on the CPU, CHW (HWC for the augmentation ops); 2-D images get
    a channel axis. ``image_ndim`` is the stored images' (2 or 3) and fixes the layout ops."""
    images = fn.decoders.numpy(image, dtype=types.DALIDataType.FLOAT)
    if image_ndim == 2:
        return fn.reinterpret(fn.expand_dims(images, axes=[2 if channels_last else 0]),
                              layout="HWC" if channels_last else "CHW")
    if channels_last:
        return fn.transpose(images, perm=[1, 2, 0], output_layout="HWC")
    return fn.reinterpret(images, layout="CHW")


def normalise(images: DataNode, meta: DataNode, *, gpu: bool) -> DataNode:
    """``(clip(raw, low, high) - offset) / scale`` per sample, as ``apply_norm`` computes it."""
    norm = fn.python_function(meta, fn.get_property(meta, key="source_info"),
                              function=norm_rows, batch_processing=True)
    if gpu:
        images = images.gpu()  # the tiny norm rows follow on their own
    return (dmath.clamp(images, norm[2], norm[3]) - norm[0]) / norm[1]


def build_pipeline(paths: list[str], index_paths: list[str], *, batch_size: int, shard_id: int,
                   num_shards: int, shuffle_buffer: int, seed: int, device_id: int | None,
                   threads: int, image_ndim: int,
                   views: tuple[ViewConfig, ViewConfig] | None, crop_size: int) -> Pipeline:
    """Outputs ``(images,)`` (B, C, H, W) without views, else ``(view1, view2)``
    (B, C, crop_size, crop_size); GPU ops when ``device_id`` is set."""
    pipe = Pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed)
    with pipe:
        image, meta = read_samples(paths, index_paths, shard_id=shard_id, num_shards=num_shards,
                                   shuffle_buffer=shuffle_buffer)
        images = decode(image, image_ndim=image_ndim, channels_last=views is not None)
        gpu = device_id is not None
        if views is None:
            pipe.set_outputs(normalise(images, meta, gpu=gpu))
        else:
            # Sizes from the CPU tensor: the crop matrices are argument inputs, which DALI
            # takes from the CPU only.
            shape = images.shape(dtype=types.DALIDataType.FLOAT)
            images = normalise(images, meta, gpu=gpu)
            pipe.set_outputs(*(augment_view(images, shape[0], shape[1], view, crop_size)
                               for view in views))
    return pipe
