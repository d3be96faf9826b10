"""nnU-Net v2 / MSD layouts, random patient splits and the normalisation schemes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path as nibabel_data

from data_prep.acdc import discover_patients
from data_prep.errors import DataError
from data_prep.manifest import Manifest
from data_prep.normalize import (
    NormParams,
    apply_norm,
    ct_window_params,
    percentile_params,
)
from data_prep.prepare import PrepareConfig, prepare_dataset
from data_prep.shard_reader import iterate_shards, shard_paths
from data_prep.zarr_store import LabeledSlices
from tests.anatomy import axial_layout, centre_crop


def _save(path: Path, data: np.ndarray, zooms: tuple[float, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, np.diag([*zooms[:3], 1.0]))
    image.header.set_zooms(zooms)
    nib.save(image, str(path))


def _nifti(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def nnunet_root(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom's ED frames as an nnU-Net v2 dataset; two patients' ES frames unlabeled."""
    root = tmp_path_factory.mktemp("nnunet") / "Dataset901_Phantom"
    patients = discover_patients(phantom_root)
    for patient in patients[:10]:
        case = f"heart_{patient.number:03d}"
        image = nib.load(str(patient.frame_path(patient.ed_frame)))
        zooms = image.header.get_zooms()
        _save(root / "imagesTr" / f"{case}_0000.nii.gz", np.asanyarray(image.dataobj), zooms)
        _save(root / "labelsTr" / f"{case}.nii.gz",
              _nifti(patient.frame_path(patient.ed_frame, label=True)), zooms)
    for patient in patients[10:]:
        image = nib.load(str(patient.frame_path(patient.es_frame)))
        _save(root / "imagesTs" / f"heart_{patient.number:03d}_0000.nii.gz",
              np.asanyarray(image.dataobj), image.header.get_zooms())
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "cineMRI"},
        "labels": {"background": 0, "RV": 1, "MYO": 2, "LV": 3},
        "numTraining": 10, "file_ending": ".nii.gz",
    }))
    return root


def test_nnunet_dataset_prepares_with_random_patient_split(nnunet_root: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    manifest = prepare_dataset(PrepareConfig(
        source=str(nnunet_root), out=str(out), format="nnunet", name="phantom-nnunet",
        image_size=64, val_fraction=0.2, test_fraction=0.2, min_shards=2), progress=False)
    assert manifest.class_names == ["background", "RV", "MYO", "LV"]
    assert manifest.modality == "cineMRI"
    splits = manifest.splits
    labeled = [s for name in ("train", "val", "test") for s in splits[name]]
    assert sorted(labeled) == [f"heart_{n:03d}" for n in range(1, 11)]
    assert len(set(labeled)) == 10 and len(splits["val"]) == len(splits["test"]) == 2
    assert splits["unlabeled"] == ["heart_011", "heart_012"]
    in_shards = {s.meta["patient"] for s in iterate_shards(shard_paths(out))}
    assert in_shards == set(splits["train"]) | set(splits["unlabeled"])
    for split in ("train", "val", "test"):
        store = LabeledSlices(out / "labeled.zarr", split)
        assert set(store.patients) == set(splits[split])
        for index in range(len(store)):
            case, z = store.patient_of(index), int(store.slices[index])
            image, mask = store.raw(index)
            np.testing.assert_array_equal(
                image, axial_layout(nnunet_root / "imagesTr" / f"{case}_0000.nii.gz")[:, :, z])
            np.testing.assert_array_equal(
                mask, axial_layout(nnunet_root / "labelsTr" / f"{case}.nii.gz")[:, :, z])
    # The same seed gives the same split; another seed another one.
    again = prepare_dataset(PrepareConfig(
        source=str(nnunet_root), out=str(tmp_path / "again"), format="nnunet", image_size=64,
        val_fraction=0.2, test_fraction=0.2, min_shards=2), progress=False)
    assert again.splits == splits


def test_msd_layout_with_4d_channels_and_bundled_nifti(tmp_path: Path) -> None:
    """MSD: dataset.json lists cases; 4D test images hold channels in their last axis."""
    root = tmp_path / "Task99_Brain"
    anatomical = nib.load(str(Path(nibabel_data) / "anatomical.nii"))
    volume = np.asanyarray(anatomical.dataobj).astype(np.int16)
    labels = (volume > np.percentile(volume, 70)).astype(np.uint8)
    zooms = anatomical.header.get_zooms()
    _save(root / "imagesTr" / "brain_001.nii.gz", volume, zooms)
    _save(root / "labelsTr" / "brain_001.nii.gz", labels, zooms)
    (root / "imagesTs").mkdir()
    shutil.copy(Path(nibabel_data) / "example4d.nii.gz", root / "imagesTs" / "brain_101.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "brain", "modality": {"0": "T1", "1": "T2"},
        "labels": {"0": "background", "1": "bright"},
        "training": [{"image": "./imagesTr/brain_001.nii.gz",
                      "label": "./labelsTr/brain_001.nii.gz"}],
        "test": ["./imagesTs/brain_101.nii.gz"],
    }))
    out = tmp_path / "prepared"
    manifest = prepare_dataset(PrepareConfig(
        source=str(root), out=str(out), format="nnunet", channel=1, image_size=48,
        split="random", val_fraction=0.0, test_fraction=0.0, min_shards=2,
        normalization="percentile"), progress=False)
    assert manifest.modality == "T2"
    assert manifest.splits["unlabeled"] == ["brain_101"]
    source = axial_layout(root / "imagesTs" / "brain_101.nii.gz")
    seen = 0
    for sample in iterate_shards(shard_paths(out)):
        if sample.meta["patient"] != "brain_101":
            continue
        z = sample.meta["slice"]
        # in-plane centre-cropped to 48 x 48, channel 1, dtype kept
        expected = centre_crop(source[:, :, z, 1], 48)
        assert sample.raw.dtype == np.int16
        np.testing.assert_array_equal(sample.raw, expected)
        low, high = sample.meta["norm"][2:]
        assert low is not None and high is not None and low < high
        seen += 1
    assert seen == source.shape[2]


def test_bad_nnunet_inputs_name_the_file(nnunet_root: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(nnunet_root, broken)
    config = PrepareConfig(source=str(broken), out=str(tmp_path / "o"), format="nnunet",
                           image_size=64)
    spec = json.loads((broken / "dataset.json").read_text())
    (broken / "dataset.json").write_text(json.dumps({**spec, "labels": {"bg": 0, "LV": 3}}))
    with pytest.raises(DataError, match=r"dataset\.json: label ids must be 0\.\.1"):
        prepare_dataset(config, progress=False)
    (broken / "dataset.json").write_text(json.dumps(spec))
    label_path = broken / "labelsTr" / "heart_003.nii.gz"
    label = nib.load(str(label_path))
    data = np.asanyarray(label.dataobj).copy()
    data[0, 0, 0] = 7
    _save(label_path, data, label.header.get_zooms())
    with pytest.raises(DataError, match=r"heart_003\.nii\.gz: label values \[7\]"):
        prepare_dataset(config, progress=False)
    _save(label_path, data[:-1], label.header.get_zooms())
    with pytest.raises(DataError, match=r"heart_003\.nii\.gz: label shape"):
        prepare_dataset(config, progress=False)
    (broken / "dataset.json").write_text('{"labels": {"background": 0,')
    with pytest.raises(DataError, match=r"dataset\.json: not valid JSON"):
        prepare_dataset(config, progress=False)
    (broken / "dataset.json").unlink()
    with pytest.raises(DataError, match=r"dataset\.json is missing"):
        prepare_dataset(config, progress=False)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_normalisation_schemes_clip_then_standardise() -> None:
    rng = np.random.default_rng(0)
    ct = rng.integers(-1024, 3000, size=(16, 16, 3)).astype(np.int16)
    params = ct_window_params(ct, (-160.0, 240.0))
    clipped = np.clip(ct.astype(np.float64), -160, 240)
    out = apply_norm(ct, params)
    np.testing.assert_allclose(out, (clipped - clipped.mean()) / clipped.std(), rtol=1e-4,
                               atol=1e-4)
    assert out.dtype == np.float32
    stored = NormParams.from_values(params.as_array())
    assert stored == params
    mri = rng.gamma(2.0, 100.0, size=(16, 16, 3)).astype(np.uint16)
    robust = percentile_params(mri, (1.0, 99.0))
    assert robust.low == pytest.approx(np.percentile(mri, 1.0))
    assert robust.high == pytest.approx(np.percentile(mri, 99.0))
    plain = NormParams.from_values([10.0, 2.0])
    np.testing.assert_allclose(apply_norm(np.array([14], np.uint16), plain), [2.0])
    with pytest.raises(ValueError, match="low < high"):
        ct_window_params(ct, (100.0, -100.0))


def test_manifest_of_nnunet_dataset_reads_back(nnunet_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    prepare_dataset(PrepareConfig(source=str(nnunet_root), out=str(out), format="nnunet",
                                  image_size=64, normalization="fixed", fixed_mean=300.0,
                                  fixed_std=100.0, min_shards=2), progress=False)
    manifest = Manifest.read(out)
    assert manifest.normalization["kind"] == "fixed"
    store = LabeledSlices(out / "labeled.zarr", "train")
    image, _ = store[0]
    raw, _ = store.raw(0)
    np.testing.assert_allclose(image, (raw.astype(np.float32) - 300) / 100, rtol=1e-6)
