"""Launching real multi-process runs from the tests: free ports, torchrun on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

LOOPBACK_TORCHRUN = Path(__file__).resolve().parents[1] / "cluster" / "loopback_torchrun.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*arguments: str) -> list[str]:
    """``torchrun ARGUMENTS`` with every server it starts listening on 127.0.0.1 only."""
    return [sys.executable, str(LOOPBACK_TORCHRUN), *arguments]


def process_tree(roots: set[int]) -> set[int]:
    """``roots`` and all their descendants (torchrun starts workers in sessions of their
    own, so killing an agent's process group leaves its workers running)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = set(roots)
    while True:
        children = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        if not children:
            return tree
        tree |= children


def worker_env(**extra: str) -> dict[str, str]:
    """One thread per process (2 cores), gloo on the loopback interface, and the agent
    settings medssl's launch recipes use."""
    from cluster.launch import TORCHRUN_ENV

    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
            **TORCHRUN_ENV, **extra}


def tiny_pretrain_overrides(prepared: Path, out: Path) -> list[str]:
    """Two steps of a small BYOL run (global batch 16) on the test dataset, on CPU."""
    return [
        f"data.path={prepared}", f"run.out={out}", "run.device=cpu", "run.progress=false",
        "run.log_every=1", "model.arch=resnet18", "data.crop_size=32", "data.batch_size=16",
        "data.workers=1", "data.epoch_samples=32", "optim.epochs=1",
        "method.projector_hidden=64", "method.projection_dim=32",
    ]


def check_two_rank_run(out: Path) -> None:
    """What a finished two-rank tiny run leaves: world size 2, 2 steps logged once."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert json.loads((out / "run_info.json").read_text())["world_size"] == 2
    assert json.loads((out / "export" / "backbone.json").read_text())["steps"] == 2
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]  # rank 0 logs alone


def check_sbatch_script(script: str, tmp_path: Path) -> None:
    """A rendered sbatch script: directives before the first command (sbatch reads no
    further), every placeholder filled, and valid bash."""
    lines = script.splitlines()
    first_command = next(i for i, line in enumerate(lines)
                         if line.strip() and not line.startswith("#"))
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_command
    assert "@@" not in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
