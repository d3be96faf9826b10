"""``torchrun -m pretrain`` with two gloo ranks: DDP, SyncBatchNorm, one export."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.launching import (
    check_two_rank_run,
    free_port,
    tiny_pretrain_overrides,
    torchrun,
    worker_env,
)


@pytest.mark.slow
def test_two_rank_torchrun_pretraining(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = torchrun(
        "--nnodes=1", "--nproc-per-node=2",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "-m", "pretrain", *tiny_pretrain_overrides(prepared, out),
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=worker_env())
    assert result.returncode == 0, result.stderr[-4000:]
    check_two_rank_run(out)
