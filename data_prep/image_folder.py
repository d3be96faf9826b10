"""Reader for folders of 2D medical images (PNG, TIFF) with optional masks.

Layout::

    ROOT/images/**/NAME.png|.tif|.tiff     one image per file (a multi-page TIFF: a stack)
    ROOT/masks/**/NAME.png|.tif|.tiff      optional: class ids, same relative path and stem

Every file is its own volume: a ``(rows, cols)`` image becomes ``(rows, cols, 1)`` (x is
the row axis, as for NIfTI), a multi-page TIFF whose pages all share shape and type
becomes ``(rows, cols, pages)``. The stored dtype is kept exactly (8/16-bit PNG, uint16,
int16 or float32 TIFF); float pixels must be finite.

Medical folders are expected to be grayscale. RGB files whose three channels are equal
are grayscale stored as RGB and read losslessly as one channel; other colour images are
an error unless ``to_gray=True``, which converts them with ITU-R 601 luma (the formula of
Pillow's ``convert("L")``). Alpha channels are ignored.

Files with a mask are labeled; files without one are unlabeled pretraining material. A
patient (every file by default, or the group that ``patient_pattern`` extracts from the
relative path) is labeled when any of its files has a mask. Hidden files and folders
(names starting with ``.``, such as macOS ``._x.png`` resource forks) are skipped.

With ``skip_bad``, a file that discovery cannot place (a mask without an image, a second
file of the same name, a path that ``patient_pattern`` does not match) is left out and the
error recorded in ``problems``; unreadable pixels are found later, by the volume methods.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile

from data_prep.errors import DataError
from data_prep.sources import SourcePatient
from data_prep.volume import Volume

MEDICAL_SUFFIXES = frozenset({".png", ".tif", ".tiff"})
DEFAULT_CLASSES = {0: "background", 1: "foreground"}

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_TRAILING_NUMBER = re.compile(r"(\d+)$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPES = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}
_GRAY_MODES = frozenset({"1", "L", "I", "I;16", "I;16B", "I;16L"})


class ImageEntry(NamedTuple):
    """One image file and its mask, as paths relative to images/ and masks/."""

    name: str
    image: str
    mask: str | None


class ImageFolderSource:
    """``ROOT/images`` (+ optional ``ROOT/masks``) of 2D PNG/TIFF files.

    ``classes`` declares the mask ids (default: binary background/foreground); a mask value
    outside them is an error. ``mask_values`` maps stored mask values to class ids first,
    e.g. ``{255: 1}`` for the common 0/255 binary masks. ``spacing`` is (row, col) or (row,
    col, slice) in mm; the slice spacing (of multi-page TIFF stacks) defaults to 1.0.
    """

    format = "images"

    def __init__(self, root: str | Path, patient_pattern: str | None = None,
                 classes: dict[int, str] | None = None,
                 spacing: tuple[float, ...] = (1.0, 1.0), modality: str = "OT",
                 to_gray: bool = False, mask_values: dict[int, int] | None = None,
                 skip_bad: bool = False) -> None:
        self.root = Path(root)
        self.problems: list[str] = []
        self._skip_bad = skip_bad
        self.modality = modality
        self.to_gray = to_gray
        self.classes = _checked_classes(DEFAULT_CLASSES if classes is None else classes)
        self.mask_values = _checked_mask_values(mask_values or {}, self.classes)
        self.spacing = _checked_spacing(spacing)
        pattern = _checked_pattern(patient_pattern)
        self._patients = self._group_by_patient(self._find_entries(), pattern)

    # -- discovery (file names only; pixels are read by the volume methods) ---------------
    def _find_entries(self) -> list[ImageEntry]:
        images_dir, masks_dir = self.root / "images", self.root / "masks"
        if not images_dir.is_dir():
            raise DataError(f"{self.root}: no images/ folder (expected "
                            "ROOT/images/**/*.png|tif|tiff and optional ROOT/masks/)")
        problems = self.problems if self._skip_bad else None
        images = _by_stem(images_dir, list_image_files(images_dir, MEDICAL_SUFFIXES),
                          problems)
        if not images:
            raise DataError(f"{images_dir}: no .png, .tif or .tiff images found")
        masks = (_by_stem(masks_dir, list_image_files(masks_dir, MEDICAL_SUFFIXES), problems)
                 if masks_dir.is_dir() else {})
        for stem, mask in masks.items():
            if stem not in images:
                report(problems, f"{masks_dir / mask}: mask has no image (expected "
                                 f"images/{stem}.png, .tif or .tiff)")
        names = unique_volume_names(images_dir, list(images.values()), problems)
        return [ImageEntry(names[image], image, masks.get(stem))
                for stem, image in images.items() if image in names]

    def _group_by_patient(self, entries: list[ImageEntry],
                          pattern: re.Pattern[str] | None) -> dict[str, list[ImageEntry]]:
        patients: dict[str, list[ImageEntry]] = {}
        for entry in entries:
            patient = entry.name if pattern is None else self._patient_of(entry, pattern)
            if patient is not None:
                patients.setdefault(patient, []).append(entry)
        if not patients:  # only with skip_bad: every file was left out
            raise DataError(f"{self.root / 'images'}: no usable images; "
                            f"{len(self.problems)} problem(s), the first: {self.problems[0]}")
        return patients

    def _patient_of(self, entry: ImageEntry, pattern: re.Pattern[str]) -> str | None:
        match = pattern.search(entry.image)
        if match is None or not match.group(1):
            report(self.problems if self._skip_bad else None,
                   f"{self.root / 'images' / entry.image}: relative path {entry.image!r} "
                   f"does not match patient_pattern {pattern.pattern!r}")
            return None
        return _UNSAFE.sub("_", match.group(1))

    # -- DatasetSource -----------------------------------------------------------------
    def patients(self) -> list[SourcePatient]:
        result = []
        for name, entries in sorted(self._patients.items()):
            number = _TRAILING_NUMBER.search(name)
            result.append(SourcePatient(name, int(number.group(1)) if number else None,
                                        labeled=any(e.mask is not None for e in entries)))
        return result

    def labeled_volumes(self, patient: SourcePatient) -> Iterator[Volume]:
        for entry in self._patients[patient.name]:
            if entry.mask is None:
                continue
            image_path = self.root / "images" / entry.image
            mask_path = self.root / "masks" / entry.mask
            image = read_medical_image(image_path, self.to_gray)
            mask = self._read_mask(mask_path, image_path, image.shape)
            yield Volume(patient=patient.name, frame=0, image=image, spacing=self.spacing,
                         source=image_path, mask=mask, name=entry.name,
                         files=(image_path, mask_path))

    def pretrain_volumes(self, patient: SourcePatient) -> Iterator[Volume]:
        """Every file of the patient, masked or not, without its mask (as nnU-Net's)."""
        for entry in self._patients[patient.name]:
            image_path = self.root / "images" / entry.image
            yield Volume(patient=patient.name, frame=0,
                         image=read_medical_image(image_path, self.to_gray),
                         spacing=self.spacing, source=image_path, name=entry.name,
                         files=(image_path,))

    # -- masks -----------------------------------------------------------------------------
    def _read_mask(self, mask_path: Path, image_path: Path,
                   image_shape: tuple[int, ...]) -> np.ndarray:
        mask = read_mask_file(mask_path)
        if mask.shape != image_shape:
            raise DataError(f"{mask_path}: mask shape {mask.shape} differs from image shape "
                            f"{image_shape} of {image_path}")
        if self.mask_values:
            mask = _remap(mask, self.mask_values)
        bad = np.setdiff1d(np.unique(mask), list(self.classes))
        if bad.size:
            hint = ("" if self.mask_values or 255 not in bad
                    else " (binary 0/255 masks: set mask_values={255: 1})")
            raise DataError(f"{mask_path}: mask values {bad.tolist()} are not declared "
                            f"classes {sorted(self.classes)}{hint}")
        return mask.astype(np.uint8)


# -- file discovery, shared with natural_images ---------------------------------------------
def list_image_files(folder: Path, suffixes: frozenset[str]) -> list[str]:
    """Sorted POSIX paths, relative to ``folder``, of the files with one of ``suffixes``
    (case-insensitive). Hidden files and folders are skipped; folder links are followed
    (datasets are often assembled from links) but each real folder is visited once."""
    found: list[str] = []
    visited: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        stat = os.stat(dirpath)
        if (stat.st_dev, stat.st_ino) in visited:  # a link cycle back to a visited folder
            dirnames.clear()
            continue
        visited.add((stat.st_dev, stat.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        relative = Path(dirpath).relative_to(folder)
        found.extend((relative / name).as_posix() for name in filenames
                     if not name.startswith(".") and Path(name).suffix.lower() in suffixes)
    return sorted(found)


def volume_name(relative: str) -> str:
    """Volume id of a file: its relative path without extension, with every character
    other than letters, digits, ``_`` and ``-`` replaced by ``_`` (WebDataset keys end at
    the first dot)."""
    return _UNSAFE.sub("_", _without_suffix(relative))


def report(problems: list[str] | None, message: str) -> None:
    """Raise a discovery problem, or (``skip_bad``: a list is given) record it."""
    if problems is None:
        raise DataError(message)
    problems.append(message)


def unique_volume_names(folder: Path, relatives: list[str],
                        problems: list[str] | None = None) -> dict[str, str]:
    """Relative path -> ``volume_name``; a file whose name another file already has is an
    error (or, with ``problems``, left out)."""
    owners: dict[str, str] = {}
    for relative in relatives:
        name = volume_name(relative)
        if name in owners:
            report(problems, f"{folder / relative}: its volume name {name!r} is also that "
                             f"of {owners[name]}; rename one of them")
        else:
            owners[name] = relative
    return {relative: name for name, relative in owners.items()}


def _by_stem(folder: Path, relatives: list[str],
             problems: list[str] | None) -> dict[str, str]:
    """Relative path without extension -> relative path; masks are matched on this."""
    stems: dict[str, str] = {}
    for relative in relatives:
        stem = _without_suffix(relative)
        if stem in stems:
            report(problems, f"{folder / relative}: same name as {stems[stem]} with another "
                             "extension; images and masks are matched by name, so names "
                             "must be unique")
        else:
            stems[stem] = relative
    return stems


def _without_suffix(relative: str) -> str:
    suffix = Path(relative).suffix
    return relative[: -len(suffix)] if suffix else relative


# -- pixel reading --------------------------------------------------------------------------
def read_medical_image(path: Path, to_gray: bool = False) -> np.ndarray:
    """(rows, cols, slices) in the stored dtype; colour only with ``to_gray``."""
    pixels = _read_pixels(path, labels=False)  # (slices, rows, cols[, 3])
    if pixels.ndim == 4:
        pixels = _colour_to_gray(path, pixels, to_gray)
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise DataError(f"{path}: contains NaN or Inf pixels")
    return np.ascontiguousarray(np.moveaxis(pixels, 0, -1))


def read_mask_file(path: Path) -> np.ndarray:
    """(rows, cols, slices) integer class ids (palette PNG/TIFF: the palette indices)."""
    mask = _read_pixels(path, labels=True)
    if mask.ndim == 4:
        if not _channels_equal(mask):
            raise DataError(f"{path}: colour mask; masks must hold class ids in one "
                            "channel (grayscale or palette)")
        mask = mask[..., 0]
    if mask.dtype.kind == "f":
        if not (np.isfinite(mask).all() and np.array_equal(mask, np.round(mask))):
            raise DataError(f"{path}: mask values are not integers")
        mask = mask.astype(np.int64)
    return np.ascontiguousarray(np.moveaxis(mask, 0, -1))


def _read_pixels(path: Path, labels: bool) -> np.ndarray:
    """(slices, rows, cols) grayscale or (slices, rows, cols, 3) colour, stored dtype."""
    if path.suffix.lower() == ".png":
        pixels = _read_png(path, labels)[None]
    else:
        pixels = _read_tiff(path, labels)
    if pixels.dtype == bool:  # 1-bit images
        return pixels.astype(np.uint8)
    if pixels.dtype.kind not in "uif":
        raise DataError(f"{path}: unsupported pixel type {pixels.dtype}")
    if not pixels.dtype.isnative:  # big-endian files: same values, native byte order
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    return pixels


def load_pillow_image(path: Path) -> Image.Image:
    """Open and fully decode an image with Pillow; any failure is a DataError.

    Decoding here (``load``) is what catches truncated files: Pillow raises on them only
    while ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False, so a library that turned it on
    would let half-grey images through silently; refuse to run in that state.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some "
                           "imported library): truncated images would pass unnoticed")
    try:
        with Image.open(path) as image:  # leaving the block closes the file, keeps pixels
            image.load()
    except Exception as exc:  # Pillow raises many types for corrupt or truncated files
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
    return image


def _read_png(path: Path, labels: bool) -> np.ndarray:
    """(rows, cols) or (rows, cols, 3) exactly as stored: 16-bit stays uint16, palette
    masks give their indices, 2/4-bit greys their stored values (Pillow rescales them)."""
    depth, color_type = _png_header(path)
    if depth == 16 and color_type in (2, 4, 6):
        raise DataError(f"{path}: 16-bit {_PNG_COLOR_TYPES[color_type]} PNG; Pillow reads "
                        "only 8 of its bits. Save it as 16-bit grayscale PNG or as TIFF")
    image = load_pillow_image(path)
    if labels and image.mode in ("P", "PA"):
        return np.asarray(image.getchannel(0))  # palette indices are the class ids
    if image.mode in _GRAY_MODES:
        pixels = np.asarray(image)
        if image.mode == "I":  # older Pillow opens 16-bit greys as int32
            pixels = pixels.astype(np.uint16)
        if color_type == 0 and depth in (2, 4):
            pixels = pixels // (255 // (2**depth - 1))
        return pixels
    if image.mode in ("LA", "La"):
        return np.asarray(image.getchannel("L"))
    return np.asarray(image.convert("RGB"))  # RGB(A), palette: decided by the caller


def _png_header(path: Path) -> tuple[int, int]:
    """Bit depth and colour type from the IHDR chunk, which Pillow does not expose."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(26)
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc})") from None
    if len(head) < 26 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise DataError(f"{path}: not a PNG file (no PNG signature and IHDR header)")
    return head[24], head[25]


def _read_tiff(path: Path, labels: bool) -> np.ndarray:
    """(pages, rows, cols) or (pages, rows, cols, 3): the pages of a multi-page TIFF are
    the slices of one volume, so they must share shape, dtype and colour layout."""
    import tifffile  # only TIFF folders need it

    try:
        with tifffile.TiffFile(path) as tif:
            # TiffPage.aspage() is itself; a TiffFrame (only with useframes) reads its page
            pages = [page.aspage() for page in tif.pages]
            if not pages:
                raise DataError(f"{path}: TIFF file has no pages")
            layouts = {(p.shape, str(p.dtype), int(p.photometric), int(p.planarconfig))
                       for p in pages}
            if len(layouts) > 1:
                found = sorted(f"{'x'.join(map(str, shape))} {dtype}"
                               for shape, dtype, *_ in layouts)
                raise DataError(f"{path}: its {len(pages)} pages differ in shape, type or "
                                f"colour layout ({', '.join(found)}); a multi-page TIFF is "
                                "read as one volume, so all pages must match")
            pixels = np.stack([page.asarray() for page in pages])
            first = pages[0]
            photometric, planar = int(first.photometric), int(first.planarconfig)
            samples = int(first.samplesperpixel)
    except DataError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files or codecs
        raise DataError(f"{path}: cannot read TIFF ({type(exc).__name__}: {exc})") from None
    return _tiff_samples(path, pixels, photometric, planar, samples, labels)


def _tiff_samples(path: Path, pixels: np.ndarray, photometric: int, planar: int,
                  samples: int, labels: bool) -> np.ndarray:
    """Grey pages as they are, colour pages as RGB in the last axis, alpha dropped."""
    import tifffile

    kind = tifffile.PHOTOMETRIC
    if samples > 1 and planar == tifffile.PLANARCONFIG.SEPARATE:
        pixels = np.moveaxis(pixels, 1, -1)  # (pages, samples, rows, cols) -> samples last
    if samples == 1 and (photometric == kind.MINISBLACK
                         or (photometric == kind.PALETTE and labels)):  # indices = ids
        result, expected_ndim = pixels, 3
    elif samples == 2 and photometric == kind.MINISBLACK:  # grey + alpha
        result, expected_ndim = pixels[..., 0], 3
    elif samples >= 3 and photometric == kind.RGB:
        result, expected_ndim = pixels[..., :3], 4
    else:
        raise DataError(f"{path}: unsupported TIFF layout ({_photometric_name(photometric)}, "
                        f"{samples} samples per pixel); expected grayscale (MinIsBlack) or "
                        "RGB")
    if result.ndim != expected_ndim:  # e.g. volumetric (ImageDepth) tiles
        raise DataError(f"{path}: unexpected TIFF page shape {pixels.shape[1:]}")
    return result


def _photometric_name(value: int) -> str:
    import tifffile

    try:
        return tifffile.PHOTOMETRIC(value).name
    except ValueError:
        return f"photometric {value}"


# -- colour -----------------------------------------------------------------------------------
def _channels_equal(rgb: np.ndarray) -> bool:
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all())


def _colour_to_gray(path: Path, rgb: np.ndarray, to_gray: bool) -> np.ndarray:
    if _channels_equal(rgb):  # grey saved as RGB: one channel is exact
        return rgb[..., 0]
    if not to_gray:
        raise DataError(f"{path}: colour (RGB) image; medical image folders are expected "
                        "grayscale (set to_gray=True to convert with ITU-R 601 luma)")
    return luma(rgb)


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma in the input dtype; for integers the fixed-point formula of Pillow's
    ``convert("L")``, so 8-bit results equal Pillow's exactly."""
    if rgb.dtype.kind == "f":
        return (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]).astype(
            rgb.dtype)
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(rgb.dtype)


# -- options ----------------------------------------------------------------------------------
def _remap(mask: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    values, inverse = np.unique(mask, return_inverse=True)
    mapped = np.array([mapping.get(int(v), int(v)) for v in values], dtype=np.int64)
    return mapped[inverse].reshape(mask.shape)


def _checked_classes(classes: dict[int, str]) -> dict[int, str]:
    ids = sorted(int(k) for k in classes)
    if ids != list(range(len(ids))) or not 1 <= len(ids) <= 256:
        raise ValueError(f"classes: ids must be 0..n-1 with n <= 256 (masks are "
                         f"uint8), got {ids}")
    return {int(k): str(v) for k, v in sorted(classes.items())}


def _checked_mask_values(mapping: dict[int, int], classes: dict[int, str]) -> dict[int, int]:
    bad = sorted(v for v in mapping.values() if v not in classes)
    if bad:
        raise ValueError(f"mask_values: targets {bad} are not declared classes "
                         f"{sorted(classes)}")
    return {int(k): int(v) for k, v in mapping.items()}


def _checked_spacing(spacing: tuple[float, ...]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) not in (2, 3) or any(not s > 0 for s in values):
        raise ValueError(f"spacing: expected 2 or 3 positive values in mm, got {spacing}")
    return (values[0], values[1], values[2] if len(values) == 3 else 1.0)


def _checked_pattern(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"patient_pattern: invalid regular expression ({exc})") from None
    if compiled.groups != 1:
        raise ValueError(f"patient_pattern: needs exactly one group, {pattern!r} has "
                         f"{compiled.groups}")
    return compiled
