"""GlobalBatchNorm: two real gloo ranks compute what one process computes on the whole batch.

Two processes are spawned once per module; each runs every scenario (equal and unequal
shards, an empty shard, 1D and 2D inputs, DDP, bf16 autocast with channels_last) and
saves what it saw. The parent runs the original, unconverted model on the concatenated
batch and compares outputs, losses, gradients and running statistics.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from pretrain.sync_batchnorm import GlobalBatchNorm, GlobalBatchNormAct2d, convert_sync_batchnorm

WORLD_SIZE = 2
STEPS = 2  # two optimiser steps: running averages, num_batches_tracked, momentum=None
BATCH = 8
SCENARIOS: dict[str, dict] = {
    "equal": {"model": "conv", "split": (4, 4)},
    "unequal": {"model": "conv", "split": (5, 3)},
    "empty_shard": {"model": "conv", "split": (8, 0)},
    "sequence": {"model": "sequence", "split": (3, 5)},
    # BatchNorm input with mean/std of 50: float32 inputs are quantised to ~1e-5 of the
    # std, while E[x^2] - E[x]^2 in float32 would put the outputs off by ~5e-4
    "large_mean": {"model": "input_norm", "split": (5, 3), "offset": 100.0,
                   "tolerance": {"rtol": 1e-5, "atol": 2e-5}},
    "ddp": {"model": "conv", "split": (4, 4), "ddp": True},
    "bf16_channels_last": {"model": "conv", "split": (5, 3), "bf16": True,
                           "tolerance": {"rtol": 2e-2, "atol": 2e-2}},
}


# --- models, data and the training loop shared by the ranks and the reference -----------

def _build(kind: str) -> nn.Module:
    """Same seed, same weights: every rank and the reference start identical.

    (No timm layers here: importing timm would add seconds to each spawned rank; the
    conversion of timm's BatchNormAct2d is tested in one process below.)
    """
    torch.manual_seed(0)
    if kind == "conv":
        model = nn.Sequential(
            nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2), nn.BatchNorm2d(8), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(8, 16), nn.BatchNorm1d(16, momentum=None), nn.ReLU(), nn.Linear(16, 4),
        )
    elif kind == "input_norm":  # BatchNorm1d straight on the (N, C, L) input
        model = nn.Sequential(nn.BatchNorm1d(3), nn.Flatten(), nn.Linear(3 * 10, 4))
    else:  # (N, C, L) sequences through BatchNorm1d
        model = nn.Sequential(
            nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5, affine=False), nn.ReLU(),
            nn.Conv1d(5, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(4 * 6, 4),
        )
    # Non-trivial affine parameters and running statistics to start from.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                if module.affine:
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.8, 1.2)
    return model


def _batch(kind: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    shape = (BATCH, 2, 8, 8) if kind == "conv" else (BATCH, 3, 10)
    inputs = torch.randn(shape, generator=generator) * 2.0 + 0.7
    return inputs, torch.randn(BATCH, 4, generator=generator)


def _train(model: nn.Module, spec: dict, rows: slice, *,
           reduce_grads: Callable[[nn.Module], None] | None = None,
           runner: nn.Module | None = None, local_mean: bool = False) -> dict[str, torch.Tensor]:
    """STEPS SGD steps on ``rows`` of each batch; the loss is the per-sample squared error
    summed over ``rows`` and divided by the global batch (or the local mean, for DDP)."""
    runner = runner if runner is not None else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    bf16 = spec.get("bf16", False)
    record: dict[str, torch.Tensor] = {}
    for step in range(STEPS):
        inputs, targets = _batch(spec["model"], step)
        x, target = inputs[rows] + spec.get("offset", 0.0), targets[rows]
        if bf16:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                    else contextlib.nullcontext())
        with autocast:
            out = runner(x)
        per_sample = (out.float() - target).square().mean(dim=1)
        loss = per_sample.mean() if local_mean else per_sample.sum() / BATCH
        optimizer.zero_grad()
        loss.backward()
        if reduce_grads is not None:
            reduce_grads(model)
        record[f"out{step}"] = out.detach().float()
        record[f"loss{step}"] = loss.detach()
        if step == STEPS - 1:
            for name, param in model.named_parameters():
                record[f"grad.{name}"] = param.grad.detach().clone()
        optimizer.step()
    for name, buffer in model.named_buffers():
        record[f"buffer.{name}"] = buffer.detach().clone()
    return record


def _rows(split: tuple[int, ...], rank: int) -> slice:
    start = sum(split[:rank])
    return slice(start, start + split[rank])


# --- the two spawned ranks -------------------------------------------------------------

def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return names[0] if names else "lo"


def _join_group(rank: int, rendezvous: Path) -> None:
    """A gloo group whose TCP store and gloo sockets listen on 127.0.0.1 only.

    ``init_method="tcp://127.0.0.1:PORT"`` would make the store listen on all
    interfaces, so rank 0 binds the socket itself and hands the store its descriptor;
    that also removes the race of picking a free port first.
    """
    os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()
    timeout = datetime.timedelta(seconds=60)
    port_file = rendezvous / "port"
    if rank == 0:
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]
        # Published first: the socket already listens, and the master store waits for
        # the other rank to connect before it returns.
        (rendezvous / "port.tmp").write_text(str(port))
        (rendezvous / "port.tmp").rename(port_file)
        store = dist.TCPStore("127.0.0.1", port, WORLD_SIZE, True, timeout,
                              master_listen_fd=server.detach())
    else:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("rank 0 did not publish its port")
            time.sleep(0.05)
        store = dist.TCPStore("127.0.0.1", int(port_file.read_text()), WORLD_SIZE, False,
                              timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD_SIZE,
                            timeout=timeout)


def _sum_grads(model: nn.Module) -> None:
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    _join_group(rank, Path(out_dir))
    try:
        for name, spec in SCENARIOS.items():
            model = convert_sync_batchnorm(_build(spec["model"]), "cpu")
            rows = _rows(spec["split"], rank)
            seen: dict[str, torch.Tensor] = {}
            if spec.get("bf16"):
                first_norm = next(m for m in model.modules() if isinstance(m, GlobalBatchNorm))

                def look(_module, _inputs, output, seen=seen):
                    seen["norm_out_bf16"] = torch.tensor(output.dtype == torch.bfloat16)
                    seen["norm_out_channels_last"] = torch.tensor(
                        output.is_contiguous(memory_format=torch.channels_last))

                first_norm.register_forward_hook(look)
            if spec.get("ddp"):
                record = _train(model, spec, rows, runner=DistributedDataParallel(model),
                                local_mean=True)
            else:
                record = _train(model, spec, rows, reduce_grads=_sum_grads)
            record.update(seen)
            # Eval mode is BatchNorm: the same output as the original class given the
            # same state (whose keys conversion kept).
            original = _build(spec["model"])
            original.load_state_dict(model.state_dict())
            x = _batch(spec["model"], 0)[0][rows] + spec.get("offset", 0.0)
            with torch.no_grad():
                record["eval_out"] = model.eval()(x)
                record["eval_out_original"] = original.eval()(x)
            torch.save(record, Path(out_dir) / f"{name}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("sync_batchnorm")
    context = mp.start_processes(_worker, args=(str(out_dir),), nprocs=WORLD_SIZE,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):  # raises with the traceback if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail("the two gloo ranks did not finish within 120 s (deadlock?)")
    return out_dir


def _load(out_dir: Path, name: str) -> list[dict[str, torch.Tensor]]:
    return [torch.load(out_dir / f"{name}.rank{rank}.pt", weights_only=True)
            for rank in range(WORLD_SIZE)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_match_one_process_on_the_whole_batch(two_rank_results: Path,
                                                        name: str) -> None:
    spec = SCENARIOS[name]
    ranks = _load(two_rank_results, name)
    reference = _train(_build(spec["model"]), spec, slice(None))
    tolerance = spec.get("tolerance", {"rtol": 1e-5, "atol": 1e-6})

    for step in range(STEPS):
        outputs = torch.cat([record[f"out{step}"] for record in ranks])
        torch.testing.assert_close(outputs, reference[f"out{step}"], **tolerance)
        losses = torch.stack([record[f"loss{step}"] for record in ranks])
        loss = losses.mean() if spec.get("ddp") else losses.sum()
        torch.testing.assert_close(loss, reference[f"loss{step}"], **tolerance)
    grads = [key for key in reference if key.startswith("grad.")]
    buffers = [key for key in reference if key.startswith("buffer.")]
    assert grads and buffers
    assert {k for k in ranks[0] if k.startswith(("grad.", "buffer."))} == {*grads, *buffers}
    for record in ranks:
        for key in grads + buffers:
            torch.testing.assert_close(record[key], reference[key], **tolerance,
                                       msg=lambda m, key=key: f"{key}: {m}")
        assert torch.equal(record["eval_out"], record["eval_out_original"])
    for key in buffers:  # identical on both ranks, not merely close
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    if spec.get("bf16"):
        for record in ranks:
            assert record["norm_out_bf16"] and record["norm_out_channels_last"]


# --- single process: conversion and the BatchNorm fallback -----------------------------

def _norm_cases() -> list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]]:
    return [
        ("bn1d_nc", lambda: nn.BatchNorm1d(5), (6, 5)),
        ("bn1d_ncl", lambda: nn.BatchNorm1d(5, momentum=None), (6, 5, 7)),
        ("bn2d", lambda: nn.BatchNorm2d(4), (3, 4, 5, 5)),
        ("bn2d_no_affine", lambda: nn.BatchNorm2d(4, affine=False), (3, 4, 5, 5)),
        ("bn2d_no_running", lambda: nn.BatchNorm2d(4, track_running_stats=False),
         (3, 4, 5, 5)),
        ("bn3d", lambda: nn.BatchNorm3d(3), (2, 3, 4, 4, 4)),
    ]


def _assert_same_as_batchnorm(make: Callable[[], nn.Module], shape: tuple[int, ...],
                              channels_last: bool = False, bf16: bool = False) -> None:
    torch.manual_seed(1)
    original = make()
    if original.affine:
        with torch.no_grad():
            original.weight.uniform_(0.5, 1.5)
            original.bias.uniform_(-0.5, 0.5)
    converted = convert_sync_batchnorm(copy.deepcopy(original), "cpu")
    assert isinstance(converted, GlobalBatchNorm)
    x = torch.randn(shape) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for module in (original, converted):
        for step in range(2):
            inputs = (x + step).requires_grad_()
            autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                        else contextlib.nullcontext())
            with autocast:
                out = module(inputs.bfloat16() if bf16 else inputs)
            out.float().square().sum().backward()
            module._seen = (out, inputs.grad)  # type: ignore[attr-defined]
    for got, expected in zip(converted._seen, original._seen, strict=True):
        assert got.dtype == expected.dtype
        assert torch.equal(got, expected)
    assert list(converted.state_dict()) == list(original.state_dict())
    for key, value in original.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    for (name, param), (_, other) in zip(converted.named_parameters(),
                                         original.named_parameters(), strict=True):
        assert torch.equal(param.grad, other.grad), name
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), original.eval()(x))


@pytest.mark.parametrize(("name", "make", "shape"), _norm_cases(),
                         ids=[case[0] for case in _norm_cases()])
def test_without_process_group_it_is_batchnorm(name: str, make, shape) -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    _assert_same_as_batchnorm(make, shape)


def test_channels_last_and_bf16_autocast_without_process_group() -> None:
    _assert_same_as_batchnorm(lambda: nn.BatchNorm2d(4), (3, 4, 5, 5), channels_last=True)
    _assert_same_as_batchnorm(lambda: nn.BatchNorm2d(4), (3, 4, 5, 5), channels_last=True,
                              bf16=True)


@contextlib.contextmanager
def _group_of_one(tmp_path: Path) -> Iterator[None]:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_world_size_one_is_batchnorm(tmp_path: Path) -> None:
    with _group_of_one(tmp_path):
        for _, make, shape in _norm_cases():
            _assert_same_as_batchnorm(make, shape)


def test_wrong_input_rank_is_rejected_like_batchnorm() -> None:
    converted = convert_sync_batchnorm(nn.BatchNorm2d(3), "cpu")
    with pytest.raises(ValueError, match="expected 4D input"):
        converted(torch.randn(2, 3, 4))


def test_timm_resnet18_keeps_state_dict_keys_and_parameters() -> None:
    import timm

    model = timm.create_model("resnet18", num_classes=0, in_chans=1)
    for param in model.bn1.parameters():  # a frozen layer stays frozen
        param.requires_grad_(False)
    model.layer1.eval()  # and a layer in eval mode stays in eval mode
    keys = list(model.state_dict())
    params = {name: param for name, param in model.named_parameters()}
    norms = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    converted = convert_sync_batchnorm(model, "cpu")

    assert list(converted.state_dict()) == keys
    modules = dict(converted.named_modules())
    assert norms and all(type(modules[name]) is GlobalBatchNorm for name in norms)
    for name, param in converted.named_parameters():
        assert param is params[name]  # the same objects: optimizer state, requires_grad
    assert not converted.bn1.weight.requires_grad and converted.layer2[0].bn1.weight.requires_grad
    assert not converted.layer1[0].bn1.training and converted.layer2[0].bn1.training
    assert converted.bn1.input_dims == (4,)
    converted.load_state_dict(timm.create_model("resnet18", num_classes=0,
                                                in_chans=1).state_dict())


def test_timm_batchnorm_act_keeps_activation_drop_and_keys() -> None:
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(1, 4, 3),
                             BatchNormAct2d(4, act_layer=nn.PReLU, drop_layer=nn.Identity))
    with torch.no_grad():
        original[1].act.weight.fill_(0.1)
        original[1].bias.fill_(-0.3)
    converted = convert_sync_batchnorm(copy.deepcopy(original), "cpu")
    norm = converted[1]
    assert type(norm) is GlobalBatchNormAct2d
    assert isinstance(norm.act, nn.PReLU) and isinstance(norm.drop, nn.Identity)
    assert list(converted.state_dict()) == list(original.state_dict())
    assert "1.act.weight" in converted.state_dict()
    x = torch.randn(3, 1, 6, 6)
    assert torch.equal(converted(x), original(x))
    assert (original(x) < 0).any()  # the activation (PReLU) was applied, not lost


def test_cuda_conversion_uses_pytorch_sync_batchnorm_and_keeps_timm_activation() -> None:
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    original = nn.Sequential(nn.BatchNorm2d(3), BatchNormAct2d(3, act_layer=nn.SiLU),
                             nn.Linear(3, 3), nn.BatchNorm1d(3))
    keys = list(original.state_dict())
    converted = convert_sync_batchnorm(original, "cuda")
    assert type(converted[0]) is nn.SyncBatchNorm and type(converted[3]) is nn.SyncBatchNorm
    assert type(converted[1]) is SyncBatchNormAct and isinstance(converted[1].act, nn.SiLU)
    assert list(converted.state_dict()) == keys


def test_batchnorm_with_its_own_forward_is_left_alone_with_a_warning() -> None:
    from timm.layers import SplitBatchNorm2d

    model = nn.Sequential(SplitBatchNorm2d(4, num_splits=2))
    with pytest.warns(UserWarning, match="SplitBatchNorm2d defines its own forward"):
        converted = convert_sync_batchnorm(model, "cpu")
    assert type(converted[0]) is SplitBatchNorm2d


def test_uninitialised_lazy_batchnorm_is_an_error() -> None:
    with pytest.raises(ValueError, match="run one forward pass"):
        convert_sync_batchnorm(nn.Sequential(nn.LazyBatchNorm2d()), "cpu")


def test_byol_conversion_keeps_keys_and_frozen_target() -> None:
    from pretrain.methods.byol import BYOL
    from pretrain.weights import create_encoder

    byol = BYOL(create_encoder("resnet18", 1), 512, hidden=32, projection_dim=16)
    keys = list(byol.state_dict())
    trainable = [name for name, p in byol.named_parameters() if p.requires_grad]
    converted = convert_sync_batchnorm(byol, "cpu")
    assert list(converted.state_dict()) == keys
    assert [name for name, p in converted.named_parameters() if p.requires_grad] == trainable
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
