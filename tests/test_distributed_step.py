"""Distributed correctness: a step on 2 gloo ranks equals one process on the whole batch.

Loss and every parameter gradient of each method (BatchNorm synchronised across ranks,
DDP averaging gradients, contrastive negatives and batch statistics gathered from all
ranks) must match a single process given the concatenated batch.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from pretrain.config import MethodConfig
from pretrain.methods import SSLMethod, build_method
from pretrain.weights import create_encoder
from tests.launching import free_port, torchrun, worker_env

# Each method with its default view_batchnorm (separate for all but SimCLR), plus the
# other mode for one method of each kind: per-view statistics stay global across ranks.
METHODS = ["byol", "simclr", "barlow_twins", "vicreg", "byol:joint", "simclr:separate"]
BATCH = 8
# all tests share one torchrun launch of two ranks
pytestmark = pytest.mark.slow


def build(spec: str) -> SSLMethod:
    """``name`` or ``name:view_batchnorm``."""
    torch.manual_seed(0)
    name, _, views = spec.partition(":")
    config = MethodConfig(name=name, projector_hidden=32,  # type: ignore[arg-type]
                          projection_dim=16, view_batchnorm=views or "auto")  # type: ignore[arg-type]
    return build_method(config, create_encoder("resnet18", 1)).double()


def fixed_views() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    views = torch.randn(2, BATCH, 1, 24, 24, generator=generator, dtype=torch.float64)
    return views[0], views[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    env = worker_env(PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = torchrun("--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
                       f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                       str(Path(__file__).with_name("dist_step_worker.py")), str(out), *METHODS)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.parametrize("name", METHODS)
def test_two_ranks_match_one_process(name: str, two_rank_results: Path) -> None:
    method = build(name)
    view1, view2 = fixed_views()
    loss = method(view1, view2)
    loss.backward()
    ranks = [torch.load(two_rank_results / f"{name}-rank{r}.pt", weights_only=True)
             for r in range(2)]
    if name.startswith("byol"):  # a per-sample mean: each rank reports its half's mean
        distributed_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    else:  # batch-global losses: every rank reports the loss of the whole batch
        torch.testing.assert_close(ranks[0]["loss"], ranks[1]["loss"])
        distributed_loss = ranks[0]["loss"]
    torch.testing.assert_close(distributed_loss, loss.detach(), rtol=1e-9, atol=1e-12)
    expected = {key: p.grad for key, p in method.named_parameters() if p.grad is not None}
    for rank in ranks:
        assert set(rank["grads"]) == set(expected)
        for key, grad in expected.items():
            torch.testing.assert_close(rank["grads"][key], grad, rtol=1e-7, atol=1e-10,
                                       msg=f"{name}: gradient of {key}")
