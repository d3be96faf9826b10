"""``medssl demo`` end to end, shrunk to test size, through the installed console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _medssl() -> list[str]:
    script = shutil.which("medssl") or str(Path(sys.executable).with_name("medssl"))
    return [script] if Path(script).exists() else [sys.executable, "-m", "finetune.console"]


@pytest.mark.slow
def test_demo_writes_the_report_last(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(
        [*_medssl(), "demo", "--out", str(out), "patients=12", "image_size=64",
         "pretrain_epochs=1", "crop_size=32", "finetune_epochs=2", "budgets=[4, 8]",
         "seeds=[0]", "epoch_samples=16", "progress=false"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = Path(result.stdout.strip().splitlines()[-1])
    assert report == (out / "sweep" / "report" / "report.html").resolve()
    text = report.with_name("report.md").read_text()
    assert text.startswith("# medssl demo: synthetic cardiac phantom")
    for png in ("dice_vs_budget.png", "val_dice_curves.png", "speedup.png",
                "labels_needed.png", "overlays.png"):
        assert f"]({png})" in text
        assert (report.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = report.read_text()
    assert html.count("data:image/png;base64,") == 5  # self-contained
    # one seed per cell: the page says the comparisons cannot be tested
    assert "could not be tested" in text
    assert {p.name for p in out.iterdir()} == {"phantom_acdc", "prepared", "pretrain", "sweep"}
    # the grid ran as a Ray Tune sweep: its run folders, results table and Tune state
    assert len(list((out / "sweep" / "runs").rglob("metrics.json"))) == 4
    assert len((out / "sweep" / "results.csv").read_text().splitlines()) == 5
    assert any((out / "sweep" / "tune").iterdir())
    assert result.stdout.count("done     ") == 4


def test_console_script_dispatches(tmp_path: Path) -> None:
    help_text = subprocess.run([*_medssl(), "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "demo" in help_text.stdout
    unknown = subprocess.run([*_medssl(), "frobnicate"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown command" in unknown.stderr
    launch = subprocess.run(
        [*_medssl(), "cluster", "torchrun", "--nnodes", "2", "--nproc-per-node", "4",
         "--rdzv-endpoint", "10.1.2.3:29400", "--config", "cfg.yaml", "optim.epochs=5"],
        capture_output=True, text=True,
    )
    assert launch.returncode == 0
    assert launch.stdout.split() == [
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", "torchrun", "--nnodes=2", "--nproc-per-node=4",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.1.2.3:29400", "--rdzv-id=medssl", "--max-restarts=3", "-m",
        "pretrain", "--config", "cfg.yaml", "optim.epochs=5",
    ]
    phantom = subprocess.run([*_medssl(), "data_prep", "phantom", "--out", str(tmp_path / "p"),
                              "--patients", "1", "--image-size", "48"],
                             capture_output=True, text=True)
    assert phantom.returncode == 0, phantom.stderr
    assert (tmp_path / "p" / "training" / "patient001" / "Info.cfg").is_file()
