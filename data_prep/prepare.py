"""Turn a raw dataset into a prepared one: shards for pretraining, a labeled zarr store
for fine-tuning, a slice index and the manifest (written last, marking completion)."""

from __future__ import annotations

import shutil
from pathlib import Path

from cluster.config import to_dict
from data_prep.assemble import assemble
from data_prep.checksums import sha256_file
from data_prep.convert import convert_in_worker, start_worker
from data_prep.manifest import MANIFEST_NAME, Manifest
from data_prep.pool import run_jobs
from data_prep.prepare_config import PrepareConfig
from data_prep.sources import AcdcSource, DatasetSource, SourcePatient
from data_prep.splits import (
    SPLITS,
    UNLABELED,
    assign_splits,
    check_disjoint,
    random_split,
)
from data_prep.staging import STAGING_DIR, claim_staging, read_unit_meta, unit_path


def open_source(config: PrepareConfig) -> DatasetSource:
    # Readers are imported when chosen: each pulls in its own format libraries.
    if config.format == "images":
        from data_prep.image_folder import ImageFolderSource

        return ImageFolderSource(
            config.source, patient_pattern=config.patient_pattern,
            classes={int(k): str(v) for k, v in config.classes.items()} if config.classes
            else None,
            mask_values={int(k): int(v) for k, v in config.mask_values.items()}
            if config.mask_values else None,
            spacing=config.pixel_spacing, modality=config.modality or "OT",
            to_gray=config.to_gray, skip_bad=config.skip_bad)
    if config.format == "dicom":
        from data_prep.dicom import DicomSource

        return DicomSource(config.source, modality=config.modality_filter or None,
                           skip_bad=config.skip_bad)
    if config.format == "natural":
        from data_prep.natural_images import NaturalImageSource

        return NaturalImageSource(config.source, channels=config.channels,
                                  chunk_size=config.chunk_size, skip_bad=config.skip_bad)
    if config.format == "nnunet":
        from data_prep.nnunet import NnunetSource

        return NnunetSource(config.source, channel=config.channel, skip_bad=config.skip_bad)
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
        splits = assign_splits((p.name, p.number) for p in labeled)  # type: ignore[misc]
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
    if len(todo) < len(patients):  # a resumed preparation says what it reuses
        print(f"resuming {out}: {len(patients) - len(todo)} of {len(patients)} patients "
              f"already staged, converting the other {len(todo)}", flush=True)
    convert_all(source, todo, split_of, config, staging, progress)
    units = [(unit_path(staging, p.name), read_unit_meta(unit_path(staging, p.name)))
             for p in patients]
    manifest = assemble(source, units, splits, {p.name: dict(p.meta) for p in patients},
                        config, progress)
    shutil.rmtree(staging)
    return manifest


def convert_all(source: DatasetSource, patients: list[SourcePatient], split_of: dict[str, str],
                config: PrepareConfig, staging: Path, progress: bool) -> None:
    """Stage every patient of ``patients`` (in a process pool unless ``workers=1``)."""
    jobs = [(p, split_of[p.name], unit_path(staging, p.name)) for p in patients]
    run_jobs(convert_in_worker, jobs, config.workers, desc="convert", progress=progress,
             initializer=start_worker, initargs=(source, config))


def _staged_and_current(unit: Path, source_root: Path) -> bool:
    """A staged unit is reused only if its source files are unchanged; a unit that
    recorded a skipped patient is retried (the file may have been fixed since)."""
    if not unit.is_dir():
        return False
    try:
        meta = read_unit_meta(unit)
    except ValueError:  # e.g. a unit cut short by a power loss: convert it again
        meta = {"skipped": "unreadable", "files": {}}
    current = not meta["skipped"] and all(
        (source_root / name).is_file() and sha256_file(source_root / name) == digest
        for name, digest in meta["files"].items())
    if not current:
        shutil.rmtree(unit)
    return current


def _identity(config: dict[str, object], staging: bool = False) -> dict[str, object]:
    """The config keys that change the output (the worker count never does; skip_bad
    only decides whether a staged patient may be a recorded skip)."""
    ignored = {"workers", "skip_bad"} if staging else {"workers"}
    return {k: v for k, v in config.items() if k not in ignored}


__all__ = ["PrepareConfig", "prepare_dataset"]
