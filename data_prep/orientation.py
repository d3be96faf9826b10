"""One anatomical orientation for every source: lossless reorientation before slicing.

NIfTI files and DICOM series store the same anatomy in many voxel orders (RAS, LPS,
LAS, permuted axes ...). Before a 3D volume is sliced, its axes are permuted and flipped
(never resampled) so that every slice has the same anatomical layout, whatever the file:

* The reference frame is RAS+ (nibabel's and MONAI's world frame): each voxel axis is
  matched to the closest of the right, anterior and superior axes, as
  ``nibabel.as_closest_canonical`` does.
* The slice plane is chosen by name. A stored slice is an (rows, columns) array shown
  with row 0 at the top, in the radiological display convention:

  ========  =====================  ======================  =================
  plane     rows run towards       columns run towards     slices run towards
  ========  =====================  ======================  =================
  axial     posterior (A is up)    patient's left          superior
  coronal   inferior (S is up)     patient's left          anterior
  sagittal  inferior (S is up)     posterior (A is left)   right
  ========  =====================  ======================  =================

  ``acquired`` slices along the stored slice axis (the acquisition's stack, e.g. cardiac
  short-axis planes) and lays each slice out by the convention of the plane closest to
  it. Spacing follows the permutation.
* A volume whose axes are not parallel to the RAS+ axes (an oblique acquisition) cannot
  be reoriented losslessly; it is laid out along its closest canonical axes and the
  angle is reported.
* ``as_stored`` keeps the stored voxel order and slices along ``slice_axis``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from nibabel.affines import obliquity
from nibabel.orientations import aff2axcodes, apply_orientation, axcodes2ornt, io_orientation

from data_prep.volume import Volume

# (rows, columns, slices) of a stored volume, as nibabel axis codes (direction of increase)
PLANE_AXES: dict[str, tuple[str, str, str]] = {
    "axial": ("P", "L", "S"),
    "coronal": ("I", "L", "A"),
    "sagittal": ("I", "P", "R"),
}
DISPLAY = {
    "axial": "row 0 at the top: anterior up, the patient's left on the right (radiological)",
    "coronal": "row 0 at the top: superior up, the patient's left on the right (radiological)",
    "sagittal": "row 0 at the top: superior up, anterior on the left",
}
# World axis (0 R-L, 1 A-P, 2 S-I) an axis is closest to -> the plane normal to it.
_PLANE_OF_NORMAL = {0: "sagittal", 1: "coronal", 2: "axial"}
# Scanners round direction cosines; below this a volume counts as aligned.
OBLIQUE_DEGREES = 0.1
RAS, AS_STORED = "ras", "as_stored"


@dataclass(frozen=True)
class Slicing:
    """How volumes become slices: the config's ``orientation``, ``slice_plane`` and
    ``slice_axis``, resolved (``auto`` is decided by the format before this)."""

    orientation: str = RAS  # "ras" or "as_stored"
    plane: str = "axial"  # axial | coronal | sagittal | acquired (orientation=ras)
    slice_axis: int = 2  # orientation=as_stored: the raw array axis to slice along

    def describe(self) -> dict[str, Any]:
        """The dataset-wide part of the manifest's ``orientation`` record."""
        if self.orientation == AS_STORED:
            return {"frame": AS_STORED, "slice_axis": self.slice_axis,
                    "display": "stored voxel order: rows follow the first in-plane array "
                               "axis, columns the second"}
        record: dict[str, Any] = {"frame": "RAS+", "plane": self.plane}
        if self.plane in PLANE_AXES:
            rows, columns, slices = PLANE_AXES[self.plane]
            record.update(rows=rows, columns=columns, slices=slices,
                          display=DISPLAY[self.plane])
        else:
            record["display"] = ("per volume, the convention of the canonical plane closest "
                                 "to its stored slices: " + "; ".join(
                                     f"{p} {DISPLAY[p]}" for p in PLANE_AXES))
        return record


@dataclass(frozen=True)
class Oriented:
    """A volume laid out for slicing, and what was done to it."""

    volume: Volume
    source_axes: str  # the stored voxel axes as RAS codes ("LPS"), "" when unknown
    plane: str  # the plane its slices are in ("" for as_stored)
    oblique_degrees: float  # largest angle between a voxel axis and its canonical axis
    note: str | None  # a warning for the manifest, or None


def orient_volume(volume: Volume, slicing: Slicing) -> Oriented:
    """Permute and flip ``volume``'s image and mask (never resample) for slicing."""
    if slicing.orientation == AS_STORED:
        return Oriented(_move_slice_axis(volume, slicing.slice_axis), _codes(volume.affine),
                        "", _oblique_degrees(volume.affine), None)
    if volume.affine is None:
        return Oriented(_move_slice_axis(volume, 2), "", "", 0.0,
                        f"{volume.source}: no orientation in the file (no affine, or no "
                        "ImagePositionPatient/ImageOrientationPatient); sliced as stored")
    closest = io_orientation(volume.affine)  # per voxel axis: (world axis, direction)
    plane = slicing.plane
    if plane == "acquired":
        plane = _PLANE_OF_NORMAL[int(closest[2, 0])]
    target = axcodes2ornt(PLANE_AXES[plane])
    # per stored axis: the position it takes and whether it is reversed
    transform = np.zeros((3, 2))
    for axis in range(3):
        world, direction = closest[axis]
        position = int(np.flatnonzero(target[:, 0] == world)[0])
        transform[axis] = (position, direction * target[position, 1])
    degrees = _oblique_degrees(volume.affine)
    note = None
    if degrees > OBLIQUE_DEGREES:
        how = (f"its acquired slices are kept and laid out as {plane} ones"
               if slicing.plane == "acquired" else
               f"sliced along them ({plane}) without resampling")
        note = (f"{volume.source}: oblique volume, {degrees:.1f} degrees off the closest "
                f"RAS+ axes; {how}")
    return Oriented(_apply(volume, transform), _codes(volume.affine), plane, degrees, note)


def _apply(volume: Volume, transform: np.ndarray) -> Volume:
    spacing = [0.0, 0.0, 0.0]
    for axis in range(3):
        spacing[int(transform[axis, 0])] = volume.spacing[axis]
    mask = volume.mask
    if mask is not None:
        mask = np.ascontiguousarray(apply_orientation(mask, transform))
    return dataclasses.replace(
        volume, image=np.ascontiguousarray(apply_orientation(volume.image, transform)),
        mask=mask, spacing=(spacing[0], spacing[1], spacing[2]))


def _move_slice_axis(volume: Volume, slice_axis: int) -> Volume:
    if slice_axis == 2:
        return volume
    in_plane = [a for a in range(3) if a != slice_axis]
    transform = np.zeros((3, 2))
    for position, axis in enumerate([*in_plane, slice_axis]):
        transform[axis] = (position, 1)
    return _apply(volume, transform)


def _codes(affine: np.ndarray | None) -> str:
    return "" if affine is None else "".join(aff2axcodes(affine))


def _oblique_degrees(affine: np.ndarray | None) -> float:
    if affine is None:
        return 0.0
    return round(math.degrees(float(np.max(obliquity(affine)))), 3)
