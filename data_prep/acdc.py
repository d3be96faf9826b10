"""Reader for the ACDC cardiac cine-MRI layout (also written by the synthetic phantom).

Layout::

    ROOT/[training|testing]/patientNNN/Info.cfg              ED, ES (1-based), Group, ...
    ROOT/[training|testing]/patientNNN/patientNNN_4d.nii.gz   cine (x, y, slice, frame)
    ROOT/[training|testing]/patientNNN/patientNNN_frameYY.nii.gz      ED / ES frames
    ROOT/[training|testing]/patientNNN/patientNNN_frameYY_gt.nii.gz   their labels
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.errors import DataError
from data_prep.nifti import (
    check_labels,
    load_nifti,
    voxel_spacing,
)
from data_prep.volume import Volume

ACDC_CLASSES = {0: "BG", 1: "RV", 2: "MYO", 3: "LV"}
_PATIENT_DIR = re.compile(r"^patient(\d{3,})$")


@dataclass(frozen=True)
class AcdcPatient:
    name: str  # "patient001"
    number: int
    folder: Path
    ed_frame: int  # 1-based, as in Info.cfg
    es_frame: int
    group: str
    n_frames: int | None

    @property
    def info_path(self) -> Path:
        return self.folder / "Info.cfg"

    @property
    def cine_path(self) -> Path:
        return self.folder / f"{self.name}_4d.nii.gz"

    def frame_path(self, frame: int, label: bool = False) -> Path:
        return self.folder / f"{self.name}_frame{frame:02d}{'_gt' if label else ''}.nii.gz"

    @property
    def labeled_frames(self) -> tuple[int, ...]:
        return tuple(sorted({self.ed_frame, self.es_frame}))


def read_info_cfg(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise DataError(f"{path}: Info.cfg is missing")
    entries: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise DataError(f"{path}:{lineno}: expected 'Key: value', got {line!r}")
        entries[key.strip()] = value.strip()
    for required in ("ED", "ES"):
        if required not in entries:
            raise DataError(f"{path}: missing {required!r} entry")
        if not entries[required].isdigit() or int(entries[required]) < 1:
            raise DataError(f"{path}: {required} must be a positive frame number, "
                            f"got {entries[required]!r}")
    return entries


def discover_patients(root: str | Path, problems: list[str] | None = None
                      ) -> list[AcdcPatient]:
    """All patient folders under ``root`` (an ACDC root or one of its subsets), by number.

    With a ``problems`` list, a patient whose Info.cfg is missing or malformed is left out
    and the error appended there instead of raised.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: ACDC root folder does not exist")
    candidates = [p for sub in ("training", "testing") if (root / sub).is_dir()
                  for p in (root / sub).iterdir()] or list(root.iterdir())
    patients = []
    for folder in candidates:
        match = _PATIENT_DIR.match(folder.name)
        if not (folder.is_dir() and match):
            continue
        try:
            info = read_info_cfg(folder / "Info.cfg")
        except DataError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
            continue
        n_frames = info.get("NbFrame")
        patients.append(AcdcPatient(
            name=folder.name, number=int(match.group(1)), folder=folder,
            ed_frame=int(info["ED"]), es_frame=int(info["ES"]),
            group=info.get("Group", ""), n_frames=int(n_frames) if n_frames else None,
        ))
    if not patients:
        raise DataError(f"{root}: no patientNNN folders found (expected ACDC layout)")
    numbers = [p.number for p in patients]
    if len(set(numbers)) != len(numbers):
        raise DataError(f"{root}: the same patient number appears in training/ and testing/")
    return sorted(patients, key=lambda p: p.number)


def load_labeled_frames(patient: AcdcPatient) -> Iterator[Volume]:
    """The ED and ES frames with their ground truth."""
    for frame in patient.labeled_frames:
        image_path, label_path = patient.frame_path(frame), patient.frame_path(frame, label=True)
        image, zooms, affine = load_nifti(image_path)
        mask, mask_zooms, mask_affine = load_nifti(label_path)
        if image.ndim != 3:
            raise DataError(f"{image_path}: expected a 3D frame, got shape {image.shape}")
        check_labels(label_path, mask, mask_zooms, image_path, image.shape, zooms,
                     ACDC_CLASSES, "the ACDC classes", mask_affine, affine)
        yield Volume(
            patient=patient.name, frame=frame, image=image, affine=affine,
            spacing=voxel_spacing(image_path, zooms),
            source=image_path, mask=mask.astype(np.uint8), meta={"group": patient.group},
            files=(image_path, label_path, patient.info_path),
        )


def load_cine_frames(patient: AcdcPatient, stride: int = 1) -> Iterator[Volume]:
    """Every ``stride``-th frame of the 4D cine (frame numbers 1-based), unlabeled."""
    data, zooms, affine = load_nifti(patient.cine_path)
    if data.ndim != 4:
        raise DataError(f"{patient.cine_path}: expected a 4D cine (x, y, slice, frame), "
                        f"got shape {data.shape}")
    spacing = voxel_spacing(patient.cine_path, zooms)
    for index in range(0, data.shape[3], stride):
        yield Volume(
            patient=patient.name, frame=index + 1, image=np.ascontiguousarray(data[..., index]),
            spacing=spacing, affine=affine, source=patient.cine_path,
            meta={"group": patient.group},
            files=(patient.cine_path, patient.info_path),
        )

