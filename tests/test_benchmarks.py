"""The benchmark suite end to end at tiny sizes: every stage runs, next to its baseline,
and the suite records what it measured (not that anything is fast)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "loader", "loader_s3", "pretrain_resnet50", "pretrain_vit", "packing",
          "finetune", "sweep", "scaling"]


@pytest.mark.slow
def test_every_benchmark_runs_at_tiny_sizes_and_is_recorded(tmp_path: Path) -> None:
    results, markdown = tmp_path / "suite.json", tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--tiny", "--work",
         str(tmp_path / "work"), "--json", str(results), "--results", str(markdown)],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    record = json.loads(results.read_text())
    assert [s["stage"] for s in record["stages"]] == STAGES
    for stage in record["stages"]:
        assert stage["error"] is None and stage["skipped"] is None, stage
        assert stage["figure"] > 0 and stage["baseline"] > 0, stage
        assert stage["ratio"] == stage["figure"] / stage["baseline"]
    assert record["profile"] == "tiny" and record["commit"] and "CPU cores" in \
        record["hardware"]
    assert record["command"].startswith("python benchmarks/run.py --tiny")
    # the fine-tuning stage projects the reference grid from what it measured
    finetune = record["figures"]["finetune"]
    assert finetune["projection"][0]["packed"] == 1
    assert finetune["projection"][0]["gpu_hours"] > 0
    text = markdown.read_text()
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len(rows) == len(STAGES) + 2  # header, rule, one row per stage
    assert f"commit {record['commit']}" in text

    # the study's wall time per recipe, derived from this run's figures
    derived = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "study_time.py"), str(results)],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert derived.returncode == 0, derived.stderr
    rows = [line.split(" | ") for line in derived.stdout.splitlines()
            if line.startswith("| ") and "hours" not in line]
    assert [row[0].lstrip("| ") for row in rows] == [
        "pretrain_byol_acdc.yaml, 400 epochs", "pretrain_byol_imagenet_acdc.yaml, 25 epochs",
        "pretrain_supervised_imagenet_byol_acdc.yaml, 25 epochs", "sweep_grid.yaml, 600 runs",
        "sweep_pretraining_length.yaml, 260 runs"]
    hours = [float(row[2]) for row in rows]
    assert all(h > 0 for h in hours)
    assert hours[0] == pytest.approx(16 * hours[1], rel=0.05, abs=0.8)  # 400 vs 25 epochs


def test_the_gpu_suite_lists_every_stage_without_running_it(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--gpu", "--dry-run",
         "--work", str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == STAGES
    assert all("--device cuda" in line for line in lines
               if line.split(":")[0] in ("packing", "finetune", "scaling"))
    assert "--compile" in lines[STAGES.index("pretrain_resnet50")]
    assert not (tmp_path / "suite.json").exists()
