"""Turn a raw dataset into a prepared one: shards for pretraining, a labeled zarr store
for fine-tuning, a slice index and the manifest (written last, marking completion)."""

from __future__ import annotations

import csv
import io
import math
import multiprocessing
import os
import shutil
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import zarr
from tqdm.auto import tqdm

from cluster.atomic import atomic_path, atomic_write_text
from cluster.config import to_dict
from data_prep.checksums import sha256_file
from data_prep.convert import (
    LABELED,
    PRETRAIN,
    convert_in_worker,
    convert_patient,
    start_worker,
)
from data_prep.dicom import DicomSource
from data_prep.image_folder import ImageFolderSource
from data_prep.manifest import MANIFEST_NAME, Manifest
from data_prep.natural_images import NaturalImageSource
from data_prep.nifti import DataError
from data_prep.nnunet import NnunetSource
from data_prep.prepare_config import PrepareConfig
from data_prep.shards import ShardInfo, ShardSetWriter
from data_prep.slices import SliceRecord, staged_slices
from data_prep.sources import AcdcSource, DatasetSource, SourcePatient
from data_prep.splits import (
    SPLITS,
    UNLABELED,
    acdc_reference_split,
    check_disjoint,
    random_split,
)
from data_prep.staging import (
    STAGING_DIR,
    claim_staging,
    open_unit,
    read_unit_meta,
    unit_path,
)
from data_prep.zarr_store import write_split


def open_source(config: PrepareConfig) -> DatasetSource:
    if config.format == "images":
        return ImageFolderSource(
            config.source, patient_pattern=config.patient_pattern,
            classes={int(k): str(v) for k, v in config.classes.items()} if config.classes
            else None,
            mask_values={int(k): int(v) for k, v in config.mask_values.items()}
            if config.mask_values else None,
            spacing=config.pixel_spacing, modality=config.modality or "OT",
            to_gray=config.to_gray, skip_bad=config.skip_bad)
    if config.format == "dicom":
        return DicomSource(config.source, modality=config.modality_filter or None,
                           skip_bad=config.skip_bad)
    if config.format == "natural":
        return NaturalImageSource(config.source, channels=config.channels,
                                  chunk_size=config.chunk_size, skip_bad=config.skip_bad)
    if config.format == "nnunet":
        return NnunetSource(config.source, channel=config.channel,
                            slice_axis=config.slice_axis, skip_bad=config.skip_bad)
    return AcdcSource(config.source, config.pretrain_frames, config.cine_frame_stride,
                      skip_bad=config.skip_bad)


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
    elif labeled:
        splits = random_split([p.name for p in labeled], config.val_fraction,
                              config.test_fraction, config.split_seed)
    else:  # a pretraining-only corpus (natural images, unlabeled scans)
        splits = {name: [] for name in SPLITS}
    splits[UNLABELED] = [p.name for p in patients if not p.labeled]
    check_disjoint(splits)
    return splits


def prepare_dataset(config: PrepareConfig, progress: bool = True) -> Manifest:
    """Prepare ``config.source`` into ``config.out``; resume an interrupted preparation.

    Patients are converted in parallel into staged units (skipped on a re-run when
    already there), then assembled in patient order, so the result does not depend on
    the number of workers.
    """
    out = Path(config.out)
    if (out / MANIFEST_NAME).is_file():
        existing = Manifest.read(out)
        if _identity(existing.extra.get("config", {})) == _identity(to_dict(config)):
            return existing
        raise FileExistsError(f"{out} already holds a prepared dataset made with another "
                              "config; choose another --out or delete it")
    source = open_source(config)
    patients = source.patients()
    splits = make_splits(patients, config)
    split_of = {name: split for split, names in splits.items() for name in names}
    staging = out / STAGING_DIR
    claim_staging(staging, _identity(to_dict(config), staging=True))
    todo = [p for p in patients if not _staged_and_current(unit_path(staging, p.name),
                                                           Path(config.source))]
    convert_all(source, todo, split_of, config, staging, progress)
    manifest = assemble(source, patients, splits, config, staging, progress)
    shutil.rmtree(staging)
    return manifest


def convert_all(source: DatasetSource, patients: list[SourcePatient], split_of: dict[str, str],
                config: PrepareConfig, staging: Path, progress: bool) -> None:
    """Stage every patient of ``patients``, in a process pool when more than one worker."""
    workers = min(config.workers or os.cpu_count() or 1, len(patients))
    bar = tqdm(total=len(patients), desc="convert", unit="patient", disable=not progress)
    with bar:
        if workers <= 1:
            for patient in patients:
                convert_patient(source, patient, split_of[patient.name], config,
                                unit_path(staging, patient.name))
                bar.update()
            return
        # spawn: workers start clean (no inherited threads or locks from the caller)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=start_worker,
                                 initargs=(source, config)) as pool:
            futures = [pool.submit(convert_in_worker, patient, split_of[patient.name],
                                   unit_path(staging, patient.name)) for patient in patients]
            try:
                for future in as_completed(futures):
                    future.result()
                    bar.update()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def assemble(source: DatasetSource, patients: list[SourcePatient],
             splits: dict[str, list[str]], config: PrepareConfig, staging: Path,
             progress: bool) -> Manifest:
    """Staged units -> shards (+ DALI indexes), labeled zarr store, slice index, manifest."""
    out = Path(config.out)
    units = [(unit_path(staging, p.name), read_unit_meta(unit_path(staging, p.name)))
             for p in patients]
    skipped = {meta["patient"]: meta["skipped"] for _, meta in units if meta["skipped"]}
    splits = {split: [n for n in names if n not in skipped] for split, names in splits.items()}
    planned = sum(v["slices"] for _, meta in units for v in meta["volumes"]
                  if v["role"] == PRETRAIN)
    max_samples = max(1, math.ceil(planned / config.min_shards))

    labeled: dict[str, list[SliceRecord]] = defaultdict(list)
    index_rows: list[dict[str, object]] = []
    spacings: list[list[float]] = []
    source_files: dict[str, str] = {}
    channels: set[int] = set()
    with atomic_path(out / "shards") as shard_dir:
        writer = ShardSetWriter(shard_dir, config.shard_max_bytes, max_samples)
        for path, meta in tqdm(units, desc="assemble", unit="patient", disable=not progress):
            source_files.update(meta["files"])
            has_labels = any(v["role"] == LABELED for v in meta["volumes"])
            with open_unit(path) as arrays:
                for index, volume in enumerate(meta["volumes"]):
                    if volume["role"] == LABELED or not has_labels:
                        spacings.append(volume["spacing"])
                    images = arrays[f"image_{index}"]
                    channels.add(1 if images.ndim == 3 else images.shape[1])
                    masks = arrays[f"mask_{index}"] if volume["labeled"] else None
                    records = staged_slices(meta["patient"], meta["split"], volume, images,
                                            masks)
                    if volume["role"] == LABELED:
                        labeled[meta["split"]].extend(records)
                        continue
                    for record in records:
                        writer.write(record)
                        index_rows.append(_index_row(record, in_shards=True))
        shard_infos = writer.close()  # also writes each shard's DALI index
    if len(channels) > 1:
        raise DataError(f"{config.source}: images have different channel counts "
                        f"{sorted(channels)}")

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

    warnings = [{"patient": name, "problem": problem} for name, problem in skipped.items()]
    warnings += [{"patient": "", "problem": problem}
                 for problem in getattr(source, "problems", [])]
    manifest = Manifest(
        name=config.name,
        modality=config.modality or source.modality,
        source_format=config.format,
        classes={str(k): v for k, v in sorted(source.classes.items())},
        image_size=config.image_size,
        channels=channels.pop() if channels else 1,
        normalization=_norm_description(config),
        splits=splits,
        counts={
            "patients": {s: len(n) for s, n in splits.items()},
            "labeled_slices": store_counts,
            "pretrain_slices": sum(s.samples for s in shard_infos),
            "source_bytes": sum(meta["source_bytes"] for _, meta in units),
        },
        spacing_stats=_spacing_stats(spacings),
        shards=[vars(s) for s in shard_infos],
        labeled_store={"path": "labeled.zarr", "slices": store_counts},
        slice_index="slices.csv",
        pretrain_splits=list(config.pretrain_splits),
        source_files=dict(sorted(source_files.items())),
        warnings=warnings,
        extra={"config": to_dict(config)},
    )
    manifest.write(out)
    return manifest


def _staged_and_current(unit: Path, source_root: Path) -> bool:
    """A staged unit is reused only if its source files are unchanged; a unit that
    recorded a skipped patient is retried (the file may have been fixed since)."""
    if not unit.is_file():
        return False
    meta = read_unit_meta(unit)
    current = not meta["skipped"] and all(
        (source_root / name).is_file() and sha256_file(source_root / name) == digest
        for name, digest in meta["files"].items())
    if not current:
        unit.unlink()
    return current


def _identity(config: dict[str, object], staging: bool = False) -> dict[str, object]:
    """The config keys that change the output (the worker count never does; skip_bad
    only decides whether a staged patient may be a recorded skip)."""
    ignored = {"workers", "skip_bad"} if staging else {"workers"}
    return {k: v for k, v in config.items() if k not in ignored}


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


def _index_row(record: SliceRecord, in_shards: bool) -> dict[str, object]:
    return {
        "key": record.key, "patient": record.patient, "volume": record.volume,
        "split": record.split,
        "frame": record.frame, "slice": record.slice_index,
        "labeled": int(record.mask is not None), "in_shards": int(in_shards), "store_index": -1,
    }


def _index_csv(rows: list[dict[str, object]]) -> str:
    buffer = io.StringIO()
    fields = ["key", "patient", "volume", "split", "frame", "slice", "labeled", "in_shards",
              "store_index"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: str(r["key"])))
    return buffer.getvalue()


__all__ = ["PrepareConfig", "ShardInfo", "prepare_dataset"]
