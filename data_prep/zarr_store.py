"""Zarr store of labeled slices: random access for fine-tuning, one slice per chunk.

Layout (one group per split)::

    labeled.zarr/<split>/image     (N, H, W) source dtype, chunks (1, H, W), zstd, in
                                   shards of up to 256 slices per file
    labeled.zarr/<split>/mask      (N, H, W) uint8 class ids
    labeled.zarr/<split>/norm      (N, 4)    float64 (offset, scale, low, high) per slice
    labeled.zarr/<split>/spacing   (N, 3)    float32 mm (x, y, slice)
    labeled.zarr/<split>/patient   (N,)      int32 index into attrs["patients"]
    labeled.zarr/<split>/volume    (N,)      int32 index into attrs["volumes"]
    labeled.zarr/<split>/frame     (N,)      int16
    labeled.zarr/<split>/slice     (N,)      int16
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from cluster.storage import StorageError, is_url
from cluster.storage.retry import retrying
from cluster.storage.urls import normalize
from data_prep.normalize import apply_norm
from data_prep.remote_zarr import fsspec_store
from data_prep.slices import SliceRecord

T = TypeVar("T")

_Compressors = BloscCodec | Literal["auto"]
_COMPRESSOR = BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")
# One slice per chunk keeps random access cheap; sharding packs chunks into few files
# (writing one file per slice costs milliseconds each and floods cluster file systems).
SLICES_PER_SHARD = 256


def write_split(root: zarr.Group, split: str, records: Sequence[SliceRecord]) -> int:
    """Write the labeled ``records`` of one split as a group of ``root``; return the count."""
    group = root.create_group(split)
    patients = sorted({r.patient for r in records})
    volumes = sorted({r.volume for r in records})
    group.attrs["patients"] = patients
    group.attrs["volumes"] = volumes
    if not records:
        group.attrs["count"] = 0
        return 0
    images = np.stack([r.image for r in records])
    masks = np.stack([_require_mask(r) for r in records])
    patient_index = {name: i for i, name in enumerate(patients)}
    volume_index = {name: i for i, name in enumerate(volumes)}
    columns: dict[str, tuple[np.ndarray, tuple[int, ...] | None, _Compressors]] = {
        "image": (images, (1, *images.shape[1:]), _COMPRESSOR),
        "mask": (masks, (1, *masks.shape[1:]), _COMPRESSOR),
        "norm": (np.array([r.norm.as_array() for r in records], np.float64), None,
                 "auto"),
        "spacing": (np.array([r.spacing for r in records], np.float32), None, "auto"),
        "patient": (np.array([patient_index[r.patient] for r in records], np.int32), None,
                    "auto"),
        "volume": (np.array([volume_index[r.volume] for r in records], np.int32), None,
                   "auto"),
        "frame": (np.array([r.frame for r in records], np.int16), None, "auto"),
        "slice": (np.array([r.slice_index for r in records], np.int16), None, "auto"),
    }
    for name, (data, chunks, compressors) in columns.items():
        shards = (min(SLICES_PER_SHARD, len(data)), *data.shape[1:]) if chunks else None
        group.create_array(name, data=data, chunks=chunks or data.shape, shards=shards,
                           compressors=compressors)
    group.attrs["count"] = len(records)
    return len(records)


def _require_mask(record: SliceRecord) -> np.ndarray:
    if record.mask is None:
        raise ValueError(f"slice {record.key} has no mask but was routed to the labeled store")
    return record.mask


def _str_list(value: object, where: str) -> list[str]:
    """The attribute at ``where`` as a list of names; a store that says otherwise is corrupt."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: attribute is {value!r}, not a list of names")
    return list(value)


class LabeledSlices:
    """Random access to one split of a labeled store: normalised images and masks.

    ``location`` is a local path or an ``s3://`` URL; on an object store every read is
    retried whole on transient failures (:mod:`cluster.storage.retry`).
    """

    def __init__(self, location: str | Path, split: str) -> None:
        self.location = normalize(location)
        self.remote = is_url(self.location)
        try:
            root = self.read(self._open_root, "open")
        except StorageError:
            raise
        except Exception as exc:
            raise FileNotFoundError(
                f"{self.location}: not a readable zarr store ({exc})") from None
        group = self.read(lambda: root.get(split), f"open of split {split!r}")
        if group is None:
            raise KeyError(f"{self.location}: no split {split!r} "
                           f"(has {sorted(name for name, _ in root.groups())})")
        if not isinstance(group, zarr.Group):
            raise ValueError(f"{self.location}: {split!r} is an array, not a split group")
        self.split = split
        self.group = group
        self._columns: dict[str, zarr.Array] = {}
        self.patients: list[str] = _str_list(
            self.group.attrs["patients"], f"{self.location}/{split} patients")
        self.volumes: list[str] = _str_list(
            self.group.attrs["volumes"], f"{self.location}/{split} volumes")
        count = self.group.attrs["count"]
        if not isinstance(count, int):
            raise ValueError(f"{self.location}/{split}: attribute 'count' is {count!r}, "
                             "not an integer")
        self._count = count

    def _open_root(self) -> zarr.Group:
        store = fsspec_store(self.location) if self.remote else self.location
        return zarr.open_group(store, mode="r")

    def read(self, call: Callable[[], T], what: str) -> T:
        """``call()``, a read of this store: on an object store retried on transient
        failures, errors naming the store's URL."""
        return retrying(call, self.location, what) if self.remote else call()

    def __len__(self) -> int:
        return self._count

    @cached_property
    def norm(self) -> np.ndarray:
        return self._values("norm")

    @cached_property
    def patient_index(self) -> np.ndarray:
        return self._values("patient")

    @cached_property
    def frames(self) -> np.ndarray:
        return self._values("frame")

    @cached_property
    def slices(self) -> np.ndarray:
        return self._values("slice")

    @cached_property
    def spacing(self) -> np.ndarray:
        return self._values("spacing")

    def patient_of(self, index: int) -> str:
        return self.patients[int(self.patient_index[index])]

    @cached_property
    def volume_index(self) -> np.ndarray:
        return self._values("volume")

    def volume_of(self, index: int) -> str:
        return self.volumes[int(self.volume_index[index])]

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored image (source dtype) and mask of slice ``index``."""
        return self.read(lambda: (np.asarray(self.column("image")[index]),
                                  np.asarray(self.column("mask")[index])),
                         f"read of {self.split} slice {index}")

    def _values(self, name: str) -> np.ndarray:
        return self.read(lambda: np.asarray(self.column(name)[:]),
                         f"read of {self.split}/{name}")

    def column(self, name: str) -> zarr.Array:
        """The stored array ``name`` (image, mask, norm, ...) of this split."""
        if name not in self._columns:  # opening reads its metadata: once, not per slice
            column = self.group[name]
            if not isinstance(column, zarr.Array):
                raise ValueError(f"{self.location}/{self.split}: {name!r} is a group, "
                                 "not an array")
            self._columns[name] = column
        return self._columns[name]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Normalised float32 image (H, W) and uint8 mask (H, W)."""
        if not 0 <= index < self._count:
            raise IndexError(f"slice {index} out of range for {self.split} ({self._count})")
        image, mask = self.raw(index)
        return apply_norm(image, self.norm[index]), mask
