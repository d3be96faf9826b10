"""The self-supervised losses: values against plain reference implementations, precision,
degenerate inputs, and the distributed convention on two real gloo processes.

The convention under test (``pretrain/losses/gather.py``): every rank returns the
single-process loss on the concatenated batch, and after data-parallel gradient averaging
(what DDP does) the parameter gradients equal the single-process gradients. BYOL's loss is
per-sample and needs no gather: there the mean of the per-rank values is the global loss.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pretrain.losses.barlow_twins import barlow_twins_loss, off_diagonal
from pretrain.losses.byol import byol_loss
from pretrain.losses.gather import gather_with_grad, rank, world_size
from pretrain.losses.simclr import nt_xent_loss
from pretrain.losses.vicreg import vicreg_loss, vicreg_terms

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOSSES: dict[str, LossFn] = {
    "simclr": nt_xent_loss,
    "barlow_twins": barlow_twins_loss,
    "vicreg": vicreg_loss,
    "byol": byol_loss,  # (prediction, target): the target half gets no gradient
}
GATHERED = ("simclr", "barlow_twins", "vicreg")
WORLD_SIZE = 2
GLOBAL_BATCH, IN_DIM, EMBED_DIM = 8, 12, 16
RTOL, ATOL = 1e-5, 1e-6


def _embeddings(batch: int = GLOBAL_BATCH, dim: int = EMBED_DIM, seed: int = 0) -> tuple[
        torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(batch, dim, generator=g)
    return z1, z1 + 0.5 * torch.randn(batch, dim, generator=g)


# --------------------------------------------------------------------------- references
# Deliberately naive: loops and float64, sharing no code with the implementations.


def _reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    views = [F.normalize(v.double(), dim=0) for v in (*z1, *z2)]
    n = len(z1)
    total = 0.0
    for i, anchor in enumerate(views):
        positive = i + n if i < n else i - n
        sims = [float(anchor @ other) / temperature for other in views]
        denominator = sum(math.exp(s) for k, s in enumerate(sims) if k != i)
        total += -math.log(math.exp(sims[positive]) / denominator)
    return total / len(views)


def _reference_nt_xent_cross_entropy(z1: torch.Tensor, z2: torch.Tensor,
                                     temperature: float) -> torch.Tensor:
    # SimCLR as classification: for each view, which of the other 2N - 1 views is its pair.
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n = len(z1)
    sims = z @ z.T / temperature
    keep = ~torch.eye(2 * n, dtype=torch.bool)
    logits = sims[keep].view(2 * n, 2 * n - 1)  # drop self-similarity
    targets = torch.cat([torch.arange(n, 2 * n) - 1, torch.arange(n)])  # shift past self
    return F.cross_entropy(logits, targets)


def _reference_barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lam: float,
                            eps: float = 1e-5) -> float:
    a, b = z1.double(), z2.double()
    n, d = a.shape

    def standardised(x: torch.Tensor, j: int) -> list[float]:
        col = [float(v) for v in x[:, j]]
        mean = sum(col) / n
        var = sum((v - mean) ** 2 for v in col) / n
        return [(v - mean) / math.sqrt(var + eps) for v in col]

    sa = [standardised(a, j) for j in range(d)]
    sb = [standardised(b, j) for j in range(d)]
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(sa[i][k] * sb[j][k] for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lam * c**2
    return loss


def _reference_vicreg(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-4) -> tuple[
        float, float, float]:
    a, b = z1.double(), z2.double()
    d = a.shape[1]
    invariance = float(((a - b) ** 2).mean())
    variance = sum(float(torch.clamp(1 - torch.sqrt(x.std(dim=0) ** 2 + eps), min=0).mean())
                   for x in (a, b)) / 2
    off = ~torch.eye(d, dtype=torch.bool)
    covariance = sum(float(torch.cov(x.T)[off].pow(2).sum()) / d for x in (a, b))
    return invariance, variance, covariance


# ----------------------------------------------------------------- single-process values


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_references(temperature: float) -> None:
    z1, z2 = _embeddings()
    loss = nt_xent_loss(z1, z2, temperature)
    assert loss.item() == pytest.approx(_reference_nt_xent(z1, z2, temperature), rel=RTOL)
    ce = _reference_nt_xent_cross_entropy(z1, z2, temperature).item()
    assert loss.item() == pytest.approx(ce, rel=RTOL)
    assert nt_xent_loss(z2, z1, temperature).item() == pytest.approx(loss.item(), rel=RTOL)


def test_nt_xent_uniform_similarities_give_log_of_the_candidate_count() -> None:
    # Every view identical (or all zero): the positive is one of 2N - 1 equal candidates.
    for z in (torch.ones(GLOBAL_BATCH, EMBED_DIM), torch.zeros(GLOBAL_BATCH, EMBED_DIM)):
        z = z.requires_grad_()
        loss = nt_xent_loss(z, z)
        assert loss.item() == pytest.approx(math.log(2 * GLOBAL_BATCH - 1), rel=RTOL)
        loss.backward()
        assert torch.isfinite(z.grad).all()


def test_barlow_twins_matches_loop_reference() -> None:
    z1, z2 = _embeddings()
    for lam in (5e-3, 0.5):
        loss = barlow_twins_loss(z1, z2, lam)
        assert loss.item() == pytest.approx(_reference_barlow_twins(z1, z2, lam), rel=RTOL)


def test_barlow_twins_known_cases() -> None:
    n, d = 64, 4
    # Identical, decorrelated views: C is the identity up to eps, so the loss is ~0.
    z = torch.linalg.qr(torch.randn(n, d, generator=torch.Generator().manual_seed(1)))[0]
    z = z - z.mean(dim=0)
    assert barlow_twins_loss(z, z).item() < 1e-4
    # Constant (collapsed) embeddings: finite, C = 0, every diagonal term costs 1.
    c = torch.ones(n, d, requires_grad=True)
    loss = barlow_twins_loss(c, c)
    assert loss.item() == pytest.approx(d)
    loss.backward()
    assert torch.isfinite(c.grad).all()


def test_off_diagonal_is_everything_but_the_diagonal() -> None:
    m = torch.arange(25.0).view(5, 5)
    assert torch.equal(off_diagonal(m), m[~torch.eye(5, dtype=torch.bool)])
    assert off_diagonal(torch.ones(1, 1)).numel() == 0


def test_vicreg_matches_reference_terms() -> None:
    z1, z2 = _embeddings()
    terms = vicreg_terms(z1, z2)
    reference = _reference_vicreg(z1, z2)
    for value, expected in zip(terms, reference, strict=True):
        assert value.item() == pytest.approx(expected, rel=RTOL, abs=ATOL)
    weighted = 25 * reference[0] + 25 * reference[1] + reference[2]
    assert vicreg_loss(z1, z2).item() == pytest.approx(weighted, rel=RTOL)
    custom = vicreg_loss(z1, z2, sim_weight=1, var_weight=2, cov_weight=3)
    assert custom.item() == pytest.approx(
        reference[0] + 2 * reference[1] + 3 * reference[2], rel=RTOL)


def test_vicreg_known_cases() -> None:
    z1, _ = _embeddings()
    assert vicreg_terms(z1, z1).invariance.item() == 0.0  # identical views
    # Collapsed embeddings: no invariance or covariance cost, the full variance hinge
    # (1 - sqrt(eps)) on every dimension, and finite gradients pushing the spread up.
    collapsed = torch.full((GLOBAL_BATCH, EMBED_DIM), 3.0, requires_grad=True)
    terms = vicreg_terms(collapsed, collapsed)
    assert terms.invariance.item() == 0.0
    assert terms.covariance.item() == 0.0
    assert terms.variance.item() == pytest.approx(1 - math.sqrt(1e-4))
    loss = vicreg_loss(collapsed, collapsed)
    assert loss.item() == pytest.approx(25 * (1 - math.sqrt(1e-4)))
    loss.backward()
    assert torch.isfinite(collapsed.grad).all()
    # Well-spread embeddings (std > 1 everywhere) pay no variance cost.
    assert vicreg_terms(10 * z1, 10 * z1).variance.item() == 0.0


def test_vicreg_rejects_a_single_sample() -> None:
    z = torch.randn(1, EMBED_DIM)
    with pytest.raises(ValueError, match="at least 2 samples"):
        vicreg_loss(z, z)


@pytest.mark.parametrize("name", GATHERED)
def test_mismatched_views_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="equal shape"):
        LOSSES[name](torch.randn(4, 8), torch.randn(4, 6))


@pytest.mark.parametrize("name", GATHERED)
def test_float32_under_bf16(name: str) -> None:
    fn = LOSSES[name]
    z1, z2 = _embeddings()
    b1, b2 = z1.bfloat16(), z2.bfloat16()
    from_bf16 = fn(b1, b2)
    assert from_bf16.dtype == torch.float32
    torch.testing.assert_close(from_bf16, fn(b1.float(), b2.float()), rtol=0, atol=0)

    reference = fn(z1, z2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (z1 @ z2.T).dtype == torch.bfloat16  # autocast is live: the check means something
        under_autocast = fn(z1, z2)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference, rtol=1e-6, atol=1e-6)


def test_helpers_outside_a_process_group() -> None:
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x
    assert (world_size(), rank()) == (1, 0)


# --------------------------------------------------------------- distributed convention


def _linear_problem() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """The same layer and global batch on every process, from a fixed seed."""
    g = torch.Generator().manual_seed(1234)
    layer = nn.Linear(IN_DIM, EMBED_DIM)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x1 = torch.randn(GLOBAL_BATCH, IN_DIM, generator=g)
    x2 = x1 + 0.3 * torch.randn(GLOBAL_BATCH, IN_DIM, generator=g)
    return layer, x1, x2


def _loss_and_grads(module: nn.Module, fn: LossFn, x1: torch.Tensor,
                    x2: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module.zero_grad()
    z1, z2 = module(torch.cat([x1, x2])).chunk(2)  # one forward, as a DDP step does
    loss = fn(z1, z2)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in module.parameters()]


class _EmbedAndLoss(nn.Module):
    """A method-shaped module: forward returns the loss, so DDP wraps the gather too."""

    def __init__(self, layer: nn.Linear, fn: LossFn):
        super().__init__()
        self.layer, self.fn = layer, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(*self.layer(x).chunk(2))


def _distributed_worker(rank_: int, world: int, port: int, out_dir: str) -> None:
    """One rank: its half of the batch through every loss; results to ``rank{r}.pt``."""
    torch.set_num_threads(1)
    if os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own sockets on loopback
    # The store listens on a socket bound to 127.0.0.1 only (a tcp:// init_method binds
    # every interface).
    listener = socket.create_server(("127.0.0.1", port)) if rank_ == 0 else None
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank_ == 0,
                          master_listen_fd=listener.fileno() if listener else None,
                          timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank_, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results: dict[str, torch.Tensor] = {}

        # The gather itself: rank order, and a backward that sums over ranks.
        x = torch.full((2, 3), float(rank_ + 1), requires_grad=True)
        weights = torch.arange(world * 6, dtype=torch.float32).view(world * 2, 3)
        gathered = gather_with_grad(x)
        (gathered * weights).sum().backward()
        results["gather/value"] = gathered.detach()
        results["gather/grad"] = x.grad
        results["world"] = torch.tensor([world_size(), rank()])

        layer, x1, x2 = _linear_problem()
        n = GLOBAL_BATCH // world
        rows = slice(rank_ * n, (rank_ + 1) * n)
        for name, fn in LOSSES.items():
            loss, grads = _loss_and_grads(layer, fn, x1[rows], x2[rows])
            for i, grad in enumerate(grads):
                dist.all_reduce(grad)  # what DDP does: average gradients over ranks
                results[f"{name}/grad{i}"] = grad / world
            results[f"{name}/loss"] = loss

        ddp = nn.parallel.DistributedDataParallel(_linear_problem()[0])
        for name in GATHERED:
            loss, grads = _loss_and_grads(ddp, LOSSES[name], x1[rows], x2[rows])
            results[f"ddp/{name}/loss"] = loss
            for i, grad in enumerate(grads):
                results[f"ddp/{name}/grad{i}"] = grad

        # The loss inside the DDP-wrapped forward, as pretrain.methods does it.
        for name in GATHERED:
            method = nn.parallel.DistributedDataParallel(
                _EmbedAndLoss(_linear_problem()[0], LOSSES[name]))
            loss = method(torch.cat([x1[rows], x2[rows]]))
            loss.backward()
            results[f"ddp_forward/{name}/loss"] = loss.detach()
            for i, p in enumerate(method.parameters()):
                results[f"ddp_forward/{name}/grad{i}"] = p.grad

        torch.save(results, Path(out_dir) / f"rank{rank_}.pt")
    finally:
        dist.destroy_process_group()
        if listener is not None:
            listener.close()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, torch.Tensor]]:
    """One spawned two-rank gloo group runs every distributed check."""
    out = tmp_path_factory.mktemp("losses_ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_distributed_worker, args=(WORLD_SIZE, port, str(out)),
                                nprocs=WORLD_SIZE, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def single_process() -> dict[str, tuple[torch.Tensor, list[torch.Tensor]]]:
    layer, x1, x2 = _linear_problem()
    return {name: _loss_and_grads(layer, fn, x1, x2) for name, fn in LOSSES.items()}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_gather_with_grad_on_two_ranks(rank_results: list[dict[str, torch.Tensor]]) -> None:
    weights = torch.arange(WORLD_SIZE * 6, dtype=torch.float32).view(WORLD_SIZE * 2, 3)
    expected_value = torch.cat([torch.full((2, 3), float(r + 1)) for r in range(WORLD_SIZE)])
    for r, results in enumerate(rank_results):
        assert results["world"].tolist() == [WORLD_SIZE, r]
        torch.testing.assert_close(results["gather/value"], expected_value)
        # Every rank's loss put weights[rows of r] on r's rows; backward sums those.
        torch.testing.assert_close(results["gather/grad"],
                                   WORLD_SIZE * weights[2 * r:2 * r + 2])


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(LOSSES))
def test_rank_values_and_averaged_gradients_match_single_process(
        name: str, rank_results: list[dict[str, torch.Tensor]],
        single_process: dict[str, tuple[torch.Tensor, list[torch.Tensor]]]) -> None:
    loss, grads = single_process[name]
    values = torch.stack([results[f"{name}/loss"] for results in rank_results])
    if name in GATHERED:  # every rank reports the global loss itself
        torch.testing.assert_close(values, loss.expand(WORLD_SIZE), rtol=RTOL, atol=ATOL)
    else:  # per-sample loss, equal local batches: the global loss is the mean over ranks
        torch.testing.assert_close(values.mean(), loss, rtol=RTOL, atol=ATOL)
    for results in rank_results:
        for i, grad in enumerate(grads):
            torch.testing.assert_close(results[f"{name}/grad{i}"], grad, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("key", [f"{wrap}/{name}" for wrap in ("ddp", "ddp_forward")
                                 for name in GATHERED])
def test_ddp_gradients_match_single_process(
        key: str, rank_results: list[dict[str, torch.Tensor]],
        single_process: dict[str, tuple[torch.Tensor, list[torch.Tensor]]]) -> None:
    loss, grads = single_process[key.split("/")[1]]
    for results in rank_results:
        torch.testing.assert_close(results[f"{key}/loss"], loss, rtol=RTOL, atol=ATOL)
        for i, grad in enumerate(grads):
            torch.testing.assert_close(results[f"{key}/grad{i}"], grad, rtol=RTOL, atol=ATOL)
