"""What prepared slices must look like, computed with nibabel alone (not medssl's code).

medssl lays axial slices out in the radiological display convention: rows run towards
posterior (anterior is up), columns towards the patient's left, slices towards superior.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def axial_layout(image: nib.Nifti1Image | str | Path) -> np.ndarray:
    """The image's voxels in RAS+ (nibabel's closest canonical), as (rows, columns,
    slices[, ...]) of medssl's axial slices."""
    if not isinstance(image, nib.Nifti1Image):
        image = nib.load(str(image))
    canonical = np.asanyarray(nib.as_closest_canonical(image).dataobj)  # x->R, y->A, z->S
    return np.flip(canonical, (0, 1)).swapaxes(0, 1)  # rows -> P, columns -> L


def centre_crop(array: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` of the first two axes (both at least ``size``)."""
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]
