"""In-plane geometry: bring slices to the dataset's fixed size without touching intensities."""

from __future__ import annotations

import numpy as np


def center_pad_crop(array: np.ndarray, size: int, fill: float | int = 0) -> np.ndarray:
    """Pad (with ``fill``) or crop the first two axes symmetrically to ``size`` x ``size``.

    Lossless for the voxels it keeps and dtype-preserving, so uint16 stays uint16.
    """
    out = array
    for axis in (0, 1):
        length = out.shape[axis]
        if length > size:
            start = (length - size) // 2
            out = np.take(out, np.arange(start, start + size), axis=axis)
        elif length < size:
            before = (size - length) // 2
            widths = [(0, 0)] * out.ndim
            widths[axis] = (before, size - length - before)
            out = np.pad(out, widths, mode="constant", constant_values=fill)
    return np.ascontiguousarray(out)
