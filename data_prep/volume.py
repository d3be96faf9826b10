"""The in-memory unit every reader yields: one 3D image volume, its mask, its metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Volume:
    """A volume (x, y, slice) or (x, y, slice, channel) in its stored dtype, with an
    optional label volume (x, y, slice).

    ``image`` keeps the source dtype (uint16/int16 MRI or CT stays lossless until
    normalisation); a channel axis exists only for multi-channel data (RGB natural
    images). ``frame`` is the 1-based cine frame number for cardiac data and 0 for static
    volumes. ``name`` identifies the volume within its dataset where patient and frame do
    not (2D image folders: one volume per file). ``files`` lists every source file the
    volume was read from (image, mask, each DICOM slice); checksums are taken of these.
    ``affine`` places the stored voxels in patient space, so that ``data_prep.orientation``
    can lay every source out the same way before slicing.
    """

    patient: str
    frame: int
    image: np.ndarray
    spacing: tuple[float, float, float]
    source: Path
    mask: np.ndarray | None = None
    meta: dict[str, str | int | float] = field(default_factory=dict)
    name: str = ""
    files: tuple[Path, ...] = ()
    affine: np.ndarray | None = None  # voxel (x, y, slice) -> RAS+ mm; None: unknown

    @property
    def volume_id(self) -> str:
        return self.name or f"{self.patient}_frame{self.frame:02d}"

    @property
    def n_slices(self) -> int:
        return int(self.image.shape[2])

    @property
    def channels(self) -> int:
        return int(self.image.shape[3]) if self.image.ndim == 4 else 1

    @property
    def source_files(self) -> tuple[Path, ...]:
        return self.files or (self.source,)
