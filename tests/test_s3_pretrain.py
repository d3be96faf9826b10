"""Pretraining from and into an object store: a real S3 server (moto's) on loopback.

The loader reading ``s3://`` shards delivers exactly what it delivers from local files
(2 ranks under torchrun, 2 workers each), also through connection resets and stalls; a
server gone for good ends the run with one error line; and a run whose folder lives in
the store, killed mid-epoch, resumes on a node with an empty disk and ends with the
weights of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cluster.storage import join
from cluster.storage.objects import list_files, read_bytes
from data_prep.shard_cache import ShardCache
from pretrain.checkpoint_state import read_checkpoint
from pretrain.data import Stretch, build_loader
from tests.launching import free_port, torchrun, worker_env
from tests.s3_support import FaultProxy, FaultSchedule, S3Server, environment, upload_tree

FAST_RETRIES = {"MEDSSL_STORAGE_ATTEMPTS": "5", "MEDSSL_STORAGE_TIMEOUT": "1",
                "MEDSSL_STORAGE_BACKOFF": "0.01"}


@pytest.fixture(scope="module")
def remote_dataset(prepared: Path, s3: S3Server) -> str:
    return upload_tree(prepared, join(s3.new_bucket(), "datasets", "phantom"))


def digests(location: str, stretch: Stretch, **options: object) -> list[list[str]]:
    loader = build_loader(location, seed=5, epoch=0, rank=0, stretch=stretch, **options)
    return [[hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in batch]
            for batch in loader]


@pytest.mark.slow
def test_two_ranks_read_the_same_batches_from_s3_as_from_files(
        prepared: Path, remote_dataset: str, tmp_path: Path) -> None:
    command = torchrun("--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
                       f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                       str(Path(__file__).with_name("s3_loader_order.py")), str(tmp_path),
                       str(prepared), remote_dataset)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=worker_env(PYTHONPATH=str(Path(__file__).parents[1])))
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        local, remote = rank[str(prepared)], rank[remote_dataset]
        assert len(local) >= 4 and all(len(batch) == 8 for batch in local)
        assert remote == local  # same samples, same order, bit for bit
    seen = [{key for batch in rank[str(prepared)] for key in batch} for rank in ranks]
    assert not seen[0] & seen[1]  # the ranks split the epoch


def test_resets_and_stalls_change_nothing(prepared: Path, remote_dataset: str,
                                          s3: S3Server, tmp_path: Path) -> None:
    stretch = Stretch(world_size=1, micro_batch=8, workers=2, block=24, batches=12)
    expected = digests(str(prepared), stretch)
    # connections 2, 5 and 9 are reset mid-response, 3 and 7 stall past the timeout
    schedule = FaultSchedule(reset_after_bytes={2: 3000, 5: 700, 9: 20_000},
                             stall_seconds={3: 2.5, 7: 2.5})
    proxy = FaultProxy(s3.port, schedule)
    try:
        with environment({"AWS_ENDPOINT_URL": proxy.endpoint, **FAST_RETRIES}):
            assert digests(remote_dataset, stretch, read_ahead=3) == expected
    finally:
        proxy.close()
    assert proxy.resets >= 2 and proxy.stalls >= 1, (proxy.resets, proxy.stalls)


def test_cache_keeps_whole_shards_and_serves_later_reads(
        prepared: Path, remote_dataset: str, tmp_path: Path) -> None:
    stretch = Stretch(world_size=1, micro_batch=8, workers=0, block=16, batches=10)
    expected = digests(str(prepared), stretch)
    shard_bytes = sorted(p.stat().st_size for p in (prepared / "shards").glob("*.tar"))
    cache = ShardCache(tmp_path / "cache", max_bytes=sum(shard_bytes[-2:]))
    assert digests(remote_dataset, stretch, cache=cache) == expected
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(list(cache.folder.glob("*.tar"))) < 2:
        time.sleep(0.05)
    assert not cache.failures
    copies = sorted(cache.folder.glob("*.tar"))
    assert 1 <= len(copies) <= 2  # bounded: at most what max_bytes holds
    assert sum(p.stat().st_size for p in copies) <= cache.max_bytes
    # a later epoch reads the cached shards from disk: the same samples
    assert digests(remote_dataset, stretch, cache=cache) == expected


def _run(data: str, out: str, env: dict[str, str], *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "pretrain", f"data.path={data}", f"run.out={out}",
               "run.device=cpu", "run.progress=false", "run.log_every=1",
               # timm's 0.4 M-parameter ResNet: checkpoints of a few MB to upload each step
               "model.arch=test_resnet",
               "data.crop_size=32", "data.batch_size=16", "data.workers=1",
               "data.epoch_samples=48", "optim.epochs=4", "method.projector_hidden=64",
               "method.projection_dim=32", "run.checkpoint_every=1", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            start_new_session=True)


@pytest.mark.slow
def test_run_in_s3_killed_mid_epoch_resumes_on_an_empty_node(
        prepared: Path, remote_dataset: str, s3: S3Server, tmp_path: Path) -> None:
    reference = _run(str(prepared), str(tmp_path / "reference"), {})
    out = join(s3.new_bucket(), "runs", "byol")
    first = _run(remote_dataset, out, {}, f"run.local_dir={tmp_path / 'node-a'}")
    latest = join(out, "checkpoints", "last.pt")
    killed, deadline = None, time.monotonic() + 240
    while first.poll() is None and time.monotonic() < deadline:
        if "checkpoints/last.pt" in list_files(out):
            state = read_checkpoint_bytes(read_bytes(latest), tmp_path)
            if 3 <= state.step <= 8 and state.position > 0:
                os.killpg(first.pid, signal.SIGKILL)  # the node dies mid-epoch
                killed = state.step
                break
        time.sleep(0.05)
    first.wait(timeout=60)
    assert killed is not None, "the run ended before it could be killed"
    # another node, empty disk: all it has is the URL
    second = _run(remote_dataset, out, {}, f"run.local_dir={tmp_path / 'node-b'}")
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr[-3000:]
    assert f"of {out} into" in stdout and "resuming from" in stdout
    stdout, stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, stderr[-3000:]

    remote = list_files(out)
    assert {"config.yaml", "run_info.json", "export/backbone.safetensors",
            "export/backbone.json", "checkpoints/last.pt"} <= set(remote)
    assert sum(name.startswith("tensorboard/") for name in remote) >= 2  # both launches
    final = read_checkpoint_bytes(read_bytes(latest), tmp_path)
    assert (final.epoch, final.position, final.step) == (4, 0, 12)
    export = tmp_path / "remote-backbone.safetensors"
    export.write_bytes(read_bytes(join(out, "export", "backbone.safetensors")))
    a = load_file(str(tmp_path / "reference" / "export" / "backbone.safetensors"))
    b = load_file(str(export))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def read_checkpoint_bytes(data: bytes, tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / f"probe-{time.monotonic_ns()}.pt"
    path.write_bytes(data)
    try:
        return read_checkpoint(path)
    finally:
        path.unlink()


@pytest.mark.slow
def test_server_gone_mid_run_is_one_error_line_and_a_whole_checkpoint(
        remote_dataset: str, s3: S3Server, tmp_path: Path) -> None:
    proxy = FaultProxy(s3.port)
    run = _run(remote_dataset, str(tmp_path / "run"),
               {"AWS_ENDPOINT_URL": proxy.endpoint, **FAST_RETRIES})
    latest = tmp_path / "run" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while run.poll() is None and time.monotonic() < deadline:
        if latest.is_file() and read_checkpoint(latest, mmap=True).step >= 2:
            proxy.close()  # the store goes away for good
            break
        time.sleep(0.05)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 2, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {remote_dataset}/"), stderr
    assert "failed 5 times" in lines[0]
    state = read_checkpoint(latest)  # whole and readable, from before the loss
    assert 2 <= state.step < 12
