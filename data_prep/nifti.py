"""NIfTI reading that keeps the stored dtype and reports bad files by name."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


class DataError(ValueError):
    """A source file is missing, corrupt or inconsistent; the message names it."""


def load_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Return the voxel array in its stored dtype and the voxel spacing (zooms).

    ``np.asanyarray(img.dataobj)`` keeps integer voxels integer when the header has no
    scaling, unlike ``get_fdata`` which would turn uint16 into float64.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
        zooms = tuple(float(z) for z in image.header.get_zooms())
    except DataError:
        raise
    except Exception as exc:  # nibabel raises many types for truncated or corrupt files
        raise DataError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from None
    if not data.dtype.isnative:  # big-endian files: same values, native byte order
        data = data.astype(data.dtype.newbyteorder("="))
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise DataError(f"{path}: contains NaN or Inf voxels")
    return data, zooms


def voxel_spacing(path: Path, zooms: tuple[float, ...]) -> tuple[float, float, float]:
    """The first three zooms, refusing missing or non-positive spacing."""
    if len(zooms) < 3 or any(z <= 0 for z in zooms[:3]):
        raise DataError(f"{path}: voxel spacing {zooms} is missing or not positive")
    return (zooms[0], zooms[1], zooms[2])


def check_labels(label_path: Path, labels: np.ndarray, label_spacing: tuple[float, ...],
                 image_path: Path, image_shape: tuple[int, ...],
                 image_spacing: tuple[float, ...], classes: dict[int, str],
                 declared_in: str) -> None:
    """A label volume must match its image in shape and spacing and use declared ids."""
    if labels.shape != image_shape:
        raise DataError(f"{label_path}: label shape {labels.shape} differs from image shape "
                        f"{image_shape} of {image_path.name}")
    if not np.allclose(label_spacing[:3], image_spacing[:3], rtol=1e-3):
        raise DataError(f"{label_path}: label spacing {tuple(label_spacing[:3])} differs from "
                        f"image spacing {tuple(image_spacing[:3])}")
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise DataError(f"{label_path}: label values are not integers")
    bad = np.setdiff1d(np.unique(labels), list(classes))
    if bad.size:
        raise DataError(f"{label_path}: label values {bad.tolist()} are not declared in "
                        f"{declared_in} {sorted(classes)}")
