"""An elastic launch (``--nnodes 1:2``) that loses a node: the surviving agent restarts its
worker, which resumes from the latest checkpoint at the new world size with the per-rank
batch, global batch and learning rate recomputed, and finishes the configured epochs."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cluster.launch import torchrun_command
from pretrain.checkpoint import CHECKPOINT_DIR, LATEST
from pretrain.checkpoint_state import read_checkpoint
from pretrain.optim import scaled_lr
from tests.launching import (
    free_port,
    process_tree,
    tiny_pretrain_overrides,
    torchrun,
    worker_env,
)

REPO = Path(__file__).resolve().parents[1]
EPOCHS, EPOCH_SAMPLES, PER_RANK, BASE_LR = 3, 64, 8, 1e-3


def _scalars(run: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


@pytest.mark.slow
def test_elastic_run_resumes_on_fewer_nodes(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    port = free_port()
    overrides = [*tiny_pretrain_overrides(prepared, out),
                 f"data.batch_per_rank={PER_RANK}", f"data.epoch_samples={EPOCH_SAMPLES}",
                 f"optim.epochs={EPOCHS}", "optim.warmup_epochs=0", f"optim.lr={BASE_LR}",
                 "run.checkpoint_every=1", "run.dist_timeout_s=30"]
    agents, logs = [], []
    for node, (is_host, restarts) in enumerate(((True, 3), (False, 0))):
        command = torchrun_command(
            nnodes="1:2", nproc_per_node=1, rdzv_endpoint=f"127.0.0.1:{port}",
            run_id="elastic-test", config=None, overrides=overrides, max_restarts=restarts,
            monitor_interval=0.2, local_addr="127.0.0.1",
            # A round closes this long after the minimum (one node) has joined: the first
            # one waits for both nodes.
            rdzv_conf={"is_host": is_host, "join_timeout": 90, "last_call_timeout": 8})
        logs.append(tmp_path / f"node{node}.log")
        with logs[-1].open("w") as handle:
            agents.append(subprocess.Popen(
                torchrun(*command[1:]), env=worker_env(), cwd=REPO, stdout=handle,
                stderr=subprocess.STDOUT, start_new_session=True))
        if is_host:
            time.sleep(1)  # the host agent serves the rendezvous store: let it bind first

    def report() -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)

    latest = out / CHECKPOINT_DIR / LATEST
    killed_at = None
    deadline = time.monotonic() + 300
    try:
        while agents[0].poll() is None and time.monotonic() < deadline:
            if killed_at is None and latest.is_file():
                state = read_checkpoint(latest, mmap=True)
                if state.world_size == 2 and state.step >= 2 and state.epoch < 2:
                    for pid in process_tree({agents[1].pid}):  # node 1 and its worker die
                        os.kill(pid, signal.SIGKILL)
                    killed_at = state.step
            time.sleep(0.05)
    finally:
        for agent in agents:
            for pid in process_tree({agent.pid}) if agent.poll() is None else ():
                os.kill(pid, signal.SIGKILL)
            agent.wait()
    assert killed_at is not None, report()
    assert agents[0].returncode == 0, report()

    final = read_checkpoint(latest)
    assert (final.epoch, final.position, final.world_size) == (EPOCHS, 0, 1), report()
    info = json.loads((out / "run_info.json").read_text())  # written again at the restart
    assert (info["world_size"], info["global_batch"], info["micro_batch_per_rank"]) == \
        (1, PER_RANK, PER_RANK)
    assert info["peak_lr"] == pytest.approx(scaled_lr(BASE_LR, PER_RANK))

    # Every step's learning rate follows the cosine over epoch progress, scaled for the
    # global batch of the world it ran in: 16 on two nodes, then 8 on one.
    lrs, progress = _scalars(out, "train/lr"), _scalars(out, "train/epoch")
    steps = sorted(lrs)
    assert steps == list(range(1, final.step + 1))
    restart = info["resumed_at_step"]
    assert killed_at <= restart < final.step
    for step in steps:
        global_batch = 2 * PER_RANK if step <= restart else PER_RANK
        shape = 0.5 * (1 + math.cos(math.pi * progress[step] / EPOCHS))
        assert lrs[step] == pytest.approx(scaled_lr(BASE_LR, global_batch) * shape), step
    # Epoch progress goes on where the two-node run left it: no repeated, no lost steps.
    fractions = [progress[s] for s in steps]
    two_node = [f for s, f in zip(steps, fractions) if s <= restart]
    one_node = [f for s, f in zip(steps, fractions) if s > restart]
    assert two_node == pytest.approx([i * 2 * PER_RANK / EPOCH_SAMPLES
                                      for i in range(len(two_node))])
    assert one_node[0] == pytest.approx(len(two_node) * 2 * PER_RANK / EPOCH_SAMPLES)
    assert one_node[-1] == pytest.approx(EPOCHS - PER_RANK / EPOCH_SAMPLES)
    assert all(b - a == pytest.approx(PER_RANK / EPOCH_SAMPLES)
               for a, b in itertools.pairwise(one_node))
