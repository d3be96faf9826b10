"""Convert one patient: read its volumes, normalise, resample, resize, stage the result.

This is the unit of parallel work in ``prepare``. Everything a patient yields is read and
checked before anything is written for it; a bad file raises ``DataError`` naming it, or
(with ``skip_bad``) is recorded as a warning and the patient left out.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_prep.checksums import sha256_file
from data_prep.errors import DataError
from data_prep.normalize import (
    NormParams,
    ct_window_params,
    fixed_params,
    percentile_params,
    zscore_params,
)
from data_prep.orientation import orient_volume
from data_prep.resample import FitMode, fit_to_size, resample_inplane
from data_prep.sources import DatasetSource, SourcePatient
from data_prep.staging import write_unit
from data_prep.volume import Volume

if TYPE_CHECKING:
    from data_prep.prepare_config import PrepareConfig

LABELED, PRETRAIN = "labeled", "pretrain"


def convert_patient(source: DatasetSource, patient: SourcePatient, split: str,
                    config: PrepareConfig, unit: Path) -> dict[str, Any]:
    """Stage ``patient`` into ``unit``; return the unit's description."""
    meta: dict[str, Any] = {"patient": patient.name, "split": split, "volumes": [],
                            "files": {}, "source_bytes": 0, "skipped": None, "warnings": []}
    problems = getattr(source, "problems", [])
    known = len(problems)
    try:
        arrays = _convert(source, patient, split, config, meta)
    except DataError as exc:
        if not config.skip_bad:
            raise DataError(f"{exc} (skip_bad=true would leave out patient {patient.name}, "
                            "record a warning in the manifest and go on)") from None
        meta.update(volumes=[], files={}, source_bytes=0, skipped=str(exc))
        arrays = {}
    # Files a source left out itself (skip_bad) while reading this patient, and volumes
    # that could not be reoriented exactly (oblique, or without orientation).
    meta["warnings"] = problems[known:] + meta.pop("orientation_notes", [])
    write_unit(unit, meta, arrays)
    return meta


# Worker processes receive the source and config once (pickled at start), then patients.
_worker_state: dict[str, Any] = {}


def start_worker(source: DatasetSource, config: PrepareConfig) -> None:
    if multiprocessing.parent_process() is not None:
        # One thread per worker process: the pool is the parallelism. Set before torch
        # (used only for resampling) is first imported there.
        os.environ["OMP_NUM_THREADS"] = "1"
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
    _worker_state.update(source=source, config=config)


def convert_in_worker(patient: SourcePatient, split: str, unit: Path) -> None:
    convert_patient(_worker_state["source"], patient, split, _worker_state["config"], unit)


def _convert(source: DatasetSource, patient: SourcePatient, split: str,
             config: PrepareConfig, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    files: set[Path] = set()
    masks: dict[str, np.ndarray] = {}

    slicing = config.slicing()
    notes: list[str] = []

    def stage(volume: Volume, role: str) -> None:
        index = len(meta["volumes"])
        source_spacing = list(volume.spacing)
        layout: dict[str, Any] = {}
        if config.volumetric:
            oriented = orient_volume(volume, slicing)
            volume = oriented.volume
            layout = {"source_axes": oriented.source_axes, "plane": oriented.plane,
                      "oblique_degrees": oriented.oblique_degrees}
            if oriented.note and oriented.note not in notes:  # once per file, not per frame
                notes.append(oriented.note)
        image, mask, spacing = shape_volume(volume, config)
        arrays[f"image_{index}"] = _slices_first(image)
        if mask is not None:
            arrays[f"mask_{index}"] = np.ascontiguousarray(np.moveaxis(mask, 2, 0))
        meta["volumes"].append({
            "role": role, "volume": volume.volume_id, "frame": volume.frame,
            "slices": volume.n_slices, "spacing": list(spacing),
            "source_spacing": source_spacing,
            "norm": normalisation(volume.image, config).as_list(),
            "labeled": mask is not None, "meta": volume.meta, **layout,
        })
        meta["source_bytes"] += volume.image.nbytes
        files.update(volume.source_files)

    for volume in source.labeled_volumes(patient):
        if volume.mask is None:
            raise DataError(f"{volume.source}: labeled volume {volume.volume_id} has no mask")
        masks[volume.volume_id] = volume.mask
        stage(volume, LABELED)
    if split in config.pretrain_splits:
        for volume in source.pretrain_volumes(patient):
            volume.mask = masks.get(volume.volume_id)
            stage(volume, PRETRAIN)
    root = Path(config.source)
    meta["files"] = {_relative(path, root): sha256_file(path) for path in sorted(files)}
    meta["orientation_notes"] = notes
    return arrays


def shape_volume(volume: Volume, config: PrepareConfig
                 ) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """In-plane resampling to the target spacing, then resize/pad/crop to the image size."""
    image, mask, spacing = volume.image, volume.mask, tuple(volume.spacing)
    if config.target_spacing is not None:
        image, mask, spacing = resample_inplane(image, mask, spacing, config.target_spacing)
    # padding takes the volume's minimum (air, not tissue); masks pad with background
    image, mask, (sx, sy) = fit_to_size(image, mask, config.image_size, resize_mode(config))
    return image, mask, (spacing[0] / sx, spacing[1] / sy, spacing[2])


def resize_mode(config: PrepareConfig) -> FitMode:
    if config.resize != "auto":
        return config.resize
    return "fill" if config.format == "natural" else "pad_crop"


def normalisation(image: np.ndarray, config: PrepareConfig) -> NormParams:
    """Per-volume parameters (or the dataset's fixed ones), stored with every slice."""
    if config.normalization == "fixed":
        return fixed_params(config.fixed_mean, config.fixed_std)
    if config.normalization == "ct_window":
        return ct_window_params(image, config.ct_window)
    if config.normalization == "percentile":
        return percentile_params(image, config.percentiles)
    return zscore_params(image)


def _slices_first(image: np.ndarray) -> np.ndarray:
    """(x, y, slice) -> (slice, x, y); (x, y, slice, c) -> (slice, c, x, y)."""
    order = (2, 0, 1) if image.ndim == 3 else (2, 3, 0, 1)
    return np.ascontiguousarray(image.transpose(order))


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)

