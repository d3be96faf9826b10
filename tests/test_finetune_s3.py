"""Fine-tuning from a prepared dataset in an object store (moto's S3 server on loopback)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import finetune.train as train_module
from cluster.storage import join
from cluster.storage.objects import list_files, read_bytes
from data_prep.zarr_store import LabeledSlices
from finetune.cli import main
from finetune.config import FinetuneConfig
from finetune.sweep_config import base_config, load_sweep_config
from finetune.train import BEST_WEIGHTS, read_starts, train_run
from tests.s3_support import S3Server, upload_tree

TIMINGS = ("seconds", "train_images_per_s")  # the only fields two equal runs may differ in


def tiny_config(data: str, out: Path | str) -> FinetuneConfig:
    return FinetuneConfig(data=data, out=str(out), arch="resnet10t", budget=4, seed=0,
                          epochs=2, batch_size=2, epoch_samples=8, lr=1e-3,
                          warmup_epochs=0.5, device="cpu", progress=False, overlays=0,
                          compile=False)


@pytest.mark.slow  # two short fine-tuning runs (about 10 s on 2 cores)
def test_run_from_s3_equals_run_from_local_and_reads_once(
        prepared: Path, s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = upload_tree(prepared, s3.new_bucket() + "/ds")
    # every store read must come before the first training step: none per step or epoch,
    # validation and test included
    training, reads, late_reads = [False], [], []
    real_read, real_train_epoch = LabeledSlices.read, train_module.train_epoch

    def read(self: LabeledSlices, call: Callable[[], Any], what: str) -> Any:
        reads.append(what)
        if training[0]:
            late_reads.append(f"{self.location}: {what}")
        return real_read(self, call, what)

    def train_epoch(*args: Any, **kwargs: Any) -> Any:
        training[0] = True
        return real_train_epoch(*args, **kwargs)

    monkeypatch.setattr(LabeledSlices, "read", read)
    monkeypatch.setattr(train_module, "train_epoch", train_epoch)
    runs = {}
    out = join(url.rsplit("/", 1)[0], "runs", "ft")  # the run folder in the store too
    monkeypatch.setenv("MEDSSL_LOCAL_RUNS", str(tmp_path / "node"))
    for name, data, folder in (("local", str(prepared), str(tmp_path / "local")),
                               ("s3", url, out)):
        training[0] = False
        runs[name] = train_run(tiny_config(data, folder))
    assert reads and late_reads == []
    # the finished run is in the store, committed (no last.pt), its local copy gone
    stored = list_files(out)
    assert {"metrics.json", BEST_WEIGHTS, "row.json", "starts.jsonl"} <= set(stored)
    assert "last.pt" not in stored and not any((tmp_path / "node").iterdir())
    (tmp_path / "s3").mkdir()
    (tmp_path / "s3" / BEST_WEIGHTS).write_bytes(read_bytes(join(out, BEST_WEIGHTS)))
    assert train_run(tiny_config(url, out)) == runs["s3"]  # complete: nothing trains
    assert len(read_starts(out)) == 1

    local, remote = runs["local"], runs["s3"]
    assert remote["complete"] and len(remote["epochs"]) == 2

    def untimed(epochs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k not in TIMINGS} for e in epochs]

    assert untimed(remote["epochs"]) == untimed(local["epochs"])
    assert remote["test"] == local["test"] and remote["train_slices"] == local["train_slices"]
    weights = {name: safetensors.torch.load_file(str(tmp_path / name / BEST_WEIGHTS))
               for name in runs}
    assert weights["s3"].keys() == weights["local"].keys()
    assert all(torch.equal(weights["s3"][k], weights["local"][k]) for k in weights["local"])


def test_missing_s3_dataset_is_one_error_naming_the_url(
        s3: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = s3.new_bucket() + "/nothing"
    status = main(["train", "--data", url, "--out", str(tmp_path / "run"), "--arch",
                   "resnet10t", "device=cpu", "progress=false"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2
    assert len(errors) == 1 and errors[0].startswith("error: ") and url in errors[0], errors


def test_sweep_keeps_an_s3_dataset_url(tmp_path: Path) -> None:
    """Relative paths become absolute in the driver; a URL is no path and stays as given."""
    raw = {"name": "s", "storage": str(tmp_path), "data": "s3://bucket/ds/",
           "inits": {"random": "random"}, "budgets": [4], "seeds": [0]}
    config = load_sweep_config(raw)
    assert config.data == "s3://bucket/ds" and base_config(config).data == "s3://bucket/ds"
