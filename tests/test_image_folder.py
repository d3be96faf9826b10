"""2D image folders and natural-image trees: exact reads, mask matching, grouping, errors.

Every file is written by the test; all images are a few pixels wide so the module runs in
well under a second.
"""

from __future__ import annotations

import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile

from data_prep.errors import DataError
from data_prep.image_folder import ImageFolderSource
from data_prep.natural_images import NaturalImageSource

RNG = np.random.default_rng(0)


def _png(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(path)
    return path


def _tiff(path: Path, pixels: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, pixels, **kwargs)
    return path


def _raw_png(path: Path, pixels: np.ndarray, color_type: int) -> Path:
    """A 16-bit PNG of any colour type, which Pillow cannot write."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    rows, cols = pixels.shape[:2]
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", cols, rows, 16, color_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _uint16() -> np.ndarray:
    pixels = RNG.integers(0, 65536, (5, 7), dtype=np.uint16)
    pixels[0, :3] = (0, 255, 65535)  # both ends and the 8-bit boundary
    return pixels


def _volumes(source, method: str = "pretrain_volumes") -> dict:
    return {v.name: v for p in source.patients() for v in getattr(source, method)(p)}


def _read_everything(source) -> None:
    for patient in source.patients():
        list(source.labeled_volumes(patient))
        list(source.pretrain_volumes(patient))


# -- medical image folders ----------------------------------------------------------------------
def test_png_and_tiff_read_bit_exact_in_stored_dtype(tmp_path: Path) -> None:
    images = tmp_path / "images"
    stack = RNG.integers(-3000, 3000, (3, 5, 7)).astype(np.int16)
    expected = {
        "png16": _uint16(),
        "png8": RNG.integers(0, 256, (5, 7), dtype=np.uint8),
        "tif16": _uint16(),
        "tif_int16": RNG.integers(-32768, 32768, (5, 7)).astype(np.int16),
        "tif_float": RNG.normal(size=(5, 7)).astype(np.float32),
    }
    for name, pixels in expected.items():
        if name.startswith("png"):
            _png(images / f"{name}.png", pixels)
        else:
            _tiff(images / f"{name}.tif", pixels)
    _tiff(images / "stack.tiff", stack, photometric="minisblack")

    source = ImageFolderSource(tmp_path, spacing=(0.5, 0.7))
    volumes = _volumes(source)
    assert set(volumes) == {*expected, "stack"}
    for name, pixels in expected.items():
        volume = volumes[name]
        assert volume.image.dtype == pixels.dtype and volume.image.shape == (5, 7, 1)
        np.testing.assert_array_equal(volume.image[:, :, 0], pixels)
        assert volume.spacing == (0.5, 0.7, 1.0) and volume.mask is None
    # pages of a multi-page TIFF are the slices of one volume
    assert volumes["stack"].image.shape == (5, 7, 3)
    np.testing.assert_array_equal(volumes["stack"].image, np.moveaxis(stack, 0, -1))
    assert not any(p.labeled for p in source.patients())


def test_masks_are_matched_by_name_across_extensions(tmp_path: Path) -> None:
    image_a, image_b = _uint16(), RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    mask_a = RNG.integers(0, 3, (5, 7), dtype=np.uint8)
    mask_b = RNG.integers(0, 3, (5, 7), dtype=np.uint8)
    _png(tmp_path / "images/a.png", image_a)
    _tiff(tmp_path / "masks/a.tif", mask_a)
    _tiff(tmp_path / "images/sub dir/b.tiff", image_b)
    palette = Image.fromarray(mask_b).convert("P")  # palette indices = class ids
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    (tmp_path / "masks/sub dir").mkdir(parents=True)
    palette.save(tmp_path / "masks/sub dir/b.png")
    _png(tmp_path / "images/c.png", image_b)  # unmasked: pretraining only
    (tmp_path / "images/._a.png").write_bytes(b"macOS resource fork, not an image")

    source = ImageFolderSource(tmp_path, classes={0: "bg", 1: "x", 2: "y"})
    assert [(p.name, p.labeled) for p in source.patients()] == [
        ("a", True), ("c", False), ("sub_dir_b", True)]
    labeled = _volumes(source, "labeled_volumes")
    assert set(labeled) == {"a", "sub_dir_b"}
    np.testing.assert_array_equal(labeled["a"].mask[:, :, 0], mask_a)
    np.testing.assert_array_equal(labeled["a"].image[:, :, 0], image_a)
    np.testing.assert_array_equal(labeled["sub_dir_b"].mask[:, :, 0], mask_b)
    assert labeled["a"].mask.dtype == np.uint8
    assert labeled["a"].files == (tmp_path / "images/a.png", tmp_path / "masks/a.tif")
    # every file is pretraining material, yielded without its mask
    pretrain = _volumes(source)
    assert set(pretrain) == {"a", "c", "sub_dir_b"}
    assert all(v.mask is None and len(v.files) == 1 for v in pretrain.values())


def test_patient_pattern_groups_files_and_mixed_patients_are_labeled(tmp_path: Path) -> None:
    pixels = RNG.integers(0, 256, (4, 4), dtype=np.uint8)
    for name in ("patient01_0", "patient01_1", "patient02_0"):
        _png(tmp_path / f"images/{name}.png", pixels)
    _png(tmp_path / "masks/patient01_1.png", (pixels > 128).astype(np.uint8))

    source = ImageFolderSource(tmp_path, patient_pattern=r"(patient\d+)_")
    patients = source.patients()
    assert [(p.name, p.number, p.labeled) for p in patients] == [
        ("patient01", 1, True), ("patient02", 2, False)]
    assert [v.name for v in source.labeled_volumes(patients[0])] == ["patient01_1"]
    assert [v.name for v in source.pretrain_volumes(patients[0])] == [
        "patient01_0", "patient01_1"]
    assert list(source.labeled_volumes(patients[1])) == []


def test_mask_values_map_stored_values_to_classes(tmp_path: Path) -> None:
    _png(tmp_path / "images/a.png", RNG.integers(0, 256, (4, 4), dtype=np.uint8))
    _png(tmp_path / "masks/a.png", np.array([[0, 255] * 2] * 4, dtype=np.uint8))
    with pytest.raises(DataError, match=r"a\.png.*\[255\].*mask_values"):
        _read_everything(ImageFolderSource(tmp_path))
    mask = _volumes(ImageFolderSource(tmp_path, mask_values={255: 1}), "labeled_volumes")
    np.testing.assert_array_equal(mask["a"].mask[:, :, 0], [[0, 1] * 2] * 4)


def test_colour_images_need_to_gray_unless_their_channels_are_equal(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    grey = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    _png(tmp_path / "images/colour.png", rgb)
    _png(tmp_path / "images/grey_as_rgb.png", np.repeat(grey[..., None], 3, axis=2))
    _tiff(tmp_path / "images/colour16.tif", (rgb.astype(np.uint16) * 257), photometric="rgb")

    volumes = _volumes(ImageFolderSource(tmp_path, to_gray=True))
    luma = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(volumes["colour"].image[:, :, 0], luma)
    np.testing.assert_array_equal(volumes["grey_as_rgb"].image[:, :, 0], grey)
    assert volumes["colour16"].image.dtype == np.uint16
    assert np.abs(volumes["colour16"].image[:, :, 0] / 257 - luma).max() <= 1


# -- natural images --------------------------------------------------------------------------------
def _natural_tree(root: Path) -> dict[str, Path]:
    rgb = RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    files = {
        "n01_a": root / "n01/a.JPEG",
        "n01_b": root / "n01/b.png",
        "n02_cmyk": root / "n02/cmyk.jpg",
        "n02_palette": root / "n02/palette.png",
        "n02_grey_alpha": root / "n02/grey_alpha.png",
    }
    _png(files["n01_a"], rgb)
    _png(files["n01_b"], rgb[:4])
    _png(files["n02_cmyk"], rgb, "CMYK")
    _png(files["n02_palette"], rgb, "P")
    _png(files["n02_grey_alpha"], rgb, "LA")
    return files


@pytest.mark.parametrize("channels", [1, 3])
def test_natural_images_match_pillow_conversion(tmp_path: Path, channels: int) -> None:
    files = _natural_tree(tmp_path)
    source = NaturalImageSource(tmp_path, channels=channels)
    assert source.classes == {0: "background"} and source.modality == "natural"
    volumes = _volumes(source)
    assert set(volumes) == set(files)
    for name, path in files.items():
        expected = np.asarray(Image.open(path).convert("L" if channels == 1 else "RGB"))
        image = volumes[name].image
        rows, cols = expected.shape[:2]
        assert image.dtype == np.uint8
        assert image.shape == ((rows, cols, 1) if channels == 1 else (rows, cols, 1, 3))
        np.testing.assert_array_equal(image[:, :, 0], expected)


def test_natural_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    _png(tmp_path / "n01/deep.png", np.array([[0, 257, 65535]], dtype=np.uint16))
    image = _volumes(NaturalImageSource(tmp_path))["n01_deep"].image
    np.testing.assert_array_equal(image[:, :, 0], [[0, 1, 255]])


def test_natural_images_are_chunked_in_sorted_order(tmp_path: Path) -> None:
    for name in ("e", "a", "c", "b", "d"):
        _png(tmp_path / f"cls/{name}.png", np.zeros((2, 2), np.uint8))
    source = NaturalImageSource(tmp_path, chunk_size=2)
    patients = source.patients()
    assert [(p.name, p.number, p.labeled) for p in patients] == [
        ("chunk000000", 0, False), ("chunk000001", 1, False), ("chunk000002", 2, False)]
    assert [[v.name for v in source.pretrain_volumes(p)] for p in patients] == [
        ["cls_a", "cls_b"], ["cls_c", "cls_d"], ["cls_e"]]
    assert list(source.labeled_volumes(patients[0])) == []


def test_sources_survive_pickling(tmp_path: Path) -> None:
    _png(tmp_path / "medical/images/p1.png", np.ones((3, 3), np.uint8))
    _natural_tree(tmp_path / "natural")
    for source in (ImageFolderSource(tmp_path / "medical"),
                   NaturalImageSource(tmp_path / "natural", chunk_size=2)):
        copy = pickle.loads(pickle.dumps(source))
        assert copy.patients() == source.patients()
        assert len(_volumes(copy)) == len(_volumes(source))


def test_skip_bad_leaves_out_files_discovery_cannot_place(tmp_path: Path) -> None:
    pixels = np.zeros((3, 3), np.uint8)
    for name in ("patient1_a.png", "patient1_a.tif", "stray.png"):
        (_tiff if name.endswith(".tif") else _png)(tmp_path / "images" / name, pixels)
    _png(tmp_path / "masks/orphan.png", pixels)
    source = ImageFolderSource(tmp_path, patient_pattern=r"(patient\d+)_", skip_bad=True)
    assert [p.name for p in source.patients()] == ["patient1"]
    assert [v.source.name for v in source.pretrain_volumes(source.patients()[0])] == [
        "patient1_a.png"]
    assert [Path(p.split(":")[0]).name for p in source.problems] == [
        "patient1_a.tif", "orphan.png", "stray.png"]

    _png(tmp_path / "natural/cls/a b.png", pixels)
    _png(tmp_path / "natural/cls/a_b.png", pixels)
    natural = NaturalImageSource(tmp_path / "natural", skip_bad=True)
    assert len(_volumes(natural)) == 1 and "a_b.png" in natural.problems[0]


def test_truncated_images_are_never_loaded_silently(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _png(tmp_path / "images/a.png", np.zeros((2, 2), np.uint8))
    source = ImageFolderSource(tmp_path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        _read_everything(source)


# -- bad input -------------------------------------------------------------------------------------
def _empty_medical(root: Path) -> tuple[Callable, str]:
    (root / "images").mkdir()
    return lambda: ImageFolderSource(root), "images"


def _empty_natural(root: Path) -> tuple[Callable, str]:
    (root / "cls").mkdir(parents=True)
    return lambda: NaturalImageSource(root), root.name


def _corrupt_png(root: Path) -> tuple[Callable, str]:
    (root / "images").mkdir()
    (root / "images/broken.png").write_bytes(b"not a png at all")
    return lambda: ImageFolderSource(root), "broken.png"


def _truncated_png(root: Path) -> tuple[Callable, str]:
    path = _png(root / "images/cut.png", RNG.integers(0, 256, (64, 64), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:300])
    return lambda: ImageFolderSource(root), "cut.png"


def _truncated_jpeg(root: Path) -> tuple[Callable, str]:
    path = root / "cls/cut.jpg"
    _png(path, RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return lambda: NaturalImageSource(root), "cut.jpg"


def _mask_shape_mismatch(root: Path) -> tuple[Callable, str]:
    _png(root / "images/scan7.png", np.zeros((4, 4), np.uint8))
    _png(root / "masks/scan7.png", np.zeros((4, 5), np.uint8))
    return lambda: ImageFolderSource(root), r"masks/scan7\.png.*images/scan7\.png"


def _mask_outside_classes(root: Path) -> tuple[Callable, str]:
    _png(root / "images/scan8.png", np.zeros((4, 4), np.uint8))
    _png(root / "masks/scan8.png", np.full((4, 4), 2, np.uint8))
    return lambda: ImageFolderSource(root), r"masks/scan8\.png.*\[2\]"


def _mask_without_image(root: Path) -> tuple[Callable, str]:
    _png(root / "images/scan1.png", np.zeros((4, 4), np.uint8))
    _png(root / "masks/orphan.png", np.zeros((4, 4), np.uint8))
    return lambda: ImageFolderSource(root), "orphan.png"


def _nan_in_float_tiff(root: Path) -> tuple[Callable, str]:
    _tiff(root / "images/holes.tif", np.array([[1.0, np.nan]], dtype=np.float32))
    return lambda: ImageFolderSource(root), "holes.tif.*NaN"


def _colour_without_to_gray(root: Path) -> tuple[Callable, str]:
    _png(root / "images/photo.png", RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return lambda: ImageFolderSource(root), "photo.png.*to_gray"


def _sixteen_bit_rgb_png(root: Path) -> tuple[Callable, str]:
    _raw_png(root / "images/deep_rgb.png", RNG.integers(0, 65536, (3, 4, 3)), color_type=2)
    return lambda: ImageFolderSource(root, to_gray=True), "deep_rgb.png.*16-bit"


def _tiff_pages_differ(root: Path) -> tuple[Callable, str]:
    path = root / "images/pages.tif"
    _tiff(path, np.zeros((4, 4), np.uint16))
    tifffile.imwrite(path, np.zeros((4, 5), np.uint16), append=True)
    return lambda: ImageFolderSource(root), "pages.tif.*pages differ"


def _same_stem_twice(root: Path) -> tuple[Callable, str]:
    _png(root / "images/twin.png", np.zeros((4, 4), np.uint8))
    _tiff(root / "images/twin.tif", np.zeros((4, 4), np.uint8))
    return lambda: ImageFolderSource(root), "twin"


def _pattern_does_not_match(root: Path) -> tuple[Callable, str]:
    _png(root / "images/anon.png", np.zeros((4, 4), np.uint8))
    return lambda: ImageFolderSource(root, patient_pattern=r"(patient\d+)"), "anon.png"


@pytest.mark.parametrize("case", [
    _empty_medical, _empty_natural, _corrupt_png, _truncated_png, _truncated_jpeg,
    _mask_shape_mismatch, _mask_outside_classes, _mask_without_image, _nan_in_float_tiff,
    _colour_without_to_gray, _sixteen_bit_rgb_png, _tiff_pages_differ, _same_stem_twice,
    _pattern_does_not_match,
], ids=lambda case: case.__name__.strip("_"))
def test_bad_input_raises_data_error_naming_the_file(tmp_path: Path, case: Callable) -> None:
    root = tmp_path / "dataset"
    root.mkdir()
    make_source, expected = case(root)
    with pytest.raises(DataError, match=expected):
        _read_everything(make_source())
