"""Reader for folders of DICOM series, with DICOM SEG masks where present.

Layout: any folder tree. Every file under the root is looked at once (headers only);
image instances are grouped by PatientID and SeriesInstanceUID, SEG instances are
matched to the image series they were derived from::

    ROOT/**/*          CT/MR/... image instances, one 2D frame per file
    ROOT/**/*          SEG instances (Modality "SEG") referencing one image series

Decisions, so that a prepared dataset means the same thing for every scanner:

* Array axes follow the NIfTI readers: ``image[x, y, slice]`` with x the column index
  (along the row direction cosine) and y the row index, so ``spacing`` is
  ``(PixelSpacing[1], PixelSpacing[0], slice spacing)``.
* Slices are sorted by ImagePositionPatient projected onto the slice normal
  (row cosine x column cosine), ascending; InstanceNumber is used only when a series has
  no positions at all.
* Intensities: the linear modality transform (RescaleSlope/RescaleIntercept) is applied
  when present and not the identity, for every modality (CT then holds Hounsfield
  units; Philips MR or PET rescales that differ per slice become consistent). Without a
  rescale the stored dtype is kept. Integral rescales whose result fits int16 give
  int16; any other rescale gives float32 (exact for integers below 2**24), so values are
  never wrapped or truncated.
* Files that are not DICOM (no "DICM" marker and no .dcm/.dicom/.ima suffix), DICOMDIR
  indexes and DICOM objects that are not images (SR, RTSTRUCT, RT dose, ...) are
  skipped and listed in ``DicomSource.skipped``. Anything that claims to be an image
  and cannot be read is a ``DataError`` (or, with ``skip_bad``, a recorded problem).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from data_prep import dicom_seg
from data_prep.dicom_series import SeriesInfo, series_label
from data_prep.errors import DataError
from data_prep.sources import SourcePatient
from data_prep.volume import Volume

DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
_TRAILING_NUMBER = re.compile(r"(\d+)$")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_ORIENTATION_TOL = 1e-3  # direction cosines: scanners round them differently per slice
_DUPLICATE_TOL_MM = 1e-3
_INT16 = np.iinfo(np.int16)
_MAX_RESCALE_INT = 2**31  # larger integral slopes/intercepts go through float


@dataclass(frozen=True)
class InstanceHeader:
    """What discovery keeps of one image file: plain values only (the source is pickled)."""

    path: Path
    patient_id: str
    series_uid: str
    sop_uid: str
    modality: str
    rows: int
    columns: int
    position: tuple[float, ...] | None  # ImagePositionPatient (3)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6)
    pixel_spacing: tuple[float, ...] | None  # (between rows, between columns)
    instance_number: int | None
    series_number: int | None
    description: str
    slice_thickness: float | None
    spacing_between_slices: float | None
    frames: int
    photometric: str
    samples_per_pixel: int


# -- discovery ---------------------------------------------------------------------------
def candidate_files(root: Path) -> Iterator[tuple[Path, str | None]]:
    """Every file under ``root`` in a stable order, with a reason when it is skipped."""
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .Trash, ...
        for name in sorted(names):
            path = Path(folder) / name
            if name.startswith("."):
                yield path, "hidden file"
            elif name.upper() == "DICOMDIR":
                yield path, "DICOMDIR index"
            elif not _has_dicm_marker(path) and path.suffix.lower() not in DICOM_SUFFIXES:
                yield path, "not a DICOM file"
            else:
                yield path, None


def _has_dicm_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def read_dataset(path: Path, header_only: bool) -> Dataset:
    """Read a DICOM file; files without the "DICM" marker are read as raw data sets."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only,
                               force=not _has_dicm_marker(path))
    except DataError:
        raise
    except Exception as exc:  # pydicom raises many types for corrupt or truncated files
        raise DataError(f"{path}: cannot read DICOM ({type(exc).__name__}: {exc})") from None


def sop_class(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", Dataset()).get(
        "MediaStorageSOPClassUID")
    return str(uid or "")


def classify(path: Path, ds: Dataset) -> str:
    """Return "seg", "image", or why the object is skipped (it is not an image)."""
    uid = sop_class(ds)
    if uid in dicom_seg.SEG_SOP_CLASSES or ds.get("Modality") == "SEG":
        return "seg"
    if not uid:
        raise DataError(f"{path}: not a DICOM file (no SOP Class UID; corrupt or truncated?)")
    if "Image Storage" in UID(uid).name:
        return "image"
    return f"not an image ({UID(uid).name})"


def instance_header(path: Path, ds: Dataset) -> InstanceHeader:
    """The plain header values of an image instance; missing essentials are errors."""
    required = ("PatientID", "SeriesInstanceUID", "Modality", "Rows", "Columns")
    missing = [key for key in required if not str(ds.get(key, "")).strip()]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)} (truncated file or incomplete "
                        "header)")
    return InstanceHeader(
        path=path,
        patient_id=str(ds.PatientID).strip(),
        series_uid=str(ds.SeriesInstanceUID),
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        modality=str(ds.Modality).strip().upper(),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        position=_floats(path, ds, "ImagePositionPatient", 3),
        orientation=_floats(path, ds, "ImageOrientationPatient", 6),
        pixel_spacing=_floats(path, ds, "PixelSpacing", 2)
        or _floats(path, ds, "ImagerPixelSpacing", 2),  # projection radiographs
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        series_number=_int_or_none(ds.get("SeriesNumber")),
        description=str(ds.get("SeriesDescription", "")),
        slice_thickness=_positive_or_none(ds.get("SliceThickness")),
        spacing_between_slices=_positive_or_none(ds.get("SpacingBetweenSlices")),
        frames=_int_or_none(ds.get("NumberOfFrames")) or 1,
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
        samples_per_pixel=_int_or_none(ds.get("SamplesPerPixel")) or 1,
    )


def check_supported(inst: InstanceHeader) -> None:
    """Only grayscale single-frame instances make up the series this reader stacks."""
    if inst.frames > 1:
        raise DataError(f"{inst.path}: multi-frame images ({inst.frames} frames) are not "
                        "supported; only series of single-frame images")
    if inst.samples_per_pixel != 1 or not inst.photometric.startswith("MONOCHROME"):
        raise DataError(f"{inst.path}: {inst.photometric} colour images are not supported "
                        "(grayscale only)")


def _floats(path: Path, ds: Dataset, key: str, count: int) -> tuple[float, ...] | None:
    value = ds.get(key)
    if value is None or value == "":
        return None
    values = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
    try:
        result = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {key} {value!r} is not numeric") from None
    if len(result) != count or not np.isfinite(result).all():
        raise DataError(f"{path}: {key} must hold {count} finite numbers, got {values}")
    return result


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _positive_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 and np.isfinite(number) else None


# -- series geometry -----------------------------------------------------------------------
def sanitize_patient(patient_id: str) -> str:
    return _UNSAFE_NAME_CHARS.sub("_", patient_id).strip("_")


def build_series(instances: list[InstanceHeader], patient: str, name: str,
                 spacing_tolerance: float) -> SeriesInfo:
    """Order the slices of one series and check that they form a regular volume."""
    first = instances[0]
    folder = _common_folder([inst.path for inst in instances])
    label = series_label(folder, first.series_number, first.series_uid)
    for inst in instances:
        check_supported(inst)
    _check_unique_instances(instances, label)
    _check_same(instances, label, "Rows/Columns", lambda i: (i.rows, i.columns))
    _check_close(instances, label, "PixelSpacing", lambda i: i.pixel_spacing, rtol=1e-3)
    with_geometry = [i for i in instances if i.position is not None and i.orientation]
    if len(with_geometry) == len(instances):
        _check_close(instances, label, "orientations (ImageOrientationPatient)",
                     lambda i: i.orientation, atol=_ORIENTATION_TOL)
        ordered, slice_spacing = _order_by_position(instances, label, spacing_tolerance)
    elif with_geometry:
        lacking = next(i for i in instances if i not in with_geometry)
        raise DataError(f"{lacking.path}: no ImagePositionPatient/ImageOrientationPatient "
                        f"while other slices of {label} have them")
    else:
        ordered = _order_by_instance_number(instances, label)
        slice_spacing = first.spacing_between_slices or first.slice_thickness or 1.0
    row_spacing, column_spacing = first.pixel_spacing  # type: ignore[misc]  # checked above
    has_geometry = bool(with_geometry)
    return SeriesInfo(
        uid=first.series_uid, patient_id=first.patient_id, patient=patient, name=name,
        modality=first.modality, folder=folder, files=tuple(i.path for i in ordered),
        sop_uids=tuple(i.sop_uid for i in ordered),
        positions=tuple(i.position for i in ordered) if has_geometry else None,  # type: ignore[misc]
        orientation=first.orientation if has_geometry else None,
        rows=first.rows, columns=first.columns,
        spacing=(column_spacing, row_spacing, slice_spacing),
        series_number=first.series_number, description=first.description)


def _common_folder(paths: list[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def _check_unique_instances(instances: list[InstanceHeader], label: str) -> None:
    seen: dict[str, Path] = {}
    for inst in instances:
        if inst.sop_uid and inst.sop_uid in seen:
            raise DataError(f"{inst.path}: same SOPInstanceUID as {seen[inst.sop_uid]} in "
                            f"{label} (a copy of the same image?)")
        seen[inst.sop_uid] = inst.path


def _check_same(instances: list[InstanceHeader], label: str, what: str,
                key: Callable[[InstanceHeader], object]) -> None:
    reference = key(instances[0])
    for inst in instances[1:]:
        if key(inst) != reference:
            raise DataError(f"{inst.path}: mixed {what} in {label}: {key(inst)} here, "
                            f"{reference} in {instances[0].path.name}")


def _check_close(instances: list[InstanceHeader], label: str, what: str,
                 key: Callable[[InstanceHeader], tuple[float, ...] | None],
                 rtol: float = 0.0, atol: float = 0.0) -> None:
    """Values within tolerance of the first slice's; missing ones are errors too."""
    reference = key(instances[0])
    for inst in instances:
        value = key(inst)
        if value is None:
            raise DataError(f"{inst.path}: {what} is missing")
        if not np.allclose(value, reference, rtol=rtol, atol=atol):  # type: ignore[arg-type]
            raise DataError(f"{inst.path}: mixed {what} in {label}: {value} here, "
                            f"{reference} in {instances[0].path.name}")


def slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    """Unit normal of the image plane: row cosine x column cosine."""
    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    return normal / np.linalg.norm(normal)


def _order_by_position(instances: list[InstanceHeader], label: str, tolerance: float
                       ) -> tuple[list[InstanceHeader], float]:
    """Slices sorted along the normal, and the slice spacing they imply."""
    first = instances[0]
    with np.errstate(invalid="ignore"):
        normal = slice_normal(first.orientation)  # type: ignore[arg-type]  # checked by caller
    if not np.isfinite(normal).all():
        raise DataError(f"{first.path}: ImageOrientationPatient {first.orientation} has "
                        "parallel row and column cosines")
    along_normal = [float(np.dot(i.position, normal)) for i in instances]  # type: ignore[arg-type]
    order = np.argsort(along_normal, kind="stable")
    ordered = [instances[k] for k in order]
    along = np.asarray(along_normal)[order]
    if len(ordered) == 1:
        return ordered, first.spacing_between_slices or first.slice_thickness or 1.0
    gaps = np.diff(along)
    duplicates = np.flatnonzero(gaps < _DUPLICATE_TOL_MM)
    if duplicates.size:
        k = duplicates[0]
        raise DataError(f"{ordered[k + 1].path}: same slice position ({along[k]:.3f} mm along "
                        f"the normal) as {ordered[k].path.name} in {label} (several "
                        "acquisitions, echoes or time points in one series are not supported)")
    typical = float(np.median(gaps))
    irregular = np.flatnonzero(np.abs(gaps - typical) > tolerance * typical)
    if irregular.size:
        k = irregular[0]
        raise DataError(f"{label}: non-uniform slice spacing: {gaps[k]:.4f} mm between "
                        f"{ordered[k].path.name} and {ordered[k + 1].path.name}, typically "
                        f"{typical:.4f} mm (missing slice?)")
    return ordered, float((along[-1] - along[0]) / (len(along) - 1))


def _order_by_instance_number(instances: list[InstanceHeader], label: str
                              ) -> list[InstanceHeader]:
    if len(instances) == 1:
        return instances
    numbers = [i.instance_number for i in instances]
    if None in numbers:
        path = instances[numbers.index(None)].path
        raise DataError(f"{path}: neither ImagePositionPatient nor InstanceNumber; cannot "
                        f"order the slices of {label}")
    repeated = [n for n, count in Counter(numbers).items() if count > 1]
    if repeated:
        raise DataError(f"{label}: InstanceNumber {repeated[0]} is used by several files and "
                        "there are no positions to order the slices by")
    return sorted(instances, key=lambda i: i.instance_number or 0)


def series_affine(series: SeriesInfo) -> np.ndarray | None:
    """Voxel (x = column index, y = row index, slice) -> RAS+ mm; None without geometry.

    DICOM's patient frame is LPS, so its x and y change sign. The slice step is taken from
    the first and last positions, so a stack whose positions do not run along the plane
    normal (gantry tilt) is placed where its slices really are.
    """
    if series.positions is None or series.orientation is None:
        return None
    column_spacing, row_spacing, slice_spacing = series.spacing
    first = np.asarray(series.positions[0], dtype=np.float64)
    if len(series.positions) > 1:
        step = (np.asarray(series.positions[-1]) - first) / (len(series.positions) - 1)
    else:
        step = slice_normal(series.orientation) * slice_spacing
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(series.orientation[:3]) * column_spacing  # along a row
    lps[:3, 1] = np.asarray(series.orientation[3:]) * row_spacing  # down a column
    lps[:3, 2] = step
    lps[:3, 3] = first
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


# -- pixels ----------------------------------------------------------------------------------
def load_series_image(series: SeriesInfo) -> np.ndarray:
    """The series as (x, y, slice): stored values, or rescaled ones (see module doc)."""
    stored: list[np.ndarray] = []
    rescales: list[tuple[float, float]] = []
    for path in series.files:
        ds = read_dataset(path, header_only=False)
        stored.append(_stored_pixels(path, ds, series))
        rescales.append(_rescale_params(path, ds))
    volume = _apply_rescale(stored, rescales, series)
    return np.ascontiguousarray(np.moveaxis(volume, 0, -1).transpose(1, 0, 2))


def _stored_pixels(path: Path, ds: Dataset, series: SeriesInfo) -> np.ndarray:
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(f"{path}: no pixel data (truncated file or not an image)")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # truncated data, unsupported compression, bad group 0028
        raise DataError(f"{path}: cannot decode pixel data ({type(exc).__name__}: {exc})"
                        ) from None
    if pixels.shape != (series.rows, series.columns):
        raise DataError(f"{path}: pixel array shape {pixels.shape} differs from "
                        f"{(series.rows, series.columns)} in {series.label}")
    if not pixels.dtype.isnative:
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    return pixels


def _rescale_params(path: Path, ds: Dataset) -> tuple[float, float]:
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    try:  # absent (or empty) means the identity
        slope = 1.0 if slope in (None, "") else float(slope)
        intercept = 0.0 if intercept in (None, "") else float(intercept)
    except (TypeError, ValueError):
        raise DataError(f"{path}: RescaleSlope/RescaleIntercept are not numeric") from None
    if slope == 0 or not np.isfinite([slope, intercept]).all():
        raise DataError(f"{path}: invalid rescale (slope {slope}, intercept {intercept})")
    return slope, intercept


def _apply_rescale(stored: list[np.ndarray], rescales: list[tuple[float, float]],
                   series: SeriesInfo) -> np.ndarray:
    """Stack slices as (slice, row, column), rescaled without wrapping or truncation."""
    if all(r == (1.0, 0.0) for r in rescales):
        volume = np.stack(stored)
    elif all(_is_small_integer(s) and _is_small_integer(i) for s, i in rescales) and \
            _integral_range_fits_int16(stored, rescales):
        volume = np.stack([a.astype(np.int64) * int(s) + int(i)
                           for a, (s, i) in zip(stored, rescales)]).astype(np.int16)
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # reported just below
            volume = np.stack([(a.astype(np.float64) * s + i).astype(np.float32)
                               for a, (s, i) in zip(stored, rescales)])
    if volume.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(volume).reshape(len(stored), -1).all(axis=1))
        if bad.size:
            raise DataError(f"{series.files[bad[0]]}: NaN or Inf intensities (after rescale "
                            f"with slope/intercept {rescales[bad[0]]})")
    return volume


def _is_small_integer(value: float) -> bool:
    return float(value).is_integer() and abs(value) < _MAX_RESCALE_INT


def _integral_range_fits_int16(stored: list[np.ndarray],
                               rescales: list[tuple[float, float]]) -> bool:
    for pixels, (slope, intercept) in zip(stored, rescales):
        if pixels.dtype.kind == "f":
            return False
        ends = [int(pixels.min()) * int(slope) + int(intercept),
                int(pixels.max()) * int(slope) + int(intercept)]
        if min(ends) < _INT16.min or max(ends) > _INT16.max:
            return False
    return True


# -- the source ------------------------------------------------------------------------------
class DicomSource:
    """DICOM series folders: one patient per PatientID, one volume per image series.

    ``modality`` picks the image series to use when a dataset holds several modalities
    (the others are skipped); without it, mixed modalities are an error. A patient is
    labeled when at least one of its series has a SEG. ``spacing_tolerance`` is the
    relative slice-gap variation accepted within a series.

    With ``skip_bad``, what discovery cannot use (an unreadable header, a series that is
    not a regular volume such as a 3-plane localizer, a SEG that does not fit its series)
    is left out and the error recorded in ``problems``; pixels that cannot be decoded are
    found later, by the volume methods. ``skipped`` lists files that were never meant to
    be used (not DICOM, not an image, another modality) with the reason.

    Discovery reads headers only; pixels are read in ``labeled_volumes`` /
    ``pretrain_volumes`` (the source is pickled to worker processes: plain data only).
    """

    format = "dicom"

    def __init__(self, root: str | Path, modality: str | None = None,
                 spacing_tolerance: float = 0.01, skip_bad: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: DICOM root folder does not exist")
        self.problems: list[str] = []
        self.skipped: dict[str, str] = {}  # path relative to root -> why it is not used
        self._skip_bad = skip_bad
        images, seg_headers = self._read_headers()
        self.modality = self._pick_modality(images, modality)
        wanted = [i for i in images if i.modality == self.modality]
        self._series = self._group_series(wanted, spacing_tolerance)
        unused = {i.series_uid for i in images} - set(self._series)
        self.classes: dict[int, str] = {0: "background"}
        self._segs = self._plan_segmentations(seg_headers, unused)
        self._patient_series: dict[str, list[str]] = {}
        for series in sorted(self._series.values(), key=_series_order):
            self._patient_series.setdefault(series.patient, []).append(series.uid)

    def _report(self, error: DataError) -> None:
        """Raise, or with ``skip_bad`` record the problem and let the caller leave it out."""
        if not self._skip_bad:
            raise error
        self.problems.append(str(error))

    def _skip(self, path: Path, reason: str) -> None:
        self.skipped[str(path.relative_to(self.root))] = reason

    # -- discovery ---------------------------------------------------------------------
    def _read_headers(self) -> tuple[list[InstanceHeader], list[tuple[Path, Dataset]]]:
        images: list[InstanceHeader] = []
        segs: list[tuple[Path, Dataset]] = []
        for path, skip_reason in candidate_files(self.root):
            if skip_reason is not None:
                self._skip(path, skip_reason)
                continue
            try:
                ds = read_dataset(path, header_only=True)
                kind = classify(path, ds)
                if kind == "image":
                    images.append(instance_header(path, ds))
                elif kind == "seg":
                    segs.append((path, ds))
                else:
                    self._skip(path, kind)
            except DataError as error:
                self._report(error)
        if not images:
            raise DataError(f"{self.root}: no readable DICOM image files found "
                            f"({len(self.skipped)} other files skipped, "
                            f"{len(self.problems)} unreadable)")
        return images, segs

    def _pick_modality(self, images: list[InstanceHeader], modality: str | None) -> str:
        series_per_modality = Counter(m for m, _ in {(i.modality, i.series_uid)
                                                     for i in images})
        found = ", ".join(f"{m}: {n} series" for m, n in sorted(series_per_modality.items()))
        if modality is None and len(series_per_modality) > 1:
            raise DataError(f"{self.root}: series of several modalities ({found}); choose one "
                            "with modality=...")
        chosen = modality.upper() if modality is not None else next(iter(series_per_modality))
        if chosen not in series_per_modality:
            raise DataError(f"{self.root}: no {modality} series (found {found})")
        for inst in images:
            if inst.modality != chosen:
                self._skip(inst.path, f"modality {inst.modality}, not {chosen}")
        return chosen

    def _group_series(self, images: list[InstanceHeader], spacing_tolerance: float
                      ) -> dict[str, SeriesInfo]:
        by_series: dict[str, list[InstanceHeader]] = defaultdict(list)
        for inst in images:
            by_series[inst.series_uid].append(inst)
        patients = self._patient_names({i.patient_id for i in images})
        names = _volume_names(by_series, patients)
        series: dict[str, SeriesInfo] = {}
        for uid, instances in by_series.items():
            try:
                patient_ids = sorted({i.patient_id for i in instances})
                if len(patient_ids) > 1:
                    raise DataError(f"{_common_folder([i.path for i in instances])}: series "
                                    f"{uid} spans several PatientIDs {patient_ids}")
                series[uid] = build_series(instances, patients[patient_ids[0]], names[uid],
                                           spacing_tolerance)
            except DataError as error:
                self._report(error)
        if not series:  # only with skip_bad: every series was left out
            raise DataError(f"{self.root}: no usable image series; {len(self.problems)} "
                            f"problem(s), the first: {self.problems[0]}")
        return series

    def _patient_names(self, patient_ids: set[str]) -> dict[str, str]:
        names: dict[str, str] = {}
        owner: dict[str, str] = {}
        for pid in sorted(patient_ids):
            name = sanitize_patient(pid)
            if not name:
                raise DataError(f"{self.root}: PatientID {pid!r} has no letters or digits to "
                                "name the patient by")
            if name in owner:
                raise DataError(f"{self.root}: PatientIDs {owner[name]!r} and {pid!r} both "
                                f"become patient name {name!r}")
            names[pid], owner[name] = name, pid
        return names

    def _plan_segmentations(self, seg_headers: list[tuple[Path, Dataset]],
                            unused_series: set[str]) -> dict[str, dicom_seg.SegPlan]:
        """One SEG per series; classes become the union of their segments."""
        sop_index = dicom_seg.index_source_images(self._series.values())
        plans: dict[str, dicom_seg.SegPlan] = {}
        declared_in: dict[int, Path] = {}
        for path, ds in seg_headers:
            try:
                plan = dicom_seg.plan_segmentation(path, ds, self._series, sop_index,
                                                   unused_series)
                if plan is None:
                    self._skip(path, "SEG of a series not used (other modality or left out)")
                    continue
                if plan.series_uid in plans:
                    label = self._series[plan.series_uid].label
                    raise DataError(f"{path}: a second SEG for {label} (first: "
                                    f"{plans[plan.series_uid].path}); keep one SEG per series")
                dicom_seg.add_classes(self.classes, declared_in, plan)
            except DataError as error:
                self._report(error)
                continue
            plans[plan.series_uid] = plan
        self.classes = dict(sorted(self.classes.items()))
        return plans

    # -- DatasetSource -----------------------------------------------------------------
    def patients(self) -> list[SourcePatient]:
        result = []
        for name, uids in sorted(self._patient_series.items()):
            match = _TRAILING_NUMBER.search(name)
            labeled = any(uid in self._segs for uid in uids)
            result.append(SourcePatient(name, int(match.group(1)) if match else None,
                                        labeled=labeled, meta={"series": str(len(uids))}))
        return result

    def labeled_volumes(self, patient: SourcePatient) -> Iterator[Volume]:
        for uid in self._patient_series[patient.name]:
            seg = self._segs.get(uid)
            if seg is not None:
                series = self._series[uid]
                volume = self._volume(series)
                volume.mask = dicom_seg.load_mask(seg, series)
                volume.files = (*volume.files, seg.path)
                yield volume

    def pretrain_volumes(self, patient: SourcePatient) -> Iterator[Volume]:
        for uid in self._patient_series[patient.name]:
            yield self._volume(self._series[uid])

    def series(self, patient: SourcePatient) -> list[SeriesInfo]:
        """The patient's image series, in volume order (for reports and tests)."""
        return [self._series[uid] for uid in self._patient_series[patient.name]]

    def _volume(self, series: SeriesInfo) -> Volume:
        image = load_series_image(series)
        meta: dict[str, str | int | float] = {
            "modality": series.modality, "series_uid": series.uid,
            "series_description": series.description}
        if series.series_number is not None:
            meta["series_number"] = series.series_number
        return Volume(patient=series.patient, frame=0, image=image, spacing=series.spacing,
                      source=series.folder, meta=meta, name=series.name, files=series.files,
                      affine=series_affine(series))


def _series_order(series: SeriesInfo) -> tuple[bool, int, str]:
    """Series by number (numbered ones first), then by name: stable across runs."""
    return (series.series_number is None, series.series_number or 0, series.name)


def _volume_names(by_series: dict[str, list[InstanceHeader]], patients: dict[str, str]
                  ) -> dict[str, str]:
    """``{patient}_series{SeriesNumber}``, or a UID digest where numbers are missing or
    repeat within the patient (volume ids must be unique and free of dots)."""
    numbers: dict[str, Counter] = defaultdict(Counter)
    for instances in by_series.values():
        numbers[instances[0].patient_id][instances[0].series_number] += 1
    names = {}
    for uid, instances in by_series.items():
        first = instances[0]
        patient = patients[first.patient_id]
        number = first.series_number
        if number is not None and number >= 0 and numbers[first.patient_id][number] == 1:
            names[uid] = f"{patient}_series{number}"
        else:
            names[uid] = f"{patient}_{hashlib.sha1(uid.encode()).hexdigest()[:8]}"
    return names
