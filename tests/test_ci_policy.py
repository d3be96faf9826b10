"""CI's skip policy (.ci/skip_policy.py, called by .ci/run) on sample pytest logs: only the
allowed reasons pass, and a summary that does not account for every skip fails."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / ".ci" / "skip_policy.py"
GPU = "needs a CUDA device"

GPU_SKIP = f"SKIPPED [2] tests/test_device_data.py:46: {GPU}"
DALI_SKIP = ("SKIPPED [1] tests/test_dali_loader.py:192: could not import 'nvidia.dali': "
             "No module named 'nvidia'")
OTHER_SKIP = "SKIPPED [1] tests/test_cluster_launch.py:227: DeepSpeed is not installed"


def _log(*skip_lines: str, stats: str) -> str:
    return "\n".join([
        "tests/test_a.py ..s.                                                     [100%]",
        "=========================== short test summary info ============================",
        *skip_lines,
        f"================ {stats} in 95.20s (0:01:35) ================",
    ]) + "\n"


def _run(tmp_path: Path, log: str, *allowed: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "pytest.log"
    path.write_text(log)
    return subprocess.run([sys.executable, str(POLICY), str(path), *allowed],
                          capture_output=True, text=True, timeout=60)


def test_gpu_skips_pass(tmp_path: Path) -> None:
    done = _run(tmp_path, _log(GPU_SKIP, stats="300 passed, 2 skipped, 9 deselected"), GPU)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""


def test_a_run_without_skips_passes(tmp_path: Path) -> None:
    assert _run(tmp_path, _log(stats="300 passed, 1 warning"), GPU).returncode == 0


@pytest.mark.parametrize("other", [DALI_SKIP, OTHER_SKIP], ids=["importorskip", "skipif"])
def test_any_other_reason_fails_and_is_named(tmp_path: Path, other: str) -> None:
    done = _run(tmp_path, _log(GPU_SKIP, other, stats="300 passed, 3 skipped"), GPU)
    assert done.returncode == 1
    assert other in done.stdout and GPU_SKIP not in done.stdout


def test_an_importorskip_is_flagged_as_a_missing_dependency(tmp_path: Path) -> None:
    done = _run(tmp_path, _log(DALI_SKIP, stats="1 passed, 1 skipped"), GPU)
    assert done.returncode == 1 and "dependency failed to import" in done.stdout


def test_reasons_must_match_exactly(tmp_path: Path) -> None:
    reworded = "SKIPPED [1] tests/test_x.py:3: needs a CUDA device, or DALI"
    assert _run(tmp_path, _log(reworded, stats="1 passed, 1 skipped"), GPU).returncode == 1


def test_colours_are_ignored(tmp_path: Path) -> None:
    coloured = f"\x1b[33mSKIPPED\x1b[0m [2] tests/test_device_data.py:46: {GPU}"
    stats = "\x1b[32m300 passed\x1b[0m, \x1b[33m2 skipped\x1b[0m"
    assert _run(tmp_path, _log(coloured, stats=stats), GPU).returncode == 0


@pytest.mark.parametrize("lines", [
    [],  # run without -rs: the skips are counted but not listed
    [f"SKIPPED tests/test_device_data.py::test_x - {GPU}"],  # --no-fold-skipped
], ids=["unlisted", "unfolded"])
def test_skips_the_summary_does_not_list_fail(tmp_path: Path, lines: list[str]) -> None:
    done = _run(tmp_path, _log(*lines, stats="300 passed, 2 skipped"), GPU)
    assert done.returncode == 1 and "counts 2 skipped but lists 0" in done.stdout


def test_a_log_without_a_pytest_summary_fails(tmp_path: Path) -> None:
    assert _run(tmp_path, "make: *** [Makefile:40: test] Killed\n", GPU).returncode == 1


def test_without_arguments_it_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(POLICY)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("Usage:")


def test_ci_run_allows_exactly_the_gpu_reason_the_tests_use() -> None:
    """The allowed list in .ci/run and the GPU skip reasons in the tests are one wording."""
    run = (REPO / ".ci" / "run").read_text()
    allowed = re.search(r"ALLOWED_SKIP_REASONS=\(\n(.*?)\n\)", run, re.S)
    assert allowed is not None
    assert re.findall(r'"([^"]*)"', allowed.group(1)) == [GPU]
    cuda_reasons = {reason for test in (REPO / "tests").glob("test_*.py")
                    for reason in re.findall(r'reason="([^"]*)"', test.read_text())
                    if "CUDA" in reason or "GPU" in reason}
    assert cuda_reasons == {GPU}
