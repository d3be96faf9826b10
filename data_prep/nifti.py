"""NIfTI reading that keeps the stored dtype and reports bad files by name."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from nibabel.orientations import aff2axcodes

from data_prep.errors import DataError


class NiftiData(NamedTuple):
    data: np.ndarray  # stored dtype
    zooms: tuple[float, ...]
    affine: np.ndarray | None  # voxel -> RAS+ mm; None when the header holds no orientation


def load_nifti(path: Path) -> NiftiData:
    """Return the voxel array in its stored dtype, the voxel spacing (zooms) and the affine.

    ``np.asanyarray(img.dataobj)`` keeps integer voxels integer when the header has no
    scaling, unlike ``get_fdata`` which would turn uint16 into float64. With neither an
    sform nor a qform code, nibabel's affine is a made-up default, so it is not used.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    try:
        image = nib.load(str(path))
        if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is a subclass
            raise DataError(f"{path}: not a NIfTI image ({type(image).__name__})")
        data = np.asanyarray(image.dataobj)
        zooms = tuple(float(z) for z in image.header.get_zooms())
        header = image.header
        known = int(header.get("sform_code", 0)) > 0 or int(header.get("qform_code", 0)) > 0
        affine = np.asarray(image.affine, dtype=np.float64) if known else None
    except DataError:
        raise
    except Exception as exc:  # nibabel raises many types for truncated or corrupt files
        raise DataError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from None
    if not data.dtype.isnative:  # big-endian files: same values, native byte order
        data = data.astype(data.dtype.newbyteorder("="))
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise DataError(f"{path}: contains NaN or Inf voxels")
    if affine is not None and not np.isfinite(affine).all():
        raise DataError(f"{path}: the affine holds NaN or Inf")
    return NiftiData(data, zooms, affine)


def voxel_spacing(path: Path, zooms: tuple[float, ...]) -> tuple[float, float, float]:
    """The first three zooms, refusing missing or non-positive spacing."""
    if len(zooms) < 3 or any(z <= 0 for z in zooms[:3]):
        raise DataError(f"{path}: voxel spacing {zooms} is missing or not positive")
    return (zooms[0], zooms[1], zooms[2])


def check_labels(label_path: Path, labels: np.ndarray, label_spacing: tuple[float, ...],
                 image_path: Path, image_shape: tuple[int, ...],
                 image_spacing: tuple[float, ...], classes: dict[int, str],
                 declared_in: str, label_affine: np.ndarray | None = None,
                 image_affine: np.ndarray | None = None) -> None:
    """A label volume must match its image in shape, spacing and voxel orientation, and
    use declared ids (a label stored in another voxel order would be reoriented wrongly)."""
    if labels.shape != image_shape:
        raise DataError(f"{label_path}: label shape {labels.shape} differs from image shape "
                        f"{image_shape} of {image_path.name}")
    if not np.allclose(label_spacing[:3], image_spacing[:3], rtol=1e-3):
        raise DataError(f"{label_path}: label spacing {tuple(label_spacing[:3])} differs from "
                        f"image spacing {tuple(image_spacing[:3])}")
    if label_affine is not None and image_affine is not None:
        label_axes, image_axes = aff2axcodes(label_affine), aff2axcodes(image_affine)
        if label_axes != image_axes:
            raise DataError(f"{label_path}: voxel axes {''.join(label_axes)} differ from "
                            f"{''.join(image_axes)} of {image_path.name}")
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise DataError(f"{label_path}: label values are not integers")
    bad = np.setdiff1d(np.unique(labels), list(classes))
    if bad.size:
        raise DataError(f"{label_path}: label values {bad.tolist()} are not declared in "
                        f"{declared_in} {sorted(classes)}")
