"""DICOM SEG instances as label masks for the image series they segment.

Discovery (headers only) decides, for each SEG frame, which slice of which series it
lands on: by the source SOP instance its DerivationImageSequence names, else by its
PlanePositionSequence position. Geometry that does not match the series is an error
there, before any pixel is read. ``load_mask`` then decodes the frames with highdicom
and writes segment numbers (the class ids) into a (x, y, slice) uint8 mask.

Segments may not overlap: a class mask holds one class per pixel, and picking a winner
silently would change the annotation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from data_prep.dicom_series import SeriesInfo
from data_prep.errors import DataError

# Segmentation Storage and Label Map Segmentation Storage
SEG_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"}
SEG_TYPES = {"BINARY", "FRACTIONAL", "LABELMAP"}
_MAX_CLASS_ID = 255  # masks are uint8


@dataclass(frozen=True)
class FramePlacement:
    frame_number: int  # 1-based, as DICOM counts frames
    segment: int | None  # None for LABELMAP frames (pixel values are segment numbers)
    slice_index: int


@dataclass(frozen=True)
class SegPlan:
    """Where every frame of one SEG goes in its series' mask (plain data, picklable)."""

    path: Path
    series_uid: str
    segments: dict[int, str]  # segment number (class id) -> SegmentLabel
    seg_type: str
    max_fractional: int
    frames: tuple[FramePlacement, ...]


# -- discovery ---------------------------------------------------------------------------
def index_source_images(series: Iterable[SeriesInfo]) -> dict[str, tuple[str, int]]:
    """SOPInstanceUID -> (series UID, slice index): where a source image sits."""
    return {uid: (s.uid, k) for s in series for k, uid in enumerate(s.sop_uids)}


def referenced_series(path: Path, ds: Dataset, sop_index: dict[str, tuple[str, int]],
                      series: dict[str, SeriesInfo], unused_series: set[str]) -> str | None:
    """The one image series a SEG segments; None when that series is not in use."""
    listed = {str(item.get("SeriesInstanceUID", ""))
              for item in ds.get("ReferencedSeriesSequence", [])} - {""}
    from_frames = {sop_index[uid][0] for frame in ds.get("PerFrameFunctionalGroupsSequence", [])
                   for uid in _source_sop_uids(frame) if uid in sop_index}
    known = (listed | from_frames) & set(series)
    if len(known) > 1:
        raise DataError(f"{path}: SEG references several image series {sorted(known)}; "
                        "expected one")
    if known:
        return known.pop()
    if listed and listed <= unused_series:
        return None
    if listed:
        raise DataError(f"{path}: SEG references series {sorted(listed)}, which is not among "
                        "the image series found")
    raise DataError(f"{path}: SEG references no image series (no ReferencedSeriesSequence "
                    "and no source images in its frames)")


def plan_segmentation(path: Path, ds: Dataset, series: dict[str, SeriesInfo],
                      sop_index: dict[str, tuple[str, int]], unused_series: set[str]
                      ) -> SegPlan | None:
    """Where each frame of a SEG goes; None when its series is not in use."""
    series_uid = referenced_series(path, ds, sop_index, series, unused_series)
    if series_uid is None:
        return None
    return _plan_for_series(path, ds, series[series_uid], sop_index)


def _plan_for_series(path: Path, ds: Dataset, series: SeriesInfo,
                     sop_index: dict[str, tuple[str, int]]) -> SegPlan:
    seg_type = str(ds.get("SegmentationType", "")).upper()
    if seg_type not in SEG_TYPES:
        raise DataError(f"{path}: SegmentationType {seg_type!r} is not one of "
                        f"{sorted(SEG_TYPES)}")
    _check_patient(path, ds, series)
    _check_plane_geometry(path, ds, series)
    segments = segment_labels(path, ds, seg_type)
    frames = _place_frames(path, ds, series, sop_index, segments, seg_type)
    return SegPlan(path=path, series_uid=series.uid, segments=segments, seg_type=seg_type,
                   max_fractional=int(ds.get("MaximumFractionalValue", 1) or 1), frames=frames)


def segment_labels(path: Path, ds: Dataset, seg_type: str) -> dict[int, str]:
    """Segment number -> label; a LABELMAP's segment 0 is the background (class 0)."""
    labels: dict[int, str] = {}
    for item in ds.get("SegmentSequence", []):
        number = int(item.get("SegmentNumber", 0) or 0)
        label = str(item.get("SegmentLabel", "")).strip()
        if number == 0 and seg_type == "LABELMAP":
            continue
        if not 1 <= number <= _MAX_CLASS_ID:
            raise DataError(f"{path}: segment number {number} is outside 1..{_MAX_CLASS_ID}")
        if not label:
            raise DataError(f"{path}: segment {number} has no SegmentLabel")
        if number in labels:
            raise DataError(f"{path}: segment number {number} is declared twice")
        labels[number] = label
    if not labels:
        raise DataError(f"{path}: SEG declares no segments (empty SegmentSequence)")
    return labels


def add_classes(classes: dict[int, str], declared_in: dict[int, Path], plan: SegPlan
                ) -> None:
    """Add a SEG's segments to the dataset's classes; a number must keep its label."""
    for number, label in sorted(plan.segments.items()):
        if number in declared_in and classes[number] != label:
            raise DataError(f"{plan.path}: segment {number} is {label!r} here but "
                            f"{classes[number]!r} in {declared_in[number]}")
    for number, label in plan.segments.items():
        classes[number] = label
        declared_in.setdefault(number, plan.path)


def _check_patient(path: Path, ds: Dataset, series: SeriesInfo) -> None:
    patient_id = str(ds.get("PatientID", "")).strip()
    if patient_id != series.patient_id:
        raise DataError(f"{path}: SEG PatientID {patient_id!r} differs from "
                        f"{series.patient_id!r} of {series.label}")


def _group_value(ds: Dataset, frame: Dataset | None, sequence: str, attribute: str) -> Any:
    """A functional-group attribute: the frame's own value, else the shared one."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    for groups in (frame, shared[0] if shared else None):
        items = groups.get(sequence) if groups is not None else None
        if items and attribute in items[0]:
            return items[0].get(attribute)
    return None


def _check_plane_geometry(path: Path, ds: Dataset, series: SeriesInfo) -> None:
    shape = (int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))
    if shape != (series.rows, series.columns):
        raise DataError(f"{path}: SEG frames are {shape[0]}x{shape[1]} (rows x columns), "
                        f"{series.label} is {series.rows}x{series.columns}")
    for number, frame in enumerate(ds.get("PerFrameFunctionalGroupsSequence", []), start=1):
        spacing = _group_value(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
        if spacing is not None and not np.allclose(
                [float(v) for v in spacing], series.spacing[1::-1], rtol=1e-3):
            raise DataError(f"{path}: frame {number}: SEG PixelSpacing {list(spacing)} "
                            f"differs from {list(series.spacing[1::-1])} of {series.label}")
        orientation = _group_value(ds, frame, "PlaneOrientationSequence",
                                   "ImageOrientationPatient")
        if orientation is not None and series.orientation is not None and not np.allclose(
                [float(v) for v in orientation], series.orientation, atol=1e-3):
            raise DataError(f"{path}: frame {number}: SEG orientation {list(orientation)} "
                            f"differs from {list(series.orientation)} of {series.label}")


def _source_sop_uids(frame: Dataset) -> list[str]:
    return [str(source.ReferencedSOPInstanceUID)
            for derivation in frame.get("DerivationImageSequence", [])
            for source in derivation.get("SourceImageSequence", [])
            if "ReferencedSOPInstanceUID" in source]


def _place_frames(path: Path, ds: Dataset, series: SeriesInfo,
                  sop_index: dict[str, tuple[str, int]], segments: dict[int, str],
                  seg_type: str) -> tuple[FramePlacement, ...]:
    frames = ds.get("PerFrameFunctionalGroupsSequence", [])
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if len(frames) != n_frames:
        raise DataError(f"{path}: {len(frames)} per-frame functional groups for "
                        f"{n_frames} frames")
    placements, seen = [], set()
    for number, frame in enumerate(frames, start=1):
        segment = None if seg_type == "LABELMAP" else _frame_segment(ds, frame, path, number)
        if segment is not None and segment not in segments:
            raise DataError(f"{path}: frame {number} belongs to segment {segment}, which the "
                            f"SegmentSequence does not declare ({sorted(segments)})")
        slice_index = _frame_slice(path, ds, frame, number, series, sop_index)
        if (segment, slice_index) in seen:
            raise DataError(f"{path}: two frames of segment {segment} land on slice "
                            f"{slice_index} of {series.label}")
        seen.add((segment, slice_index))
        placements.append(FramePlacement(number, segment, slice_index))
    return tuple(placements)


def _frame_segment(ds: Dataset, frame: Dataset, path: Path, number: int) -> int:
    value = _group_value(ds, frame, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
    if value is None:
        raise DataError(f"{path}: frame {number} has no ReferencedSegmentNumber")
    return int(value)


def _frame_slice(path: Path, ds: Dataset, frame: Dataset, number: int, series: SeriesInfo,
                 sop_index: dict[str, tuple[str, int]]) -> int:
    """The series slice a frame lands on: its source image, else its plane position."""
    sources = {sop_index[uid][1] for uid in _source_sop_uids(frame)
               if uid in sop_index and sop_index[uid][0] == series.uid}
    if len(sources) > 1:
        raise DataError(f"{path}: frame {number} is derived from several slices "
                        f"{sorted(sources)} of {series.label}")
    position = _group_value(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
    if position is None and not sources:
        raise DataError(f"{path}: frame {number} has neither a source image in "
                        f"{series.label} nor a plane position")
    if position is None:
        return sources.pop()
    if series.positions is None:
        if sources:
            return sources.pop()
        raise DataError(f"{path}: frame {number} can only be placed by position, but "
                        f"{series.label} has no slice positions")
    offsets = np.linalg.norm(np.asarray(series.positions) - [float(v) for v in position],
                             axis=1)
    nearest = int(np.argmin(offsets))
    tolerance = max(1e-3, 0.02 * min(series.spacing))
    slice_index = sources.pop() if sources else nearest
    if offsets[slice_index] > tolerance:
        raise DataError(f"{path}: frame {number} at position {[float(v) for v in position]} "
                        f"lies on no slice of {series.label} (slice {slice_index} is "
                        f"{offsets[slice_index]:.3f} mm away)")
    return slice_index


# -- pixels ------------------------------------------------------------------------------
def load_mask(plan: SegPlan, series: SeriesInfo) -> np.ndarray:
    """The (x, y, slice) uint8 class mask of ``series`` from its SEG."""
    seg = _read_segmentation(plan.path)
    mask = np.zeros((series.rows, series.columns, len(series.files)), dtype=np.uint8)
    for placement in plan.frames:
        layer = _frame_layer(plan, seg, placement, (series.rows, series.columns))
        target = mask[:, :, placement.slice_index]
        drawn = layer != 0
        if (target[drawn] != 0).any():
            raise DataError(f"{plan.path}: segments overlap on slice {placement.slice_index} "
                            f"(frame {placement.frame_number}); a class mask needs disjoint "
                            "segments")
        target[drawn] = layer[drawn]
    return np.ascontiguousarray(mask.transpose(1, 0, 2))


def _read_segmentation(path: Path) -> hd.seg.Segmentation:
    try:
        return hd.seg.segread(path)
    except Exception as exc:  # highdicom/pydicom raise many types for bad files
        raise DataError(f"{path}: cannot read DICOM SEG ({type(exc).__name__}: {exc})"
                        ) from None


def _frame_layer(plan: SegPlan, seg: hd.seg.Segmentation, placement: FramePlacement,
                 shape: tuple[int, int]) -> np.ndarray:
    """One frame as class ids (rows, columns)."""
    try:
        stored = np.asarray(seg.get_stored_frame(placement.frame_number))
    except Exception as exc:  # truncated or undecodable pixel data
        raise DataError(f"{plan.path}: cannot decode frame {placement.frame_number} "
                        f"({type(exc).__name__}: {exc})") from None
    if stored.shape != shape:
        raise DataError(f"{plan.path}: frame {placement.frame_number} has shape "
                        f"{stored.shape}, expected {shape}")
    if placement.segment is None:  # LABELMAP: values are segment numbers already
        undeclared = sorted(set(np.unique(stored).tolist()) - {0} - set(plan.segments))
        if undeclared:
            raise DataError(f"{plan.path}: frame {placement.frame_number} holds segment "
                            f"numbers {undeclared} that the SegmentSequence does not "
                            f"declare ({sorted(plan.segments)})")
        return stored.astype(np.uint8)
    if plan.seg_type == "FRACTIONAL":  # at least half the maximum counts as inside
        inside = stored.astype(np.int64) * 2 >= plan.max_fractional
        inside &= stored > 0
    else:
        inside = stored != 0
    return inside.astype(np.uint8) * np.uint8(placement.segment)
