"""The DeepSpeed backend on 2 CPU ranks (DS_ACCELERATOR=cpu, gloo), launched by torchrun:
ZeRO stage 2 computes what DDP computes, saves per-rank optimizer shards that load with
``weights_only=True``, and a run resumed from a saved checkpoint ends where an
uninterrupted one ends."""

from __future__ import annotations

import subprocess
from pathlib import Path

# DeepSpeed is a test dependency (`make test` installs it): imported plainly so a missing
# install fails instead of skipping.
import deepspeed  # noqa: F401
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cluster.storage import join
from cluster.storage.mirror import FolderMirror
from cluster.storage.objects import list_files, read_bytes, upload
from pretrain.checkpoint import CHECKPOINT_DIR, LATEST, shard_name
from pretrain.checkpoint_state import PretrainCheckpoint, read_checkpoint
from pretrain.probe_log import PROBE_FILE, read_probe_log
from tests.launching import free_port, torchrun, worker_env
from tests.s3_support import S3Server

STEPS = 4  # 2 epochs of 2 optimizer steps, each of 2 micro batches per rank


def read_checkpoint_at(url: str, tmp_path: Path) -> PretrainCheckpoint:
    path = tmp_path / "fetched.pt"
    path.write_bytes(read_bytes(url))
    return read_checkpoint(path)


def _run(prepared: Path, out: Path | str, *settings: str) -> None:
    command = torchrun(
        "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "pretrain",
        f"data.path={prepared}", f"run.out={out}", "run.device=cpu", "run.progress=false",
        "run.log_every=1", "run.keep_epochs=[1]", "run.precision=fp32",
        # timm's 0.4 M-parameter ResNet: small checkpoints and shards, fast steps
        "model.arch=test_resnet", "data.crop_size=32", "data.batch_size=16", "data.workers=1",
        "data.epoch_samples=32", "optim.epochs=2", "optim.grad_accum=2",
        "method.projector_hidden=64", "method.projection_dim=32", *settings,
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=400,
                          env=worker_env(DS_ACCELERATOR="cpu"))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def _losses(run: Path) -> dict[int, float]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def _backbone(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "backbone.safetensors"))


PROBE = ("probe.every_epochs=1", "probe.steps=5", "probe.budget=8", "probe.val_volumes=2")


@pytest.mark.slow
def test_zero2_matches_ddp_and_resumes_from_its_shards(prepared: Path, tmp_path: Path,
                                                       s3: S3Server) -> None:
    ddp, zero = tmp_path / "ddp", tmp_path / "zero2"
    _run(prepared, ddp, *PROBE)  # the live probe on rank 0 of two DDP ranks
    _run(prepared, zero, "run.backend=deepspeed", "run.zero_stage=2")
    assert [r["step"] for r in read_probe_log(ddp / PROBE_FILE)] == [0, 2, 4]

    # Same batches, same augmentations, same AdamW: DeepSpeed's gradient averaging and
    # accumulation compute what DDP's do (and the probe in the DDP run changed nothing).
    reference, losses = _losses(ddp), _losses(zero)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in losses:
        assert losses[step] == pytest.approx(reference[step], rel=1e-4), step
    for key, value in _backbone(ddp).items():
        torch.testing.assert_close(_backbone(zero)[key], value, rtol=1e-4, atol=1e-5)

    # The checkpoint points at one shard per rank; every file loads weights-only.
    folder = zero / CHECKPOINT_DIR
    latest = read_checkpoint(folder / LATEST)
    assert latest.optimizer is None and latest.world_size == 2 and latest.zero_shards
    shards = sorted((folder / latest.zero_shards).iterdir())
    assert [p.name for p in shards] == [shard_name(0), shard_name(1)]
    halves = [torch.load(p, weights_only=True) for p in shards]
    sizes = [sum(t.numel() for t in h["single_partition_of_fp32_groups"]) for h in halves]
    trainable = sum(p.numel() for p in _backbone(ddp).values())
    assert abs(sizes[0] - sizes[1]) <= 64 and sum(sizes) > trainable  # sharded, not copied
    # Only the latest shards and the kept epoch's copy remain.
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(
        [latest.zero_shards, "epoch0001-zero"])

    # A run restarted from the kept end-of-epoch-1 checkpoint (weights and sharded
    # optimizer state) finishes exactly like the uninterrupted one; here the run folder
    # lives in an object store and the node starts with an empty disk: each rank uploads
    # its own shard, last.pt goes up after them, shards no checkpoint names are deleted.
    url = join(s3.new_bucket(), "runs", "zero2")
    upload(folder / "epoch0001.pt", join(url, CHECKPOINT_DIR, LATEST))
    for rank in (0, 1):
        upload(folder / "epoch0001-zero" / shard_name(rank),
               join(url, CHECKPOINT_DIR, "epoch0001-zero", shard_name(rank)))
    _run(prepared, url, "run.backend=deepspeed", "run.zero_stage=2",
         f"run.local_dir={tmp_path / 'node'}", *PROBE)
    stored = {name for name in list_files(url) if name.startswith(CHECKPOINT_DIR)}
    final = read_checkpoint_at(join(url, CHECKPOINT_DIR, LATEST), tmp_path)
    assert stored == {f"{CHECKPOINT_DIR}/{LATEST}", *(
        f"{CHECKPOINT_DIR}/{shards}/{shard_name(r)}" for r in (0, 1)
        for shards in (final.zero_shards, "epoch0001-zero"))}
    assert final.zero_shards != "epoch0001-zero" and final.step == STEPS
    resumed = tmp_path / "resumed"
    FolderMirror(resumed, url).pull()
    # the restart probes its checkpoint's encoder, then the end of epoch 2
    assert [r["step"] for r in read_probe_log(resumed / PROBE_FILE)] == [2, 4]
    after = _losses(resumed)
    assert sorted(after) == [3, 4]  # epoch 1's steps were not run again (probe or not)
    for step in after:
        assert after[step] == pytest.approx(losses[step], rel=1e-5), step
    for key, value in _backbone(zero).items():
        torch.testing.assert_close(_backbone(resumed)[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_one_process_zero1_run_and_the_settings_a_resume_must_keep(prepared: Path,
                                                                   tmp_path: Path) -> None:
    """A plain `python -m pretrain` (a world of one) runs under DeepSpeed too; its sharded
    checkpoint refuses a resume under DDP instead of loading half a state."""
    import sys

    out = tmp_path / "run"
    base = [sys.executable, "-m", "pretrain", f"data.path={prepared}", f"run.out={out}",
            "run.device=cpu", "run.progress=false", "model.arch=resnet18",
            "data.crop_size=32", "data.batch_size=16", "data.workers=1",
            "data.epoch_samples=32", "optim.epochs=1", "method.projector_hidden=64",
            "method.projection_dim=32"]
    env = worker_env(DS_ACCELERATOR="cpu")
    done = subprocess.run([*base, "run.backend=deepspeed", "run.zero_stage=1"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    latest = read_checkpoint(out / CHECKPOINT_DIR / LATEST)
    assert latest.zero_shards is not None
    assert [p.name for p in (out / CHECKPOINT_DIR / latest.zero_shards).iterdir()] == \
        [shard_name(0)]
    again = subprocess.run([*base, "optim.epochs=2"], capture_output=True, text=True,
                           timeout=300, env=env)
    assert again.returncode != 0
    assert "keeps the optimizer state sharded" in again.stderr
    assert "run.backend=ddp, run.zero_stage=0 cannot load" in again.stderr


def test_lars_is_refused_where_zero_flattens_its_layers() -> None:
    from cluster.distributed import DistInfo
    from pretrain.config import MethodConfig
    from pretrain.deepspeed_backend import DeepSpeedBackend
    from pretrain.methods import build_method
    from pretrain.optim import build_pretrain_optimizer
    from pretrain.weights import create_encoder

    method = build_method(MethodConfig(projector_hidden=16, projection_dim=8),
                          create_encoder("resnet18", 1))
    lars = build_pretrain_optimizer("lars", method, lr=0.1, weight_decay=1e-6, momentum=0.9,
                                    eta=1e-3)
    with pytest.raises(ValueError, match=r"use run\.zero_stage=0 or optim\.name=adamw"):
        DeepSpeedBackend(method, lars, DistInfo(0, 1, 0, torch.device("cpu")),
                         micro_batch=8, grad_accum=1, zero_stage=2, precision="fp32",
                         channels_last=False, compile=False)
