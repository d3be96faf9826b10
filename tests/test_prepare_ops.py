"""Operating prepare: parallel workers, resume after a kill, skip-bad, checksums, geometry."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.errors import DataError
from data_prep.manifest import Manifest
from data_prep.prepare import PrepareConfig, prepare_dataset
from data_prep.shard_reader import iterate_shards, shard_paths
from data_prep.staging import STAGING_DIR
from data_prep.verify import verify_dataset
from data_prep.zarr_store import LabeledSlices
from tests.conftest import IMAGE_SIZE


def _subset(phantom_root: Path, tmp_path: Path, numbers: list[int]) -> Path:
    root = tmp_path / "acdc"
    for number in numbers:
        name = f"patient{number:03d}"
        shutil.copytree(phantom_root / "training" / name, root / name)
    return root


def _shard_digests(folder: Path) -> list[str]:
    return [s["sha256"] for s in Manifest.read(folder).shards]


def _config(source: Path, out: Path, **overrides: object) -> PrepareConfig:
    return PrepareConfig(**{"source": str(source), "out": str(out), "name": "phantom",
                            "image_size": IMAGE_SIZE, "min_shards": 4, **overrides})


def test_one_worker_and_a_process_pool_give_identical_bytes(prepared: Path, phantom_root: Path,
                                                            tmp_path: Path) -> None:
    # The session fixture ran with one process per core (workers=0); this runs in-process.
    single = prepare_dataset(_config(phantom_root, tmp_path / "single", workers=1),
                             progress=False)
    assert _shard_digests(tmp_path / "single") == _shard_digests(prepared)
    pooled = Manifest.read(prepared)
    assert single.counts == pooled.counts and single.splits == pooled.splits
    assert single.source_files == pooled.source_files
    for split in ("train", "val", "test"):
        a, b = LabeledSlices(tmp_path / "single" / "labeled.zarr", split), \
            LabeledSlices(prepared / "labeled.zarr", split)
        assert len(a) == len(b)
        for index in range(len(a)):
            np.testing.assert_array_equal(a.raw(index)[0], b.raw(index)[0])
    assert not (prepared / STAGING_DIR).exists()  # staging is removed once assembled


def test_manifest_holds_a_checksum_of_every_source_file(prepared: Path,
                                                        phantom_root: Path) -> None:
    manifest = Manifest.read(prepared)
    # every file read: Info.cfg, labeled frames; cines only of pretraining (train) patients
    pretraining = set(manifest.splits["train"])
    read = sorted(str(p.relative_to(phantom_root)) for p in phantom_root.rglob("*")
                  if p.is_file() and ("_4d" not in p.name or p.parent.name in pretraining))
    assert sorted(manifest.source_files) == read
    for name, digest in manifest.source_files.items():
        assert hashlib.sha256((phantom_root / name).read_bytes()).hexdigest() == digest
    assert manifest.warnings == [] and manifest.channels == 1
    assert verify_dataset(prepared, source=phantom_root) == []


def test_verify_against_the_source_notices_a_changed_file(phantom_root: Path,
                                                          tmp_path: Path) -> None:
    source = _subset(phantom_root, tmp_path, [3])
    out = tmp_path / "out"
    prepare_dataset(_config(source, out, workers=1), progress=False)
    cine = source / "patient003" / "patient003_4d.nii.gz"
    cine.write_bytes(cine.read_bytes() + b"\0")
    (source / "patient003" / "Info.cfg").unlink()
    problems = verify_dataset(out, source=source)
    assert any("patient003_4d.nii.gz: source file changed" in p for p in problems)
    assert any("Info.cfg: source file missing" in p for p in problems)


@pytest.mark.slow
def test_killed_prepare_resumes_without_redoing_finished_patients(
        phantom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    patients = list(range(3, 13))  # enough that a busy machine cannot stage all first
    source = _subset(phantom_root, tmp_path, patients)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "data_prep", "prepare", "--source", str(source),
               "--out", str(out), "name=phantom", f"image_size={IMAGE_SIZE}",
               "min_shards=4", "workers=1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    units = out / STAGING_DIR / "units"
    deadline = time.monotonic() + 120
    def finished_units() -> list[Path]:
        return [p for p in units.glob("patient*") if ".tmp-" not in p.name] \
            if units.is_dir() else []

    while len(finished_units()) < 2 and process.poll() is None:
        assert time.monotonic() < deadline, "prepare staged nothing in 120 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = finished_units()
    assert 2 <= len(finished) < len(patients)
    assert not (out / "manifest.json").exists() and not (out / "shards").exists()
    # Mark one finished unit: if the resumed run reuses it, the mark reaches the manifest.
    meta_path = finished[0] / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "source_bytes": meta["source_bytes"] + 1}))

    capsys.readouterr()
    resumed = prepare_dataset(_config(source, out, workers=1), progress=False)
    assert (f"resuming {out}: {len(finished)} of {len(patients)} patients already staged"
            in capsys.readouterr().out)
    clean = prepare_dataset(_config(source, tmp_path / "clean", workers=2), progress=False)
    assert resumed.counts["source_bytes"] == clean.counts["source_bytes"] + 1
    assert _shard_digests(out) == _shard_digests(tmp_path / "clean")
    assert resumed.splits == clean.splits
    assert not (out / STAGING_DIR).exists()
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_resume_reconverts_a_patient_whose_source_changed(phantom_root: Path,
                                                          tmp_path: Path) -> None:
    source = _subset(phantom_root, tmp_path, [3, 4])
    out = tmp_path / "out"
    frame = source / "patient004" / "patient004_4d.nii.gz"
    frame.write_bytes(frame.read_bytes()[:300])  # truncated: the first run fails on it
    with pytest.raises(DataError, match=r"patient004_4d\.nii\.gz"):
        prepare_dataset(_config(source, out, workers=1), progress=False)
    staged = out / STAGING_DIR / "units"
    assert [p.name for p in staged.iterdir()] == ["patient003"]
    shutil.copy(phantom_root / "training" / "patient004" / frame.name, frame)
    manifest = prepare_dataset(_config(source, out, workers=1), progress=False)
    assert manifest.counts["patients"]["train"] == 2


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _rewrite_nifti(path: Path, change) -> None:
    image = nib.load(str(path))
    original = np.asanyarray(image.dataobj)
    data, zooms = change(original.copy(), image.header.get_zooms())
    if data.dtype.kind != "f":
        data = data.astype(original.dtype)
    out = nib.Nifti1Image(data, np.diag([*zooms[:3], 1.0]))
    out.header.set_zooms(zooms)
    nib.save(out, str(path))


BAD_INPUTS = {
    "truncated gzip": ("patient003_4d.nii.gz", _truncate, r"patient003_4d\.nii\.gz: cannot read"),
    "NaN voxels": ("patient003_frame01.nii.gz",
                   lambda p: _rewrite_nifti(p, lambda d, z: (np.where(d > 0, np.nan, d)
                                                             .astype(np.float32), z)),
                   r"patient003_frame01\.nii\.gz: contains NaN"),
    "label outside classes": ("patient003_frame01_gt.nii.gz",
                              lambda p: _rewrite_nifti(p, lambda d, z: (d + 4 * (d == 3), z)),
                              r"patient003_frame01_gt\.nii\.gz: label values \[7\]"),
    "shape mismatch": ("patient003_frame01_gt.nii.gz",
                       lambda p: _rewrite_nifti(p, lambda d, z: (d[:-2], z)),
                       r"patient003_frame01_gt\.nii\.gz: label shape"),
    "spacing mismatch": ("patient003_frame01_gt.nii.gz",
                         lambda p: _rewrite_nifti(p, lambda d, z: (d, (z[0] * 2, *z[1:]))),
                         r"patient003_frame01_gt\.nii\.gz: label spacing"),
    "malformed Info.cfg": ("Info.cfg", lambda p: p.write_text("ED 1\nES: 3\n"),
                           r"Info\.cfg:1: expected 'Key: value'"),
    "missing Info.cfg": ("Info.cfg", lambda p: p.unlink(), r"Info\.cfg is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_each_bad_input_is_named_and_skip_bad_records_it(case: str, phantom_root: Path,
                                                         tmp_path: Path) -> None:
    file_name, damage, message = BAD_INPUTS[case]
    source = _subset(phantom_root, tmp_path, [3, 4])
    if file_name.startswith("patient003_frame01"):
        # name the frame file after the patient's real ED frame
        ed = int((source / "patient003" / "Info.cfg").read_text().split("ED:")[1].split()[0])
        file_name = file_name.replace("frame01", f"frame{ed:02d}")
        message = message.replace("frame01", f"frame{ed:02d}")
    damage(source / "patient003" / file_name)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        prepare_dataset(_config(source, out, workers=1), progress=False)
    assert not (out / "manifest.json").exists()
    assert not (out / STAGING_DIR / "units" / "patient003").exists()

    manifest = prepare_dataset(_config(source, out, workers=1, skip_bad=True), progress=False)
    assert len(manifest.warnings) == 1
    assert re.search(message, manifest.warnings[0]["problem"])
    kept = [name for names in manifest.splits.values() for name in names]
    assert kept == ["patient004"]
    assert {s.meta["patient"] for s in iterate_shards(shard_paths(out))} == {"patient004"}


def test_empty_source_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no patientNNN folders"):
        prepare_dataset(_config(tmp_path / "empty", tmp_path / "out"), progress=False)


def test_inplane_resampling_to_a_target_spacing(phantom_root: Path, tmp_path: Path) -> None:
    source = _subset(phantom_root, tmp_path, [3, 4])
    raw = nib.load(str(source / "patient003" / "patient003_4d.nii.gz"))
    spacing = [float(z) for z in raw.header.get_zooms()[:3]]
    target = (spacing[0] * 2, spacing[1] * 2)
    manifest = prepare_dataset(_config(source, tmp_path / "out", workers=1,
                                       target_spacing=target, resize="fit",
                                       pretrain_splits=["train", "val", "test"]),
                               progress=False)
    long_axis = int(np.argmax(raw.shape[:2]))
    extent = spacing[long_axis] * raw.shape[long_axis]
    samples = [s for s in iterate_shards(shard_paths(tmp_path / "out"))
               if s.meta["patient"] == "patient003"]
    assert len(samples) == raw.shape[2] * raw.shape[3]
    for sample in samples:
        assert sample.raw.shape == (IMAGE_SIZE, IMAGE_SIZE)
        assert sample.raw.dtype == raw.get_data_dtype()
        # resampled, then "fit" scales the longer side to the image: its extent is kept
        np.testing.assert_allclose(sample.meta["spacing"][long_axis] * IMAGE_SIZE, extent,
                                   rtol=1e-5)
        np.testing.assert_allclose(sample.meta["spacing"][2], spacing[2])
        if sample.mask is not None:
            assert set(np.unique(sample.mask)) <= {0, 1, 2, 3}
    assert manifest.extra["config"]["target_spacing"] == list(target)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["channels"] == 1


@pytest.mark.slow
def test_pool_workers_die_with_a_killed_prepare(phantom_root: Path, tmp_path: Path) -> None:
    import psutil

    source = _subset(phantom_root, tmp_path, list(range(3, 13)))
    command = [sys.executable, "-m", "data_prep", "prepare", "--source", str(source),
               "--out", str(tmp_path / "out"), "name=phantom", f"image_size={IMAGE_SIZE}",
               "workers=2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    parent = psutil.Process(process.pid)
    deadline = time.monotonic() + 120
    workers: list[psutil.Process] = []
    while len(workers) < 2 and process.poll() is None:  # the two pool workers (and tracker)
        assert time.monotonic() < deadline, "prepare started no pool in 120 s"
        workers = [p for p in parent.children(recursive=True) if "spawn_main" in
                   " ".join(p.cmdline())]
        time.sleep(0.05)
    assert process.poll() is None, "prepare finished before its pool could be seen"
    children = parent.children(recursive=True)
    process.kill()  # SIGKILL: no cleanup code runs in the parent
    process.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    for survivor in alive:  # do not leave them behind if the test fails
        survivor.kill()
    assert alive == [], [p.pid for p in alive]
