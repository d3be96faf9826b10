"""``torchrun -m pretrain`` with two gloo ranks: DDP, SyncBatchNorm, one export."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_torchrun_pretraining(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        "-m", "pretrain",
        f"data.path={prepared}", f"run.out={out}", "run.device=cpu", "run.progress=false",
        "run.log_every=1", "model.arch=resnet18", "data.crop_size=32", "data.batch_size=16",
        "data.workers=1", "data.epoch_samples=32", "optim.epochs=1",
        "method.projector_hidden=64", "method.projection_dim=32",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    run_info = json.loads((out / "run_info.json").read_text())
    assert run_info["world_size"] == 2
    assert json.loads((out / "export" / "backbone.json").read_text())["steps"] == 2
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]  # rank 0 logs alone
