"""Turn a raw dataset into a prepared one: shards for pretraining, a labeled zarr store
for fine-tuning, a slice index and the manifest (written last, marking completion)."""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import zarr
from tqdm.auto import tqdm

from cluster.atomic import atomic_path, atomic_write_text
from cluster.config import to_dict
from data_prep.manifest import MANIFEST_NAME, Manifest
from data_prep.nnunet import NnunetSource
from data_prep.normalize import (
    NormParams,
    ct_window_params,
    fixed_params,
    percentile_params,
    zscore_params,
)
from data_prep.shards import ShardInfo, ShardSetWriter
from data_prep.slices import SliceRecord, volume_slices
from data_prep.sources import AcdcSource, DatasetSource, SourcePatient
from data_prep.splits import (
    SPLITS,
    UNLABELED,
    acdc_reference_split,
    check_disjoint,
    random_split,
)
from data_prep.volume import Volume
from data_prep.zarr_store import write_split


@dataclass
class PrepareConfig:
    source: str = ""
    out: str = ""
    format: Literal["acdc", "nnunet"] = "acdc"
    name: str = "acdc"
    modality: str = ""  # default: what the source declares
    image_size: int = 256
    channel: int = 0  # nnU-Net/MSD: which input channel
    slice_axis: int = 2  # nnU-Net/MSD: the axis 3D volumes are sliced along
    normalization: Literal["zscore", "fixed", "ct_window", "percentile"] = "zscore"
    fixed_mean: float = 67.27  # the reference study's ACDC statistics
    fixed_std: float = 84.66
    ct_window: tuple[float, float] = (-160.0, 240.0)  # HU, soft-tissue window
    percentiles: tuple[float, float] = (0.5, 99.5)
    # "auto": ACDC's id rule for ACDC, a seeded random split by patient otherwise.
    split: Literal["auto", "acdc", "random"] = "auto"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    pretrain_frames: Literal["cine", "labeled"] = "cine"
    cine_frame_stride: int = 1
    # Evaluation patients stay out of pretraining shards unless asked for; "unlabeled"
    # covers cases without labels (e.g. nnU-Net imagesTs).
    pretrain_splits: list[str] = field(default_factory=lambda: ["train", "unlabeled"])
    shard_max_bytes: int = 64 * 2**20
    min_shards: int = 8

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if self.cine_frame_stride < 1:
            raise ValueError(f"cine_frame_stride must be >= 1, got {self.cine_frame_stride}")
        unknown = sorted(set(self.pretrain_splits) - {*SPLITS, UNLABELED})
        if unknown:
            raise ValueError(f"pretrain_splits: unknown split {unknown[0]!r}")
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {self.slice_axis}")


def open_source(config: PrepareConfig) -> DatasetSource:
    if config.format == "nnunet":
        return NnunetSource(config.source, channel=config.channel, slice_axis=config.slice_axis)
    return AcdcSource(config.source, config.pretrain_frames, config.cine_frame_stride)


def make_splits(patients: list[SourcePatient], config: PrepareConfig) -> dict[str, list[str]]:
    labeled = [p for p in patients if p.labeled]
    rule = config.split if config.split != "auto" else (
        "acdc" if config.format == "acdc" else "random")
    if rule == "acdc":
        unnumbered = [p.name for p in labeled if p.number is None]
        if unnumbered:
            raise ValueError(f"split=acdc needs numbered patients; {unnumbered[0]!r} has no "
                             "trailing number (use split=random)")
        splits = {name: [] for name in SPLITS}
        for patient in labeled:
            splits[acdc_reference_split(patient.number)].append(patient.name)  # type: ignore[arg-type]
    else:
        splits = random_split([p.name for p in labeled], config.val_fraction,
                              config.test_fraction, config.split_seed)
    splits[UNLABELED] = [p.name for p in patients if not p.labeled]
    check_disjoint(splits)
    return splits


def prepare_dataset(config: PrepareConfig, progress: bool = True) -> Manifest:
    out = Path(config.out)
    if (out / MANIFEST_NAME).is_file():
        existing = Manifest.read(out)
        if existing.extra.get("config") == to_dict(config):
            return existing
        raise FileExistsError(f"{out} already holds a prepared dataset made with another "
                              "config; choose another --out or delete it")
    source = open_source(config)
    patients = source.patients()
    splits = make_splits(patients, config)
    split_of = {name: split for split, names in splits.items() for name in names}

    pretrain_patients = [p for p in patients if split_of[p.name] in config.pretrain_splits]
    planned = sum(source.planned_pretrain_slices(p) for p in pretrain_patients)
    max_samples = max(1, math.ceil(planned / config.min_shards))

    labeled: dict[str, list[SliceRecord]] = defaultdict(list)
    index_rows: list[dict[str, object]] = []
    spacings: list[tuple[float, float, float]] = []
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "shards") as shard_dir:
        writer = ShardSetWriter(shard_dir, config.shard_max_bytes, max_samples)
        for patient in tqdm(patients, desc="prepare", unit="patient", disable=not progress):
            split = split_of[patient.name]
            masks: dict[int, np.ndarray] = {}
            for volume in source.labeled_volumes(patient):
                spacings.append(volume.spacing)
                assert volume.mask is not None
                masks[volume.frame] = volume.mask
                for record in volume_slices(volume, _norm(volume, config), split,
                                            config.image_size):
                    labeled[split].append(record)
            if split not in config.pretrain_splits:
                continue
            for volume in source.pretrain_volumes(patient):
                if not masks:
                    spacings.append(volume.spacing)
                volume.mask = masks.get(volume.frame)
                for record in volume_slices(volume, _norm(volume, config), split,
                                            config.image_size):
                    writer.write(record)
                    index_rows.append(_index_row(record, in_shards=True))
        shard_infos = writer.close()  # also writes each shard's DALI index

    store_counts: dict[str, int] = {}
    with atomic_path(out / "labeled.zarr") as store_dir:
        root = zarr.open_group(str(store_dir), mode="w")
        for split in SPLITS:
            store_counts[split] = write_split(root, split, labeled[split])
    rows_by_key = {str(row["key"]): row for row in index_rows}
    for split in SPLITS:
        for position, record in enumerate(labeled[split]):
            row = rows_by_key.get(record.key)
            if row is None:
                row = rows_by_key[record.key] = _index_row(record, in_shards=False)
                index_rows.append(row)
            row["store_index"] = position
    atomic_write_text(out / "slices.csv", _index_csv(index_rows))

    manifest = Manifest(
        name=config.name,
        modality=config.modality or source.modality,
        source_format=config.format,
        classes={str(k): v for k, v in sorted(source.classes.items())},
        image_size=config.image_size,
        normalization=_norm_description(config),
        splits=splits,
        counts={
            "patients": {s: len(n) for s, n in splits.items()},
            "labeled_slices": store_counts,
            "pretrain_slices": sum(s.samples for s in shard_infos),
        },
        spacing_stats=_spacing_stats(spacings),
        shards=[vars(s) for s in shard_infos],
        labeled_store={"path": "labeled.zarr", "slices": store_counts},
        slice_index="slices.csv",
        pretrain_splits=list(config.pretrain_splits),
        extra={"config": to_dict(config)},
    )
    manifest.write(out)
    return manifest


def _norm(volume: Volume, config: PrepareConfig) -> NormParams:
    if config.normalization == "fixed":
        return fixed_params(config.fixed_mean, config.fixed_std)
    if config.normalization == "ct_window":
        return ct_window_params(volume.image, config.ct_window)
    if config.normalization == "percentile":
        return percentile_params(volume.image, config.percentiles)
    return zscore_params(volume.image)


def _norm_description(config: PrepareConfig) -> dict[str, object]:
    description: dict[str, object] = {
        "kind": config.normalization,
        "apply": "(clip(raw, norm[2], norm[3]) - norm[0]) / norm[1], per-slice norm in "
                 "meta/store",
    }
    if config.normalization == "fixed":
        description.update(mean=config.fixed_mean, std=config.fixed_std)
        return description
    description["scope"] = "volume"
    if config.normalization == "ct_window":
        description["window"] = list(config.ct_window)
    elif config.normalization == "percentile":
        description["percentiles"] = list(config.percentiles)
    return description


def _spacing_stats(spacings: list[tuple[float, float, float]]) -> dict[str, list[float]]:
    if not spacings:
        return {}
    values = np.array(spacings)
    return {
        "min": values.min(axis=0).round(4).tolist(),
        "median": np.median(values, axis=0).round(4).tolist(),
        "max": values.max(axis=0).round(4).tolist(),
    }


def _index_row(record: SliceRecord, in_shards: bool) -> dict[str, object]:
    return {
        "key": record.key, "patient": record.patient, "split": record.split,
        "frame": record.frame, "slice": record.slice_index,
        "labeled": int(record.mask is not None), "in_shards": int(in_shards), "store_index": -1,
    }


def _index_csv(rows: list[dict[str, object]]) -> str:
    buffer = io.StringIO()
    fields = ["key", "patient", "split", "frame", "slice", "labeled", "in_shards", "store_index"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: str(r["key"])))
    return buffer.getvalue()


__all__ = ["PrepareConfig", "ShardInfo", "prepare_dataset"]
