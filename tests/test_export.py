"""Backbone export on demand (``python -m pretrain export``): from the latest or a kept
checkpoint, loadable by timm and by pretrain, with clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from pretrain.cli import main
from pretrain.engine import pretrain
from pretrain.weights import create_encoder, load_into_encoder, read_encoder_weights
from tests.conftest import small_pretrain_config

VIT = "test_vit3"  # a small timm ViT with a fixed input size


@pytest.fixture(scope="module")
def vit_run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    config = small_pretrain_config(prepared, out, keep_epochs=[1])
    config.model.arch = VIT
    pretrain(config)
    return out


def test_export_of_last_checkpoint_reproduces_the_run_end_export(
        vit_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--run", str(vit_run), "--out", str(tmp_path / "again")]) == 0
    assert f"exported backbone to {tmp_path / 'again'}" in capsys.readouterr().out
    at_end = safetensors.torch.load_file(str(vit_run / "export" / "backbone.safetensors"))
    again = safetensors.torch.load_file(str(tmp_path / "again" / "backbone.safetensors"))
    assert set(at_end) == set(again)
    for key in at_end:
        assert torch.equal(at_end[key], again[key]), key
    meta_end = json.loads((vit_run / "export" / "backbone.json").read_text())
    meta_again = json.loads((tmp_path / "again" / "backbone.json").read_text())
    assert meta_again.pop("checkpoint") == str(vit_run.resolve() / "checkpoints" / "last.pt")
    assert meta_again == meta_end
    assert meta_end["architecture"] == VIT and meta_end["img_size"] == 32
    assert (meta_end["epochs"], meta_end["steps"], meta_end["method"]) == (2, 6, "byol")
    assert meta_end["data"]["name"] == "phantom"


@pytest.mark.slow
def test_kept_checkpoint_export_loads_into_timm_with_identical_outputs(vit_run: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pretrain", "export", "--run", str(vit_run),
         "--checkpoint", "epoch0001.pt"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    export = vit_run / "export-epoch0001"
    meta = json.loads((export / "backbone.json").read_text())
    assert (meta["epochs"], meta["planned_epochs"], meta["steps"]) == (1, 2, 3)
    timm_model = timm.create_model(
        meta["architecture"], pretrained=True, num_classes=0, in_chans=meta["in_chans"],
        img_size=meta["img_size"],
        pretrained_cfg_overlay=dict(file=str(export / "backbone.safetensors")),
    ).eval()
    encoder = create_encoder(VIT, 1, 32)
    load_into_encoder(encoder, read_encoder_weights(vit_run / "checkpoints" / "epoch0001.pt"))
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), encoder.eval()(x), rtol=0, atol=0)
    weights = read_encoder_weights(export)
    assert (weights.arch, weights.in_chans, weights.img_size) == (VIT, 1, 32)
    final = read_encoder_weights(vit_run / "export")
    assert not torch.equal(weights.state_dict["pos_embed"], final.state_dict["pos_embed"])


def test_export_errors_name_the_problem(vit_run: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    def error(*args: str) -> str:
        assert main(["export", *args]) == 2
        return capsys.readouterr().err

    (tmp_path / "fresh").mkdir()
    assert "no checkpoints in" in error("--run", str(tmp_path / "fresh"))
    assert "run directory does not exist" in error("--run", str(tmp_path / "nowhere"))
    assert "no checkpoint 'epoch0009.pt'; there are epoch0001.pt, last.pt" in error(
        "--run", str(vit_run), "--checkpoint", "epoch0009.pt")
    assert "checkpoint file does not exist" in error(
        "--run", str(vit_run), "--checkpoint", str(tmp_path / "gone.pt"))

    plain = tmp_path / "plain.pt"
    torch.save(create_encoder("resnet18", 1).state_dict(), plain)
    assert "not a pretrain checkpoint (no model, config, epoch, step)" in error(
        "--run", str(vit_run), "--checkpoint", str(plain))
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    assert "not a pretrain checkpoint (cannot load it" in error(
        "--run", str(vit_run), "--checkpoint", str(text))

    relabelled = torch.load(vit_run / "checkpoints" / "last.pt", weights_only=True)
    relabelled["config"]["model"]["arch"] = "resnet18"  # weights of a ViT, config of a ResNet
    torch.save(relabelled, tmp_path / "relabelled.pt")
    assert "does not fit encoder resnet18" in error(
        "--run", str(vit_run), "--checkpoint", str(tmp_path / "relabelled.pt"))
    assert not (vit_run / "export-relabelled").exists()  # nothing half-written


def test_export_records_a_relative_init_path_as_absolute(prepared: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The chain behind an export must resolve from any working directory."""
    from pretrain.export import backbone_meta

    (tmp_path / "imagenet.pth").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    config = small_pretrain_config(prepared, tmp_path / "run")
    encoder = create_encoder("resnet18", 1)
    for init, recorded in (("imagenet.pth", str(tmp_path / "imagenet.pth")),
                           ("random", "random"), ("timm:resnet18.a1_in1k", "timm:resnet18.a1_in1k"),
                           ("missing.pth", "missing.pth")):
        config.model.init = init
        assert backbone_meta(config, encoder, epochs=1, steps=1).init == recorded
