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


def load_nifti_header_shape(path: Path) -> tuple[int, ...]:
    """Shape from the header alone, without reading voxels (used to plan shard sizes)."""
    try:
        return tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as exc:
        raise DataError(f"{path}: cannot read NIfTI header ({type(exc).__name__}: {exc})") from None
