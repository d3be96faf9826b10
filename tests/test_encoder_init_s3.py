"""Encoder inits and exports at ``s3://`` URLs (moto's S3 server on loopback): each URL form
is the kind its local form is and loads the same weights; ``pretrain export --run URL``
writes the export the local command writes; what is missing is named by its URL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import safetensors.torch
import torch

from cluster.storage import join
from cluster.storage.mirror import LOCAL_ROOT_ENV
from cluster.storage.objects import read_bytes, read_text, upload, write_text
from pretrain.cli import main
from pretrain.encoder_init import EncoderInit
from pretrain.export import backbone_meta, export_checkpoint
from pretrain.export_meta import BackboneMeta
from pretrain.weights import create_encoder, feature_width
from tests.conftest import small_pretrain_config
from tests.s3_support import S3Server, environment, upload_tree

SMALL = "test_efficientnet"  # a 0.1M-parameter timm model: files of 400 kB
RUN_ARCH = "resnet18"  # the pretrain_run fixture's


def _state(arch: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in create_encoder(arch, 1).state_dict().items()}


def _small_tree(root: Path) -> Path:
    """A run folder of SMALL (its export, a kept epoch checkpoint) and a plain weights
    file, each holding other weights."""
    export = root / "run" / "export"
    export.mkdir(parents=True)
    safetensors.torch.save_file(_state(SMALL, 1), str(export / "backbone.safetensors"))
    BackboneMeta(architecture=SMALL, in_chans=1, num_features=feature_width(
        create_encoder(SMALL, 1)), method="byol", epochs=2, planned_epochs=2, steps=6,
        init="random", data={"path": "/data"}).write(export)
    (root / "run" / "checkpoints").mkdir()
    torch.save({"model": {f"online_encoder.{k}": v for k, v in _state(SMALL, 2).items()},
                "epoch": 3, "step": 30, "config": {"model": {"arch": SMALL, "in_chans": 1,
                                                              "init": "random"}}},
               root / "run" / "checkpoints" / "epoch0003.pt")
    torch.save(_state(SMALL, 3), root / "weights.pth")
    return root


def _loaded(text: str, arch: str, img_size: int | None = None) -> dict[str, torch.Tensor]:
    return EncoderInit.parse(text, arch, "init").build_encoder(arch, 1, img_size).state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def local_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The node-local folder fetched copies go to, empty for the test."""
    monkeypatch.setenv(LOCAL_ROOT_ENV, str(tmp_path / "node"))
    return tmp_path / "node"


def test_url_forms_are_their_local_forms_and_fetch_only_what_they_read(
        s3: S3Server, tmp_path: Path, local_root: Path) -> None:
    tree = _small_tree(tmp_path / "src")
    url = upload_tree(tree, join(s3.new_bucket(), "team"))
    meta = "run/export/backbone.json"  # an export's chain link names its description
    sources = {"run": meta, "run/export": meta, meta: meta,
               "run/export/backbone.safetensors": meta,
               "run/checkpoints/epoch0003.pt": "run/checkpoints/epoch0003.pt",
               "weights.pth": "weights.pth"}
    for rel, source in sources.items():
        local = EncoderInit.parse(str(tree / rel), SMALL, "init")
        remote = EncoderInit.parse(join(url, rel) + "/" * (rel == "run"), SMALL, "init")
        assert (remote.kind, remote.epoch) == (local.kind, local.epoch), rel
        assert remote.recorded() == join(url, rel)
        assert _same(_loaded(remote.text, SMALL), _loaded(local.text, SMALL)), rel
        chain, local_chain = remote.chain(SMALL), local.chain(SMALL)
        assert chain[0]["source"] == join(url, source)
        for link in (chain[0], local_chain[0]):
            del link["source"], link["init"]
        assert chain == local_chain, rel
        if rel == "run/export/backbone.safetensors":  # exports read: no checkpoint fetched
            assert not list(local_root.rglob("*.pt")) and not list(local_root.rglob("*.pth"))
    # every copy lies in the cache folder of fetched inits (no run folder mirror's name)
    assert {p.name for p in local_root.iterdir()} == {"inits"}


def test_a_changed_object_is_fetched_again(s3: S3Server, tmp_path: Path,
                                           local_root: Path) -> None:
    url = join(s3.new_bucket(), "imagenet.pth")
    for seed in (1, 2):
        torch.save(_state(SMALL, seed), tmp_path / f"v{seed}.pth")
    upload(tmp_path / "v1.pth", url)
    assert _same(_loaded(url, SMALL), _state(SMALL, 1))
    assert _same(_loaded(url, SMALL), _state(SMALL, 1))  # the copy kept serves it
    assert len(list((local_root / "inits").iterdir())) == 1
    assert (tmp_path / "v1.pth").stat().st_size == (tmp_path / "v2.pth").stat().st_size
    upload(tmp_path / "v2.pth", url)  # same size, other content (and ETag)
    assert _same(_loaded(url, SMALL), _state(SMALL, 2))
    assert len(list((local_root / "inits").iterdir())) == 2


def test_what_is_missing_is_named_by_its_url(s3: S3Server, local_root: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bucket = s3.new_bucket()
    missing = join(bucket, "runs", "gone")
    init = EncoderInit.parse(missing, SMALL, "init")
    assert init.kind == "unresolved"
    assert init.chain(SMALL) == [{"init": missing, "kind": "unresolved", "source": missing}]
    with pytest.raises(FileNotFoundError, match=f"^{missing}: encoder weights file or folder "
                                                "does not exist"):
        init.build_encoder(SMALL, 1)
    write_text(join(bucket, "runs", "empty", "notes.txt"), "no export here")
    with pytest.raises(FileNotFoundError, match=f"^{bucket}/runs/empty: no backbone.json here "
                                                f"or in {bucket}/runs/empty/export$"):
        EncoderInit.parse(join(bucket, "runs", "empty"), SMALL, "init").build_encoder(SMALL, 1)
    meta = BackboneMeta(architecture=SMALL, in_chans=1, num_features=1, method="byol",
                        epochs=1, planned_epochs=1, steps=1, init="random", data={})
    write_text(join(bucket, "lone", "backbone.json"), json.dumps(asdict(meta)))
    with pytest.raises(FileNotFoundError, match=f"^{bucket}/lone/backbone.safetensors: "
                                                "encoder weights file does not exist"):
        EncoderInit.parse(join(bucket, "lone"), SMALL, "init").build_encoder(SMALL, 1)
    with pytest.raises(ValueError, match=r"^init: gs://b/x: unsupported URL scheme 'gs'"):
        EncoderInit.parse("gs://b/x", SMALL, "init")
    assert main(["export", "--run", missing]) == 2
    assert capsys.readouterr().err == f"error: {missing}: run directory does not exist\n"


def test_an_export_records_urls_as_they_are(s3: S3Server) -> None:
    """What an export records of its init and data: URLs, not paths made of them."""
    bucket = s3.new_bucket()  # no dataset there: the export records the path alone
    config = small_pretrain_config(join(bucket, "prepared") + "/", "unused")
    config.model.arch, config.model.init = SMALL, join(bucket, "runs", "a", "export")
    meta = backbone_meta(config, create_encoder(SMALL, 1), epochs=1, steps=1)
    assert (meta.init, meta.data) == (join(bucket, "runs", "a", "export"),
                                      {"path": join(bucket, "prepared")})


def test_parsing_a_url_init_imports_neither_torch_nor_a_storage_client() -> None:
    """Configs parse their init at load: a URL's is checked without seconds of imports."""
    code = ("import sys; from finetune.config import FinetuneConfig; "
            "config = FinetuneConfig(init='s3://b/runs/byol/', arch='resnet18'); "
            "assert config.encoder_init().recorded() == 's3://b/runs/byol'; "
            "print(sorted({'torch', 'timm', 's3fs', 'botocore'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1], timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"


@pytest.fixture(scope="module")
def remote_run(pretrain_run: Path, s3: S3Server,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """pretrain_run in the store (what the tests read of it: 0.4 GB, not the 0.6 GB of
    every kept checkpoint), with a node-local folder of the module's own."""
    staged = tmp_path_factory.mktemp("staged")
    for rel in ("config.yaml", "export/backbone.json", "export/backbone.safetensors",
                "checkpoints/epoch0002.pt", "checkpoints/last.pt"):
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(pretrain_run / rel, staged / rel)
    url = upload_tree(staged, join(s3.new_bucket(), "runs", "byol"))
    with environment({LOCAL_ROOT_ENV: str(tmp_path_factory.mktemp("node"))}):
        yield url


@pytest.mark.slow  # a real run: 0.4 GB up, 0.4 GB down
def test_url_forms_of_a_run_load_its_weights(pretrain_run: Path, remote_run: str) -> None:
    for rel in ("", "export", "export/backbone.safetensors", "checkpoints/epoch0002.pt",
                "checkpoints/last.pt"):
        local = EncoderInit.parse(str(pretrain_run / rel), RUN_ARCH, "init")
        remote = EncoderInit.parse(join(remote_run, rel) if rel else remote_run, RUN_ARCH,
                                   "init")
        assert (remote.kind, remote.epoch) == (local.kind, local.epoch), rel
        assert _same(_loaded(remote.text, RUN_ARCH, 32), _loaded(local.text, RUN_ARCH, 32)), rel


@pytest.mark.slow  # exports of a real run's checkpoints, fetched from the store
def test_export_of_a_run_in_the_store_is_written_back_as_the_local_one(
        pretrain_run: Path, remote_run: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--run", remote_run]) == 0
    export = join(remote_run, "export")
    assert capsys.readouterr().out == f"exported backbone to {export}\n"
    meta = json.loads(read_text(join(export, "backbone.json")))
    assert meta.pop("checkpoint") == join(remote_run, "checkpoints", "last.pt")
    assert meta == json.loads((pretrain_run / "export" / "backbone.json").read_text())
    weights = safetensors.torch.load(read_bytes(join(export, "backbone.safetensors")))
    assert _same(weights, safetensors.torch.load_file(
        str(pretrain_run / "export" / "backbone.safetensors")))
    # a kept epoch's export (a local folder here), as the local command writes it
    assert main(["export", "--run", remote_run, "--checkpoint", "epoch0002.pt",
                 "--out", str(tmp_path / "remote")]) == 0
    export_checkpoint(pretrain_run, "epoch0002.pt", tmp_path / "local")
    metas = [json.loads((tmp_path / name / "backbone.json").read_text())
             for name in ("remote", "local")]
    assert metas[0].pop("checkpoint") == join(remote_run, "checkpoints", "epoch0002.pt")
    assert metas[1].pop("checkpoint") == str(pretrain_run.resolve() / "checkpoints" /
                                             "epoch0002.pt")
    assert metas[0] == metas[1]
    assert (tmp_path / "remote" / "backbone.safetensors").read_bytes() == \
        (tmp_path / "local" / "backbone.safetensors").read_bytes()
