"""A discovered DICOM image series: what discovery (``dicom``) and the SEG reader
(``dicom_seg``) both work from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SeriesInfo:
    """One image series with its slices in position order; geometry already checked."""

    uid: str
    patient_id: str
    patient: str  # sanitised PatientID: the patient's name in the dataset
    name: str  # unique volume id, no dots
    modality: str
    folder: Path
    files: tuple[Path, ...]  # slice order
    sop_uids: tuple[str, ...]  # slice order
    positions: tuple[tuple[float, ...], ...] | None  # slice order; None: no geometry
    orientation: tuple[float, ...] | None
    rows: int
    columns: int
    spacing: tuple[float, float, float]  # (x, y, slice) in mm
    series_number: int | None
    description: str

    @property
    def label(self) -> str:
        return series_label(self.folder, self.series_number, self.uid)


def series_label(folder: Path, number: int | None, uid: str) -> str:
    """How errors name a series: its folder, then its number (or UID)."""
    return f"{folder}: series {number if number is not None else uid}"
