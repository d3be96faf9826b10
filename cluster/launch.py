"""Launch recipes: the torchrun command line for N nodes x G processes per node."""

from __future__ import annotations

import shlex
from collections.abc import Sequence


def torchrun_command(*, nnodes: str, nproc_per_node: int, rdzv_endpoint: str, run_id: str,
                     config: str | None, overrides: Sequence[str] = (),
                     max_restarts: int = 3) -> list[str]:
    """A torchrun invocation with a c10d rendezvous, to run identically on every node.

    ``nnodes`` may be ``"N"`` or an elastic ``"MIN:MAX"``; ``max_restarts`` lets torchrun
    restart failed workers, which then resume from the latest checkpoint.
    """
    command = [
        "torchrun", f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={run_id}",
        f"--max-restarts={max_restarts}", "-m", "pretrain",
    ]
    if config:
        command += ["--config", config]
    return command + list(overrides)


def format_command(command: Sequence[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)
