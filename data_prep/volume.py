"""The in-memory unit every reader yields: one 3D image volume, its mask, its metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Volume:
    """A 3D volume (x, y, slice) in its stored dtype, with an optional label volume.

    ``image`` keeps the source dtype (uint16/int16 MRI or CT stays lossless until
    normalisation). ``frame`` is the 1-based cine frame number for cardiac data and 0 for
    static volumes.
    """

    patient: str
    frame: int
    image: np.ndarray
    spacing: tuple[float, float, float]
    source: Path
    mask: np.ndarray | None = None
    meta: dict[str, str | int | float] = field(default_factory=dict)

    @property
    def volume_id(self) -> str:
        return f"{self.patient}_frame{self.frame:02d}"

    @property
    def n_slices(self) -> int:
        return int(self.image.shape[2])
