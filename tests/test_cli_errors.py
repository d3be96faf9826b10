"""Bad input to every command: one ``error:`` line naming the problem, exit status 2, no
traceback unless ``--debug`` asks for it (each command run as a user would, in a
subprocess)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=300)


def _one_error_line(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def truncated_source(phantom_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "acdc"
    for number in (3, 4):
        shutil.copytree(phantom_root / "training" / f"patient{number:03d}",
                        root / f"patient{number:03d}")
    cine = root / "patient004" / "patient004_4d.nii.gz"
    cine.write_bytes(cine.read_bytes()[:300])
    return root


def test_prepare_names_a_truncated_file_and_the_skip_bad_way_out(truncated_source: Path,
                                                                 tmp_path: Path) -> None:
    command = ("data_prep", "prepare", "--source", str(truncated_source), "--out",
               str(tmp_path / "out"), "image_size=64", "workers=1")
    _one_error_line(_run(*command), "patient004_4d.nii.gz", "skip_bad=true")
    debug = _run(*command, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_prepare_without_dataset_json(phantom_root: Path, tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    _one_error_line(_run("data_prep", "prepare", "--source", str(tmp_path / "raw"), "--out",
                         str(tmp_path / "out"), "format=nnunet"), "dataset.json")


def test_verify_on_a_folder_that_is_not_a_prepared_dataset(tmp_path: Path) -> None:
    _one_error_line(_run("data_prep", "verify", str(tmp_path)), "not a prepared dataset")


def test_pretrain_on_a_missing_dataset(tmp_path: Path) -> None:
    _one_error_line(_run("pretrain", f"data.path={tmp_path / 'missing'}",
                         f"run.out={tmp_path / 'run'}", "run.device=cpu"),
                    "is not a prepared dataset")
