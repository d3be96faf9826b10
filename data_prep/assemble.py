"""Assemble staged units into the prepared dataset: shards (+ DALI indexes), the labeled
zarr store, the slice index and, last, the manifest.

Everything is laid out in patient order from the units' descriptions first; then shards
are written in parallel, each from its planned run of slices, so the bytes written never
depend on the number of workers.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cluster.atomic import atomic_path, atomic_write_text
from cluster.config import to_dict
from data_prep.convert import LABELED, PRETRAIN
from data_prep.errors import DataError
from data_prep.manifest import Manifest
from data_prep.orientation import OBLIQUE_DEGREES
from data_prep.pool import run_jobs
from data_prep.prepare_config import PrepareConfig
from data_prep.shards import SHARD_PATTERN, ShardInfo, plan_shards, write_planned_shard
from data_prep.slices import SliceRecord, safe_key
from data_prep.sources import DatasetSource
from data_prep.splits import SPLITS
from data_prep.staging import Piece, StagedVolume
from data_prep.zarr_store import write_split


def assemble(source: DatasetSource, units: list[tuple[Path, dict[str, Any]]],
             splits: dict[str, list[str]], patient_meta: dict[str, dict[str, Any]],
             config: PrepareConfig, progress: bool) -> Manifest:
    out = Path(config.out)
    skipped = {meta["patient"]: meta["skipped"] for _, meta in units if meta["skipped"]}
    splits = {split: [n for n in names if n not in skipped] for split, names in splits.items()}
    volumes = [StagedVolume(unit, index, meta["patient"], meta["split"], info)
               for unit, meta in units for index, info in enumerate(meta["volumes"])]
    pretraining = [v for v in volumes if v.info["role"] == PRETRAIN]
    labeled = [v for v in volumes if v.info["role"] == LABELED]

    channels = {_channels(v.images()) for v in volumes}
    if len(channels) > 1:
        raise DataError(f"{config.source}: images have different channel counts "
                        f"{sorted(channels)}")
    shard_infos, index_rows = _write_shards(out, pretraining, config, progress)
    store_counts = _write_store(out, labeled, index_rows)
    atomic_write_text(out / "slices.csv", _index_csv(index_rows))

    warnings = [{"patient": name, "problem": problem} for name, problem in skipped.items()]
    warnings += [{"patient": meta["patient"], "problem": problem}
                 for _, meta in units for problem in meta.get("warnings", [])]
    warnings += [{"patient": "", "problem": problem}
                 for problem in getattr(source, "problems", [])]
    source_files = {name: digest for _, meta in units for name, digest in meta["files"].items()}
    manifest = Manifest(
        name=config.name,
        modality=config.modality or source.modality,
        source_format=config.format,
        classes={str(k): v for k, v in sorted(source.classes.items())},
        image_size=config.image_size,
        channels=channels.pop() if channels else 1,
        normalization=_norm_description(config),
        splits=splits,
        patient_meta={name: meta for name, meta in patient_meta.items()
                      if name not in skipped and meta},
        counts={
            "patients": {s: len(n) for s, n in splits.items()},
            "labeled_slices": store_counts,
            "pretrain_slices": sum(s.samples for s in shard_infos),
            "source_bytes": sum(meta["source_bytes"] for _, meta in units),
        },
        spacing_stats=_spacing_stats(_spacing_sample(labeled, pretraining)),
        shards=[vars(s) for s in shard_infos],
        labeled_store={"path": "labeled.zarr", "slices": store_counts},
        slice_index="slices.csv",
        pretrain_splits=list(config.pretrain_splits),
        source_files=dict(sorted(source_files.items())),
        warnings=warnings,
        orientation=_orientation(config, volumes),
        extra={"config": to_dict(config)},
    )
    manifest.write(out)
    return manifest


def _orientation(config: PrepareConfig, volumes: list[StagedVolume]) -> dict[str, Any]:
    """The manifest's orientation record: the convention, and what the sources held."""
    if not config.volumetric:
        return {"frame": "image", "display": "as stored in the image files (row 0 at the top)"}
    record = config.slicing().describe()
    record["source_axes"] = dict(sorted(Counter(
        v.info.get("source_axes") or "unknown" for v in volumes).items()))
    if config.slicing().plane == "acquired":
        record["planes"] = dict(sorted(Counter(v.info.get("plane", "") for v in volumes).items()))
    angles = [float(v.info.get("oblique_degrees", 0.0)) for v in volumes]
    oblique = [a for a in angles if a > OBLIQUE_DEGREES]
    record["oblique"] = {"volumes": len(oblique), "max_degrees": max(angles, default=0.0)}
    return record


def _write_shards(out: Path, volumes: list[StagedVolume], config: PrepareConfig,
                  progress: bool) -> tuple[list[ShardInfo], list[dict[str, object]]]:
    """Plan shard boundaries over all pretraining slices, then write shards in parallel."""
    slices = [(volume, z) for volume in volumes for z in range(volume.info["slices"])]
    max_samples = max(1, math.ceil(len(slices) / config.min_shards))
    per_slice = {id(v): _slice_bytes(v) for v in volumes}
    sizes = plan_shards((per_slice[id(v)] for v, _ in slices), config.shard_max_bytes,
                        max_samples)
    plans: list[list[Piece]] = []
    position = 0
    for size in sizes:
        plans.append(_pieces(slices[position:position + size]))
        position += size
    index_rows = [_index_row(v, z, in_shards=True) for v, z in slices]
    with atomic_path(out / "shards") as shard_dir:
        shard_dir.mkdir()
        jobs = [(shard_dir / (SHARD_PATTERN % number), plan)
                for number, plan in enumerate(plans)]
        infos = run_jobs(write_planned_shard, jobs, config.workers, desc="shards",
                         progress=progress)
    return infos, index_rows


def _write_store(out: Path, volumes: list[StagedVolume],
                 index_rows: list[dict[str, object]]) -> dict[str, int]:
    """The labeled zarr store, one group per split; store positions go into the index."""
    by_split: dict[str, list[SliceRecord]] = defaultdict(list)
    for volume in volumes:
        by_split[volume.split].extend(volume.records())
    rows_by_key = {str(row["key"]): row for row in index_rows}
    counts: dict[str, int] = {}
    with atomic_path(out / "labeled.zarr") as store_dir:
        root = zarr.open_group(str(store_dir), mode="w")
        for split in SPLITS:
            records = by_split[split]
            counts[split] = write_split(root, split, records)
            for position, record in enumerate(records):
                row = rows_by_key.get(record.key)
                if row is None:
                    row = rows_by_key[record.key] = _record_row(record)
                    index_rows.append(row)
                row["store_index"] = position
    return counts


def _pieces(slices: list[tuple[StagedVolume, int]]) -> list[Piece]:
    """Consecutive slices of a volume as one [start, stop) range."""
    pieces: list[Piece] = []
    for volume, z in slices:
        if pieces and pieces[-1][0] is volume and pieces[-1][2] == z:
            pieces[-1] = (volume, pieces[-1][1], z + 1)
        else:
            pieces.append((volume, z, z + 1))
    return pieces


def _slice_bytes(volume: StagedVolume) -> int:
    images, masks = volume.images(), volume.masks()
    return images[0].nbytes + (masks[0].nbytes if masks is not None else 0)


def _spacing_sample(labeled: list[StagedVolume],
                    pretraining: list[StagedVolume]) -> list[list[float]]:
    """Each patient's labeled volumes, or its pretraining volumes where it has none."""
    with_labels = {v.unit for v in labeled}
    return [v.info["spacing"] for v in labeled] + [
        v.info["spacing"] for v in pretraining if v.unit not in with_labels]


def _channels(images: np.ndarray) -> int:
    return 1 if images.ndim == 3 else int(images.shape[1])


def _index_row(volume: StagedVolume, z: int, in_shards: bool) -> dict[str, object]:
    return {
        "key": safe_key(f"{volume.info['volume']}_slice{z:03d}"), "patient": volume.patient,
        "volume": volume.info["volume"], "split": volume.split, "frame": volume.info["frame"],
        "slice": z, "labeled": int(volume.info["labeled"]), "in_shards": int(in_shards),
        "store_index": -1,
    }


def _record_row(record: SliceRecord) -> dict[str, object]:
    return {
        "key": record.key, "patient": record.patient, "volume": record.volume,
        "split": record.split, "frame": record.frame, "slice": record.slice_index,
        "labeled": int(record.mask is not None), "in_shards": 0, "store_index": -1,
    }


def _index_csv(rows: list[dict[str, object]]) -> str:
    buffer = io.StringIO()
    fields = ["key", "patient", "volume", "split", "frame", "slice", "labeled", "in_shards",
              "store_index"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: str(r["key"])))
    return buffer.getvalue()


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


def _spacing_stats(spacings: list[list[float]]) -> dict[str, list[float]]:
    if not spacings:
        return {}
    values = np.array(spacings)
    return {
        "min": values.min(axis=0).round(4).tolist(),
        "median": np.median(values, axis=0).round(4).tolist(),
        "max": values.max(axis=0).round(4).tolist(),
    }
