"""Bad input to every command: one ``error:`` line naming the problem, exit status 2, no
traceback unless ``--debug`` asks for it (each command run as a user would, in a
subprocess)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli_errors import report_input_errors


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


@pytest.mark.slow
def test_verify_on_a_folder_that_is_not_a_prepared_dataset(tmp_path: Path) -> None:
    _one_error_line(_run("data_prep", "verify", str(tmp_path)), "not a prepared dataset")


@pytest.mark.slow
def test_pretrain_on_a_missing_dataset(tmp_path: Path) -> None:
    _one_error_line(_run("pretrain", f"data.path={tmp_path / 'missing'}",
                         f"run.out={tmp_path / 'run'}", "run.device=cpu"),
                    "is not a prepared dataset")


@pytest.mark.slow
def test_finetune_train_on_a_missing_dataset(tmp_path: Path) -> None:
    _one_error_line(_run("finetune", "train", "--data", str(tmp_path / "missing"), "--out",
                         str(tmp_path / "run"), "device=cpu"), str(tmp_path / "missing"))


def test_finetune_report_on_a_folder_without_finished_runs(tmp_path: Path) -> None:
    (tmp_path / "runs" / "random" / "b3" / "s0").mkdir(parents=True)
    _one_error_line(_run("finetune", "report", str(tmp_path / "runs")), "no complete")


@pytest.mark.slow
def test_sweep_with_an_unknown_key_stops_before_ray_starts(tmp_path: Path) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text(f"name: s\nstorage: {tmp_path}\ndata: {tmp_path}\n"
                      "inits: {random: random}\nbudgets: [3]\nseeds: [0]\n"
                      "base: {epochz: 2}\n")
    _one_error_line(_run("finetune", "sweep", "--config", str(config)), "base.epochz")
    _one_error_line(_run("finetune", "sweep", "--config", str(tmp_path / "nope.yaml")),
                    "nope.yaml")


def test_cluster_recipe_with_a_bad_wall_time() -> None:
    _one_error_line(_run("cluster", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--time",
                         "90 minutes"), "HH:MM:SS")


@pytest.mark.slow
def test_medssl_console_script_and_the_debug_environment_variable(tmp_path: Path) -> None:
    command = ("finetune.console", "pretrain", f"data.path={tmp_path / 'missing'}",
               f"run.out={tmp_path / 'run'}", "run.device=cpu")
    _one_error_line(_run(*command), "is not a prepared dataset")
    debug = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "MEDSSL_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_program_bugs_keep_their_traceback_and_only_rank_zero_speaks(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def bug() -> int:
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):
        report_input_errors(bug)

    def bad_input() -> int:
        raise ValueError("data.path: /x is not a prepared dataset")

    monkeypatch.setenv("RANK", "1")
    assert report_input_errors(bad_input) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert report_input_errors(bad_input) == 2
    assert capsys.readouterr().err == "error: data.path: /x is not a prepared dataset\n"
