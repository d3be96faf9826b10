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
from data_prep import acdc
from data_prep.manifest import MANIFEST_NAME, Manifest
from data_prep.normalize import NormParams, fixed_params, zscore_params
from data_prep.shards import ShardInfo, ShardSetWriter
from data_prep.slices import SliceRecord, volume_slices
from data_prep.splits import SPLITS, acdc_reference_split, check_disjoint
from data_prep.volume import Volume
from data_prep.zarr_store import write_split


@dataclass
class PrepareConfig:
    source: str = ""
    out: str = ""
    format: Literal["acdc"] = "acdc"
    name: str = "acdc"
    modality: str = "MR"
    image_size: int = 256
    normalization: Literal["zscore", "fixed"] = "zscore"
    fixed_mean: float = 67.27  # the reference study's ACDC statistics
    fixed_std: float = 84.66
    pretrain_frames: Literal["cine", "labeled"] = "cine"
    cine_frame_stride: int = 1
    # Evaluation patients stay out of pretraining shards unless asked for.
    pretrain_splits: list[str] = field(default_factory=lambda: ["train"])
    shard_max_bytes: int = 64 * 2**20
    min_shards: int = 8

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if self.cine_frame_stride < 1:
            raise ValueError(f"cine_frame_stride must be >= 1, got {self.cine_frame_stride}")
        unknown = sorted(set(self.pretrain_splits) - set(SPLITS))
        if unknown:
            raise ValueError(f"pretrain_splits: unknown split {unknown[0]!r}")


def prepare_dataset(config: PrepareConfig, progress: bool = True) -> Manifest:
    out = Path(config.out)
    if (out / MANIFEST_NAME).is_file():
        existing = Manifest.read(out)
        if existing.extra.get("config") == to_dict(config):
            return existing
        raise FileExistsError(f"{out} already holds a prepared dataset made with another "
                              "config; choose another --out or delete it")
    patients = acdc.discover_patients(config.source)
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for patient in patients:
        splits[acdc_reference_split(patient.number)].append(patient.name)
    check_disjoint(splits)
    split_of = {name: split for split, names in splits.items() for name in names}

    pretrain_patients = [p for p in patients if split_of[p.name] in config.pretrain_splits]
    planned = sum(_planned_slices(p, config) for p in pretrain_patients)
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
            for volume in acdc.load_labeled_frames(patient):
                spacings.append(volume.spacing)
                assert volume.mask is not None
                masks[volume.frame] = volume.mask
                for record in volume_slices(volume, _norm(volume, config), split,
                                            config.image_size):
                    labeled[split].append(record)
            if split not in config.pretrain_splits:
                continue
            for volume in _pretrain_volumes(patient, config):
                volume.mask = masks.get(volume.frame)
                for record in volume_slices(volume, _norm(volume, config), split,
                                            config.image_size):
                    writer.write(record)
                    index_rows.append(_index_row(record, in_shards=True))
        shard_infos = writer.close()

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
        modality=config.modality,
        source_format=config.format,
        classes={str(k): v for k, v in acdc.ACDC_CLASSES.items()},
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


def _pretrain_volumes(patient: acdc.AcdcPatient, config: PrepareConfig):
    if config.pretrain_frames == "labeled":
        yield from acdc.load_labeled_frames(patient)
    else:
        yield from acdc.load_cine_frames(patient, stride=config.cine_frame_stride)


def _planned_slices(patient: acdc.AcdcPatient, config: PrepareConfig) -> int:
    if config.pretrain_frames == "labeled":
        shape = acdc.load_nifti_header_shape(patient.frame_path(patient.ed_frame))
        return shape[2] * len(patient.labeled_frames)
    shape = acdc.cine_shape(patient)
    return shape[2] * math.ceil(shape[3] / config.cine_frame_stride)


def _norm(volume: Volume, config: PrepareConfig) -> NormParams:
    if config.normalization == "fixed":
        return fixed_params(config.fixed_mean, config.fixed_std)
    return zscore_params(volume.image)


def _norm_description(config: PrepareConfig) -> dict[str, object]:
    if config.normalization == "fixed":
        return {"kind": "fixed", "mean": config.fixed_mean, "std": config.fixed_std}
    return {"kind": "zscore", "scope": "volume",
            "apply": "(raw - norm[0]) / norm[1], per-slice parameters in meta/store"}


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
