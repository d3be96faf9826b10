"""Reader for ImageNet-style natural-image trees, the corpus of "generalist" pretraining.

Layout::

    ROOT/<class folder>/**/NAME.jpg|.jpeg|.png    (extensions case-insensitive: .JPEG)

Everything is unlabeled: the class folders are not segmentation classes. Images keep their
own size (the resize step of ``prepare`` brings them to a common one). With
``channels=1`` each becomes 8-bit luma, exactly Pillow's ``convert("L")``, of shape
``(rows, cols, 1)``; with ``channels=3`` RGB uint8 of shape ``(rows, cols, 1, 3)``. CMYK,
palette and grey+alpha images are converted by Pillow; alpha is dropped; 16-bit PNGs are
scaled to 8 bits (Pillow would clip them). Hidden files and folders are skipped.

With ``skip_bad``, a file whose volume name another file already has, or whose pixels
cannot be read, is left out and recorded in ``problems``: one corrupt JPEG costs that
image, not its chunk.

A million files must not become a million patients: the sorted file list is cut into
chunks of ``chunk_size`` files, patients ``chunk000000``, ``chunk000001``, ..., which are
the unit of parallel work.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_prep.errors import DataError
from data_prep.image_folder import (
    list_image_files,
    load_pillow_image,
    unique_volume_names,
    volume_name,
)
from data_prep.sources import SourcePatient
from data_prep.volume import Volume

NATURAL_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
_CHUNK_NAME = re.compile(r"chunk(\d{6,})$")
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L"})


class NaturalImageSource:
    """Unlabeled JPEG/PNG images under ``root``, grouped in chunks of ``chunk_size``."""

    format = "natural"
    modality = "natural"

    def __init__(self, root: str | Path, channels: int = 1, chunk_size: int = 256,
                 skip_bad: bool = False) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 (luma) or 3 (RGB), got {channels}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size: expected a positive number, got {chunk_size}")
        self.root = Path(root)
        self.channels, self.chunk_size = channels, chunk_size
        self.classes = {0: "background"}  # no segmentation classes
        self.problems: list[str] = []
        self._skip_bad = skip_bad
        if not self.root.is_dir():
            raise DataError(f"{self.root}: folder does not exist")
        # Plain strings keep the object small to pickle for the worker processes.
        files = list_image_files(self.root, NATURAL_SUFFIXES)
        if not files:
            raise DataError(f"{self.root}: no .jpg, .jpeg or .png images found")
        names = unique_volume_names(self.root, files, self.problems if skip_bad else None)
        self._files = [f for f in files if f in names]

    def patients(self) -> list[SourcePatient]:
        n_chunks = -(-len(self._files) // self.chunk_size)
        return [SourcePatient(f"chunk{i:06d}", i, labeled=False) for i in range(n_chunks)]

    def labeled_volumes(self, patient: SourcePatient) -> Iterator[Volume]:
        return iter(())

    def pretrain_volumes(self, patient: SourcePatient) -> Iterator[Volume]:
        start = self._chunk_index(patient.name) * self.chunk_size
        for relative in self._files[start:start + self.chunk_size]:
            path = self.root / relative
            try:
                image = read_natural_image(path, self.channels)
            except DataError as exc:
                if not self._skip_bad:
                    raise
                self.problems.append(str(exc))
                continue
            yield Volume(patient=patient.name, frame=0, image=image,
                         spacing=(1.0, 1.0, 1.0), source=path, name=volume_name(relative),
                         files=(path,))

    def _chunk_index(self, name: str) -> int:
        match = _CHUNK_NAME.fullmatch(name)
        if match is None or int(match.group(1)) * self.chunk_size >= len(self._files):
            raise KeyError(f"{self.root}: no chunk {name!r}")
        return int(match.group(1))


def read_natural_image(path: Path, channels: int) -> np.ndarray:
    """uint8 (rows, cols, 1) luma or (rows, cols, 1, 3) RGB."""
    image = load_pillow_image(path)
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = _sixteen_to_eight_bits(np.asarray(image))
        pixels = gray if channels == 1 else np.repeat(gray[..., None], 3, axis=-1)
    else:
        pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    return np.ascontiguousarray(pixels[:, :, None])


def _sixteen_to_eight_bits(gray: np.ndarray) -> np.ndarray:
    """Round(v / 257): 0..65535 onto 0..255, where Pillow's convert would clip at 255."""
    wide = np.clip(gray.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)
