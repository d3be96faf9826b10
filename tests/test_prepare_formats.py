"""Every reader through the whole of prepare: shards, zarr store and manifest read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.prepare import PrepareConfig, prepare_dataset
from data_prep.shard_reader import IndexedShards, iterate_shards, shard_paths
from data_prep.verify import verify_dataset
from data_prep.zarr_store import LabeledSlices
from tests.conftest import small_pretrain_config


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six patients of three 16-bit slices each; masks for the first five patients."""
    root = tmp_path_factory.mktemp("png") / "scans"
    rng = np.random.default_rng(3)
    for patient in range(1, 7):
        for index in range(3):
            name = f"case{patient:02d}_slice{index}.png"
            image = rng.integers(0, 65536, (40, 48), dtype=np.uint16)
            _write_png(root / "images" / name, image)
            if patient <= 5:
                mask = np.zeros((40, 48), np.uint8)
                mask[10:20, 12:30] = 1 + index % 2
                _write_png(root / "masks" / name, mask)
    return root


def test_png_folder_round_trips_exactly_with_patient_splits(png_folder: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    manifest = prepare_dataset(PrepareConfig(
        source=str(png_folder), out=str(out), format="images", name="pngs", image_size=48,
        patient_pattern=r"^(case\d+)_", classes={0: "background", 1: "a", 2: "b"},
        val_fraction=0.2, test_fraction=0.2, min_shards=2, workers=2), progress=False)
    assert manifest.classes == {"0": "background", "1": "a", "2": "b"}
    assert manifest.splits["unlabeled"] == ["case06"]
    labeled = [p for s in ("train", "val", "test") for p in manifest.splits[s]]
    assert sorted(labeled) == [f"case{i:02d}" for i in range(1, 6)]
    assert all(manifest.splits[s] for s in ("train", "val", "test"))
    assert verify_dataset(out) == []

    def original(volume: str) -> tuple[np.ndarray, np.ndarray | None]:
        stem = next(p for p in (png_folder / "images").iterdir()
                    if volume.endswith(p.stem))
        mask_path = png_folder / "masks" / stem.name
        raw = np.asarray(Image.open(stem))
        # 40 rows padded to 48 with the image minimum, centred (4 above, 4 below)
        padded = np.full((48, 48), raw.min(), np.uint16)
        padded[4:44] = raw
        mask = None
        if mask_path.is_file():
            mask = np.zeros((48, 48), np.uint8)
            mask[4:44] = np.asarray(Image.open(mask_path))
        return padded, mask

    seen = 0
    for sample in iterate_shards(shard_paths(out)):
        image, mask = original(sample.meta["volume"])
        assert sample.raw.dtype == np.uint16
        np.testing.assert_array_equal(sample.raw, image)
        if mask is not None:
            np.testing.assert_array_equal(sample.mask, mask)
        seen += 1
    assert seen == 3 * (len(manifest.splits["train"]) + 1)  # train patients + unlabeled
    store = LabeledSlices(out / "labeled.zarr", "val")
    for index in range(len(store)):
        image, mask = original(store.volume_of(index))
        np.testing.assert_array_equal(store.raw(index)[0], image)
        np.testing.assert_array_equal(store.raw(index)[1], mask)


def test_natural_images_in_colour_feed_a_three_channel_encoder(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    root = tmp_path / "natural"
    for klass in ("n01", "n02"):
        for index in range(5):
            size = (int(rng.integers(30, 60)), int(rng.integers(30, 60)))
            _write_png(root / klass / f"img{index}.png",
                       rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    corrupt = root / "n02" / "img9.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "prepared"
    manifest = prepare_dataset(PrepareConfig(
        source=str(root), out=str(out), format="natural", name="natural", image_size=32,
        channels=3, chunk_size=4, min_shards=2, workers=2, skip_bad=True), progress=False)
    # the corrupt file alone is left out (not its chunk), and named in the manifest
    assert [w["patient"] for w in manifest.warnings] == ["chunk000002"]
    assert "img9.png" in manifest.warnings[0]["problem"]
    assert manifest.channels == 3 and manifest.splits["unlabeled"] == [
        "chunk000000", "chunk000001", "chunk000002"]
    assert manifest.counts["pretrain_slices"] == 10
    assert manifest.counts["labeled_slices"] == {"train": 0, "val": 0, "test": 0}
    for sample in iterate_shards(shard_paths(out)):
        assert sample.raw.shape == (3, 32, 32) and sample.raw.dtype == np.uint8
    (image,) = IndexedShards(out).read([0])
    assert image.shape == (3, 32, 32) and image.dtype == np.float32

    from pretrain.engine import pretrain

    config = small_pretrain_config(out, tmp_path / "run")
    with pytest.raises(ValueError, match=r"model\.in_chans is 1 but .* holds 3-channel"):
        pretrain(config)


def test_dicom_series_with_seg_through_prepare(tmp_path: Path) -> None:
    from tests.test_dicom import example_labels, write_seg, write_series

    root = tmp_path / "dicom"
    expected = {}
    for number in range(1, 6):
        sources = write_series(root / f"P{number:03d}" / "ct", patient_id=f"P{number:03d}",
                               seed=number)
        if number <= 4:
            labels = example_labels(sources)
            write_seg(root / f"P{number:03d}" / "seg.dcm", sources, labels)
            expected[f"P{number:03d}"] = labels
    out = tmp_path / "prepared"
    manifest = prepare_dataset(PrepareConfig(
        source=str(root), out=str(out), format="dicom", name="ct", image_size=128,
        normalization="ct_window", val_fraction=0.25, test_fraction=0.25, min_shards=2,
        workers=2), progress=False)
    assert manifest.modality == "CT"
    assert manifest.classes == {"0": "background", "1": "liver", "2": "tumor"}
    assert manifest.splits["unlabeled"] == ["P005"]
    seg_files = [name for name in manifest.source_files if name.endswith("seg.dcm")]
    assert len(seg_files) == 4 and len(manifest.source_files) == 4 + 5 * 5
    assert verify_dataset(out) == []
    for split in ("val", "test"):
        store = LabeledSlices(out / "labeled.zarr", split)
        assert len(store) == 5
        for index in range(len(store)):
            image, mask = store.raw(index)
            assert image.dtype == np.int16  # Hounsfield units, kept integral
            # an axial series (rows towards posterior, columns towards the patient's left)
            # already has the display layout: the store holds the SEG's (row, column)
            labels = expected[store.patient_of(index)][int(store.slices[index])]
            np.testing.assert_array_equal(mask, labels)
