"""The pretraining checkpoint record and its strict reader, and the parts of the engine's
loop on their own: where a resume starts, the step logger, the deferred loss check and
the checkpoint saver. All fast: no data set, no training."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from tqdm.auto import tqdm

from cluster.distributed import DistInfo
from pretrain.batching import BatchPlan
from pretrain.checkpoint import CHECKPOINT_DIR, LATEST, load_latest, save_checkpoint
from pretrain.checkpoint_state import (
    _CHECKS,
    FORMAT_VERSION,
    PretrainCheckpoint,
    read_checkpoint,
)
from pretrain.engine import (
    CheckpointSaver,
    DeferredLossCheck,
    ResumePoint,
    resume_point,
    start_or_resume,
)
from pretrain.step import NonFiniteLossError
from pretrain.train_log import StepLogger
from tests.conftest import small_pretrain_config

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
STRETCH = {"world_size": 2, "micro_batch": 8, "workers": 1, "block": 32, "batches": 6,
           "done": 2}


def _checkpoint(**changes: object) -> PretrainCheckpoint:
    state = PretrainCheckpoint(
        model={"online_encoder.conv1.weight": torch.arange(6.0).reshape(2, 3),
               "online_encoder.bn1.num_batches_tracked": torch.tensor(3),
               "target_encoder.conv1.weight": torch.ones(2, 3),
               "projector.0.bias": torch.zeros(4)},
        config={"model": {"arch": "resnet18", "in_chans": 1}, "run": {"seed": 0}},
        epoch=2, step=7, optimizer={"state": {0: {"step": torch.tensor(7.0)}},
                                    "param_groups": [{"lr": 0.1, "params": [0]}]},
        zero_shards=None, position=1, global_batch=16, grad_accum=1, world_size=2,
        rng=[{"torch": torch.get_rng_state()}, {"torch": torch.get_rng_state()}],
        loader_stretches=[dict(STRETCH)])
    return dataclasses.replace(state, **changes)


def _assert_same(read: PretrainCheckpoint, written: PretrainCheckpoint) -> None:
    assert read.model.keys() == written.model.keys()
    for key, value in written.model.items():
        assert torch.equal(read.model[key], value), key
    assert torch.equal(read.rng[1]["torch"], written.rng[1]["torch"])
    assert read.optimizer is not None and written.optimizer is not None
    assert torch.equal(read.optimizer["state"][0]["step"], written.optimizer["state"][0]["step"])
    plain = ("config", "epoch", "step", "zero_shards", "position", "global_batch",
             "grad_accum", "world_size", "loader_stretches", "format_version")
    assert {k: getattr(read, k) for k in plain} == {k: getattr(written, k) for k in plain}


def test_round_trip_through_the_writer_and_the_reader(tmp_path: Path) -> None:
    written = _checkpoint()
    path = save_checkpoint(tmp_path, written, keep_as="epoch0002.pt")
    assert path == tmp_path / CHECKPOINT_DIR / LATEST
    for name in (LATEST, "epoch0002.pt"):
        _assert_same(read_checkpoint(tmp_path / CHECKPOINT_DIR / name), written)
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION and set(raw) == set(_CHECKS)
    mapped = read_checkpoint(path, mmap=True)  # the small entries, tensors left on disk
    assert (mapped.config, mapped.epoch, mapped.step) == (written.config, 2, 7)
    loaded = load_latest(tmp_path)
    assert loaded is not None and loaded.step == 7
    assert load_latest(tmp_path / "elsewhere") is None
    # the schema's checks cover exactly its fields
    assert set(_CHECKS) == {f.name for f in dataclasses.fields(PretrainCheckpoint)}


def test_sharded_checkpoints_point_at_their_shards_and_kept_copies_get_their_own(
        tmp_path: Path) -> None:
    folder = tmp_path / CHECKPOINT_DIR
    for step in (3, 6):
        (folder / f"zero-step{step:09d}").mkdir(parents=True)
        (folder / f"zero-step{step:09d}" / "rank00000.pt").write_bytes(b"shard")
    state = _checkpoint(optimizer=None, zero_shards="zero-step000000006")
    save_checkpoint(tmp_path, state, keep_as="epoch0002.pt")
    assert read_checkpoint(folder / LATEST).zero_shards == "zero-step000000006"
    assert read_checkpoint(folder / "epoch0002.pt").zero_shards == "epoch0002-zero"
    assert (folder / "epoch0002-zero" / "rank00000.pt").read_bytes() == b"shard"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
        "epoch0002-zero", "zero-step000000006"]  # the older shards are gone


def test_checkpoints_from_before_format_versions_load_with_the_old_defaults(
        tmp_path: Path) -> None:
    current = _checkpoint().to_dict()
    del current["format_version"]  # exactly as the engine saved it until now
    torch.save(current, tmp_path / "recent.pt")
    _assert_same(read_checkpoint(tmp_path / "recent.pt"), _checkpoint())

    first = {key: current[key] for key in ("model", "optimizer", "epoch", "step", "config")}
    torch.save(first, tmp_path / "first.pt")  # the first engine's checkpoint
    old = read_checkpoint(tmp_path / "first.pt")
    assert (old.position, old.global_batch, old.grad_accum, old.world_size) == (0, None, 1, None)
    assert (old.rng, old.loader_stretches, old.zero_shards) == ([], [], None)
    assert old.format_version == FORMAT_VERSION


def test_encoder_state_dict_is_the_online_encoder_under_timm_names() -> None:
    encoder = _checkpoint().encoder_state_dict()
    assert sorted(encoder) == ["bn1.num_batches_tracked", "conv1.weight"]
    assert torch.equal(encoder["conv1.weight"], torch.arange(6.0).reshape(2, 3))


def _error(path: Path, data: object) -> str:
    torch.save(data, path)
    with pytest.raises(ValueError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    return message


def test_bad_checkpoints_are_refused_naming_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    good = _checkpoint().to_dict()
    assert "format_version 99 is not supported" in _error(path, {**good, "format_version": 99})
    assert "format_version '1' is not supported" in _error(path, {**good, "format_version": "1"})
    assert "(no rng)" in _error(path, {k: v for k, v in good.items() if k != "rng"})
    assert "not a pretrain checkpoint (no model, config, epoch, step)" in _error(
        path, {"conv1.weight": torch.zeros(1)})  # a plain state dict, no version
    assert "holds a list, not a dict" in _error(path, [1, 2])
    assert "key 'epoch' holds str, expected an int" in _error(path, {**good, "epoch": "2"})
    assert "key 'model' holds dict, expected a dict of tensors" in _error(
        path, {**good, "model": {"w": [1.0]}})
    assert "key 'rng' holds list" in _error(path, {**good, "rng": [{"torch": 1}]})
    assert "unknown key 'extra'" in _error(path, {**good, "extra": 1})
    assert "'world_size' does not say how many" in _error(
        path, {**good, "zero_shards": "zero-step000000001", "world_size": None})
    path.write_bytes(b"\x00 not a torch file")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not a pretrain checkpoint \("):
        read_checkpoint(path)
    (tmp_path / CHECKPOINT_DIR).mkdir()
    path.rename(tmp_path / CHECKPOINT_DIR / LATEST)
    with pytest.raises(ValueError, match=r"(?s)cannot load it weights-only.*; move it away"):
        load_latest(tmp_path)


def _plan(world_size: int, global_batch: int, grad_accum: int = 1) -> BatchPlan:
    return BatchPlan(world_size=world_size, grad_accum=grad_accum,
                     micro_batch=global_batch // (world_size * grad_accum),
                     global_batch=global_batch, steps_per_epoch=6, peak_lr=0.1)


def test_resume_point_from_a_checkpoint() -> None:
    assert resume_point(None, _plan(2, 16)) == ResumePoint(0, 0, 0, [])
    saved = _checkpoint(epoch=2, step=16, position=4, world_size=2, global_batch=16)
    # the same batching: exactly where it stopped, with the epoch's loader stretches
    assert resume_point(saved, _plan(2, 16)) == ResumePoint(2, 16, 4, [STRETCH])
    # elastic: one rank left with the same per-rank batch covers 4 x 16 samples in 8 steps
    # of 8, capped at the epoch's 6 steps; 2 x 16 samples in 4 steps
    assert resume_point(saved, _plan(1, 8)).first_step == 6
    assert resume_point(dataclasses.replace(saved, position=2), _plan(1, 8)).first_step == 4
    # another accumulation with the same global batch re-cuts too (same samples, same steps)
    assert resume_point(saved, _plan(2, 16, grad_accum=2)).first_step == 4
    # before the batching was recorded: the current batch is taken as the saved one
    legacy = dataclasses.replace(saved, world_size=None, global_batch=None, grad_accum=1)
    assert resume_point(legacy, _plan(2, 16)).first_step == 4


def test_start_or_resume_restores_weights_optimizer_and_position(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = small_pretrain_config(tmp_path / "data", tmp_path / "run")
    plan = BatchPlan(world_size=1, grad_accum=1, micro_batch=16, global_batch=16,
                     steps_per_epoch=3, peak_lr=1e-3)
    torch.manual_seed(0)
    backend, start = start_or_resume(config, CPU, plan, tmp_path / "run")
    assert start == ResumePoint()
    first = next(backend.method.parameters())  # as if AdamW had taken 5 steps
    backend.optimizer.state[first].update(step=torch.tensor(5.0), exp_avg_sq=torch.zeros_like(
        first), exp_avg=torch.full_like(first, 0.25))
    losses = DeferredLossCheck(rank=0)
    losses.push(torch.tensor(1.5), step=4)
    CheckpointSaver(tmp_path / "run", config, plan, CPU, backend, writer=None).save(
        epoch_done=1, steps_done=2, step=5, losses=losses, reading=None)
    assert "resuming" not in capsys.readouterr().out

    torch.manual_seed(1)  # another seed: the weights must come from the checkpoint
    again, start = start_or_resume(config, CPU, plan, tmp_path / "run")
    assert start == ResumePoint(epoch=1, step=5, first_step=2, stretches=[])
    for (name, before), after in zip(backend.method.state_dict().items(),
                                     again.method.state_dict().values(), strict=True):
        assert torch.equal(before, after), name
    restored = again.optimizer.state[next(again.method.parameters())]
    assert torch.equal(restored["exp_avg"], torch.full_like(first, 0.25))
    assert (f"resuming from {tmp_path / 'run' / CHECKPOINT_DIR / LATEST}: epoch 2 of 2, "
            "step 5 of 6") in capsys.readouterr().out


class _Writer:
    def __init__(self) -> None:
        self.scalars: dict[str, dict[int, float]] = {}
        self.histograms: list[int] = []
        self.images: list[int] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.setdefault(tag, {})[step] = value

    def add_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self.histograms.append(step)

    def add_images(self, tag: str, images: torch.Tensor, step: int) -> None:
        self.images.append(step)


class _Method(nn.Module):
    uses_momentum = True

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 4)

    def embed(self, views: torch.Tensor) -> torch.Tensor:
        return self.head(views.flatten(1))


def test_step_logger_writes_the_scalars_at_log_every() -> None:
    # the start, then each log reads the clock twice: its elapsed time, and its own end
    times = iter([100.0, 104.0, 104.0, 111.0, 111.0, 123.0, 123.0])
    writer = _Writer()
    logger = StepLogger(writer, tqdm(disable=True), _Method(), log_every=2,  # type: ignore[arg-type]
                        global_batch=16, steps_per_epoch=4, launch_step=0,
                        clock=lambda: next(times))
    views = SimpleNamespace(last=(torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4)),
                            wait_s=0.0)
    reads: list[int] = []
    for step in range(1, 6):
        views.wait_s += 1.0
        logger.after_step(step, epoch=(step - 1) // 4, progress=step - 1, lr=0.1 * step,
                          momentum=0.99, views=views,
                          loss=lambda step=step: reads.append(step) or 2.0 + step)
        if step == 3:
            logger.exclude(5.0)  # a probe ran: its time is no training time
    assert reads == [1, 2, 4]  # the loss is read (a host sync) only when a log is due
    assert writer.scalars["train/loss"] == {1: 3.0, 2: 4.0, 4: 6.0}
    assert writer.scalars["train/lr"] == pytest.approx({1: 0.1, 2: 0.2, 4: 0.4})
    assert writer.scalars["train/epoch"] == {1: 0.0, 2: 0.25, 4: 0.75}
    assert writer.scalars["train/tau"] == {1: 0.99, 2: 0.99, 4: 0.99}
    # 2 views x 16 samples per step: 1 step in 4 s, 1 in 7 s, 2 in 12 - 5 s
    assert writer.scalars["perf/views_per_s"] == pytest.approx({1: 8.0, 2: 32 / 7, 4: 64 / 7})
    assert writer.scalars["perf/data_wait_fraction"] == pytest.approx(
        {1: 1 / 4, 2: 1 / 7, 4: 2 / 7})
    assert views.wait_s == 1.0  # reset at step 4's log
    assert writer.histograms == [1, 2, 4] and writer.images == [1]


def test_deferred_loss_check_is_one_step_late() -> None:
    losses = DeferredLossCheck(rank=3)
    losses.push(torch.tensor(float("nan")), step=7)  # not looked at yet: no host sync
    with pytest.raises(NonFiniteLossError, match="at step 7 on rank 3"):
        losses.push(torch.tensor(1.0), step=8)
    losses = DeferredLossCheck(rank=0)
    losses.push(torch.tensor(2.5), step=0)
    assert losses.settle() == 2.5 and losses.unchecked_loss is None
    assert losses.settle() == 2.5  # the last loss read stays


def _saver(tmp_path: Path) -> CheckpointSaver:
    config = small_pretrain_config(tmp_path / "data", tmp_path / "run", keep_epochs=[1])
    plan = BatchPlan(world_size=1, grad_accum=2, micro_batch=8, global_batch=16,
                     steps_per_epoch=3, peak_lr=0.1)
    method = nn.Linear(2, 2)
    backend = SimpleNamespace(method=method, sharded_optimizer=False,
                              optimizer_state=lambda: {"state": {}, "param_groups": []})
    return CheckpointSaver(tmp_path / "run", config, plan, CPU, backend,  # type: ignore[arg-type]
                           writer=None)


def test_checkpoint_saver_refuses_a_non_finite_pending_loss(tmp_path: Path) -> None:
    saver = _saver(tmp_path)
    losses = DeferredLossCheck(rank=0)
    losses.push(torch.tensor(float("inf")), step=2)
    with pytest.raises(NonFiniteLossError, match="at step 2 on rank 0"):
        saver.save(epoch_done=1, steps_done=0, step=3, losses=losses, reading=None)
    assert not (tmp_path / "run" / CHECKPOINT_DIR).exists()


def test_checkpoint_saver_records_the_run_state(tmp_path: Path) -> None:
    saver = _saver(tmp_path)
    assert [saver.due(step, done) for step, done in ((2, 2), (3, 3), (1, 1))] == \
        [False, False, False]  # run.checkpoint_every=0: epoch ends only
    saver.config.run.checkpoint_every = 2
    assert [saver.due(step, done) for step, done in ((2, 2), (4, 3), (4, 1))] == \
        [True, False, True]  # not at an epoch's last step: its end saves anyway
    losses = DeferredLossCheck(rank=0)
    losses.push(torch.tensor(0.5), step=2)
    saver.save(epoch_done=1, steps_done=0, step=3, losses=losses, reading=None)
    assert losses.value == 0.5
    saved = read_checkpoint(tmp_path / "run" / CHECKPOINT_DIR / "epoch0001.pt")
    assert (saved.epoch, saved.position, saved.step, saved.world_size) == (1, 0, 3, 1)
    assert (saved.global_batch, saved.grad_accum, saved.zero_shards) == (16, 2, None)
    assert saved.config["run"]["keep_epochs"] == [1] and len(saved.rng) == 1
    assert saved.optimizer == {"state": {}, "param_groups": []}
    assert saved.model.keys() == {"weight", "bias"} and saved.loader_stretches == []
    saver.save(epoch_done=1, steps_done=2, step=5, losses=losses, reading=None)
    assert read_checkpoint(tmp_path / "run" / CHECKPOINT_DIR / LATEST).position == 2
    assert read_checkpoint(tmp_path / "run" / CHECKPOINT_DIR / "epoch0001.pt").step == 3
