"""The prepared dataset: exact round trips, patient-level splits, verification."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cluster.storage import join
from cluster.storage.objects import delete, read_bytes, write_bytes
from data_prep.acdc import discover_patients
from data_prep.errors import DataError
from data_prep.manifest import Manifest
from data_prep.prepare import PrepareConfig, prepare_dataset
from data_prep.shard_reader import index_location, iterate_shards, shard_paths
from data_prep.verify import verify_dataset
from data_prep.zarr_store import LabeledSlices
from tests.anatomy import axial_layout
from tests.s3_support import S3Server, upload_tree


def _nifti(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_manifest_describes_the_dataset(prepared: Path) -> None:
    manifest = Manifest.read(prepared)
    assert manifest.class_names == ["BG", "RV", "MYO", "LV"]
    assert manifest.splits["test"] == ["patient001", "patient011"]
    assert manifest.splits["val"] == ["patient002", "patient012"]
    assert len(manifest.splits["train"]) == 8
    assert len(manifest.shards) >= 4  # more shards than loader workers
    for shard in manifest.shards:  # with the index DALI's webdataset reader needs
        index = (prepared / "shards" / shard["name"]).with_suffix(".idx")
        assert index.read_text().startswith(f"v1.2 {shard['samples']}\n")
    assert sum(s["samples"] for s in manifest.shards) == manifest.counts["pretrain_slices"]
    assert manifest.spacing_stats["min"][2] >= 5.0  # slice thickness from the NIfTI headers
    # the pathology group of every patient, from Info.cfg, in the manifest and the samples
    groups = {name: meta["group"] for name, meta in manifest.patient_meta.items()}
    assert sorted(groups) == [f"patient{i:03d}" for i in range(1, 13)]
    assert set(groups.values()) <= {"NOR", "MINF", "DCM", "HCM", "RV"}
    sample = next(iter(iterate_shards(shard_paths(prepared))))
    assert sample.meta["info"] == {"group": groups[sample.meta["patient"]]}


def test_splits_are_disjoint_by_patient(prepared: Path) -> None:
    manifest = Manifest.read(prepared)
    store = prepared / "labeled.zarr"
    seen: dict[str, str] = {}
    for split in ("train", "val", "test"):
        patients = set(LabeledSlices(store, split).patients)
        assert patients == set(manifest.splits[split])
        for patient in patients:
            assert patient not in seen, f"{patient} in {seen.get(patient)} and {split}"
            seen[patient] = split


def test_shards_round_trip_bit_exact_and_hold_no_eval_patient(prepared: Path,
                                                               phantom_root: Path) -> None:
    manifest = Manifest.read(prepared)
    train = set(manifest.splits["train"])
    patients = {p.name: p for p in discover_patients(phantom_root)}
    cines: dict[str, np.ndarray] = {}
    count = 0
    for sample in iterate_shards(shard_paths(prepared)):
        meta = sample.meta
        assert "." not in sample.key
        assert meta["patient"] in train, f"evaluation patient {meta['patient']} leaked"
        patient = patients[meta["patient"]]
        # the phantom is stored in RAS order; prepared slices follow the display convention
        cine = cines.setdefault(patient.name, axial_layout(patient.cine_path))
        expected = cine[:, :, meta["slice"], meta["frame"] - 1]
        assert sample.raw.dtype == expected.dtype == np.uint16
        np.testing.assert_array_equal(sample.raw, expected)
        if meta["frame"] in patient.labeled_frames:
            gt = axial_layout(patient.frame_path(meta["frame"], label=True))[:, :, meta["slice"]]
            np.testing.assert_array_equal(sample.mask, gt)
        else:
            assert sample.mask is None
        offset, scale, low, high = meta["norm"]
        assert low is None and high is None  # z-score clips nothing
        np.testing.assert_allclose(sample.image, (expected - offset) / scale, rtol=1e-5,
                                   atol=1e-5)
        count += 1
    assert count == manifest.counts["pretrain_slices"] > 0


def test_zarr_store_round_trips_bit_exact(prepared: Path, phantom_root: Path) -> None:
    patients = {p.name: p for p in discover_patients(phantom_root)}
    for split in ("train", "val", "test"):
        store = LabeledSlices(prepared / "labeled.zarr", split)
        assert len(store) > 0
        for index in range(len(store)):
            patient = patients[store.patient_of(index)]
            frame, z = int(store.frames[index]), int(store.slices[index])
            image, mask = store.raw(index)
            np.testing.assert_array_equal(image, axial_layout(patient.frame_path(frame))[:, :, z])
            np.testing.assert_array_equal(
                mask, axial_layout(patient.frame_path(frame, label=True))[:, :, z])
        assert store.group["image"].chunks[0] == 1  # one slice per chunk


def test_slice_index_lists_every_slice(prepared: Path) -> None:
    manifest = Manifest.read(prepared)
    with open(prepared / "slices.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(int(r["in_shards"]) for r in rows) == manifest.counts["pretrain_slices"]
    for split, count in manifest.labeled_store["slices"].items():
        indices = sorted(int(r["store_index"]) for r in rows
                         if r["split"] == split and int(r["store_index"]) >= 0)
        assert indices == list(range(count))


@pytest.mark.slow
def test_verify_accepts_then_catches_corruption(prepared: Path, tmp_path: Path) -> None:
    assert verify_dataset(prepared) == []
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = copy / "shards" / Manifest.read(copy).shards[0]["name"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify_dataset(copy)
    assert any(shard.name in p and "checksum" in p for p in problems)
    result = subprocess.run([sys.executable, "-m", "data_prep", "verify", str(copy)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "problem" in result.stdout


def test_verify_a_dataset_in_an_object_store(prepared: Path, s3: S3Server) -> None:
    url = upload_tree(prepared, join(s3.new_bucket(), "phantom"))
    assert verify_dataset(url) == []
    shard = join(url, "shards", Manifest.read(prepared).shards[1]["name"])
    data = bytearray(read_bytes(shard))
    data[len(data) // 2] ^= 0xFF
    write_bytes(shard, bytes(data))
    delete(index_location(join(url, "shards", Manifest.read(prepared).shards[2]["name"])))
    problems = verify_dataset(url)
    assert any(p.startswith(f"{shard}: checksum") for p in problems), problems
    assert any("DALI index missing" in p and p.startswith(url) for p in problems), problems


def test_rerun_is_idempotent_and_other_config_refused(prepared: Path, phantom_root: Path) -> None:
    config = json.loads((prepared / "manifest.json").read_text())["extra"]["config"]
    before = (prepared / "manifest.json").read_bytes()
    prepare_dataset(PrepareConfig(**{**config, "pretrain_splits": config["pretrain_splits"]}),
                    progress=False)
    assert (prepared / "manifest.json").read_bytes() == before
    with pytest.raises(FileExistsError, match="another config"):
        prepare_dataset(PrepareConfig(**{**config, "image_size": 80}), progress=False)


def test_bad_inputs_name_the_file(phantom_root: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(phantom_root / "training" / "patient003", broken / "patient003")
    info = broken / "patient003" / "Info.cfg"
    info.write_text(info.read_text().replace("ED:", "EDX:"))
    with pytest.raises(DataError, match=r"Info\.cfg: missing 'ED'"):
        prepare_dataset(PrepareConfig(source=str(broken), out=str(tmp_path / "o1")),
                        progress=False)
    shutil.rmtree(broken)
    shutil.copytree(phantom_root / "training" / "patient003", broken / "patient003")
    frame = next((broken / "patient003").glob("*_frame01.nii.gz"))
    frame.write_bytes(frame.read_bytes()[:200])
    with pytest.raises(DataError, match=frame.name):
        prepare_dataset(PrepareConfig(source=str(broken), out=str(tmp_path / "o2")),
                        progress=False)
    assert not (tmp_path / "o2" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        Manifest.read(tmp_path / "o2")
