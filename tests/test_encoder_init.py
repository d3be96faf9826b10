"""The encoder-init type and the export description, on small files made here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from cluster.config import ConfigError, load_config
from finetune.config import FinetuneConfig
from pretrain.config import PretrainConfig
from pretrain.encoder_init import EncoderInit
from pretrain.export_meta import BackboneMeta
from pretrain.weights import EncoderMismatchError, create_encoder

ARCH = "resnet18"


def _meta(**changes: object) -> BackboneMeta:
    fields = dict(architecture=ARCH, in_chans=1, num_features=512, method="byol", epochs=2,
                  planned_epochs=2, steps=6, init="random", data={"path": "/data"})
    return BackboneMeta(**{**fields, **changes})  # type: ignore[arg-type]


def _export(folder: Path, **changes: object) -> Path:
    folder.mkdir(parents=True)
    safetensors.torch.save_file(create_encoder(ARCH, 1).state_dict(),
                                str(folder / "backbone.safetensors"))
    _meta(**changes).write(folder)
    return folder


def _checkpoint(path: Path, init: str = "random", epoch: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"online_encoder.{k}": v for k, v in create_encoder(ARCH, 1).state_dict().items()}
    torch.save({"model": state, "epoch": epoch, "step": 30, "config": {
        "model": {"arch": ARCH, "init": init, "in_chans": 1}, "method": {"name": "simclr"},
        "data": {"path": "/data"}}}, path)
    return path


def test_kinds_follow_the_text_and_what_the_path_holds(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _export(run / "export")
    kept = _checkpoint(run / "checkpoints" / "epoch0003.pt")
    other = _checkpoint(tmp_path / "elsewhere.pt")
    plain = tmp_path / "imagenet.pth"
    torch.save(create_encoder(ARCH, 1).state_dict(), plain)
    loose = tmp_path / "loose.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(1)}, str(loose))
    expected = {"random": "random", "timm": "timm", f"timm:{ARCH}.a1_in1k": "timm",
                str(run): "run", str(run / "export"): "export",
                str(run / "export" / "backbone.json"): "export",
                str(run / "export" / "backbone.safetensors"): "export",
                str(kept): "epoch", str(other): "checkpoint", str(plain): "weights file",
                str(loose): "weights file", str(tmp_path / "gone"): "unresolved",
                str(tmp_path): "unresolved"}
    for text, kind in expected.items():
        assert EncoderInit.parse(text, ARCH, "init").kind == kind, text
    assert EncoderInit.parse("timm", ARCH, "init").timm_name == ARCH
    assert EncoderInit.parse(str(kept), ARCH, "init").epoch == 3
    assert EncoderInit.parse(str(other), ARCH, "init").epoch is None


def test_timm_names_of_another_architecture_name_the_config_key() -> None:
    with pytest.raises(EncoderMismatchError, match=r"^init: 'timm:resnet34.a1_in1k' names"):
        EncoderInit.parse("timm:resnet34.a1_in1k", ARCH, "init")
    # each config names its own key, with no rewriting of messages in between
    with pytest.raises(ConfigError, match=r"model\.init: 'timm:resnet34.a1_in1k'"):
        load_config(PretrainConfig, None, [f"model.arch={ARCH}",
                                           "model.init=timm:resnet34.a1_in1k"])
    with pytest.raises(ConfigError, match=r"init: 'timm:resnet34.a1_in1k'"):
        load_config(FinetuneConfig, None, [f"arch={ARCH}", "init=timm:resnet34.a1_in1k"])
    with pytest.raises(ValueError, match="init: empty"):
        EncoderInit.parse("", ARCH, "init")


def test_recorded_paths_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _export(tmp_path / "exp")
    assert EncoderInit.parse("exp", ARCH, "init").recorded() == str(tmp_path / "exp")
    assert EncoderInit.parse("missing", ARCH, "init").recorded() == "missing"
    assert EncoderInit.parse("timm", ARCH, "init").recorded() == "timm"


def test_build_encoder_checks_the_recorded_architecture_and_channels(tmp_path: Path) -> None:
    export = _export(tmp_path / "exp")
    loaded = EncoderInit.parse(str(export), ARCH, "init").build_encoder(ARCH, 1)
    saved = safetensors.torch.load_file(str(export / "backbone.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(EncoderMismatchError, match=r"weights are for 'resnet18', the encoder "
                                                   r"is 'resnet34': missing keys: layer1\.2"):
        EncoderInit.parse(str(export), "resnet34", "init").build_encoder("resnet34", 1)
    _meta(in_chans=3).write(export)
    with pytest.raises(EncoderMismatchError, match="weights are for 3 input channel"):
        EncoderInit.parse(str(export), ARCH, "init").build_encoder(ARCH, 1)
    with pytest.raises(FileNotFoundError, match="gone: encoder weights file does not exist"):
        EncoderInit.parse(str(tmp_path / "gone"), ARCH, "init").build_encoder(ARCH, 1)


def test_chain_follows_recorded_inits_and_stops_at_a_loop(tmp_path: Path) -> None:
    first = _checkpoint(tmp_path / "a" / "checkpoints" / "epoch0001.pt", init="timm")
    second = _export(tmp_path / "b", init=str(first))
    chain = EncoderInit.parse(str(second), ARCH, "init").chain(ARCH)
    assert [link["kind"] for link in chain] == ["export", "checkpoint", "timm"]
    assert chain[1]["epochs"] == 3 and chain[1]["method"] == "simclr"
    loop = tmp_path / "c"
    _export(loop, init=str(loop))  # an export naming itself
    assert [link["kind"] for link in
            EncoderInit.parse(str(loop), ARCH, "init").chain(ARCH)] == ["export"]


def test_backbone_meta_round_trip_and_optional_keys(tmp_path: Path) -> None:
    meta = _meta()
    path = meta.write(tmp_path)
    written = json.loads(path.read_text())
    assert "img_size" not in written and "probe" not in written  # absent, as before
    assert written["format_version"] == 1
    assert BackboneMeta.read(path) == meta
    vit = _meta(img_size=64, probe={"best_dice": 0.5})
    assert BackboneMeta.read(vit.write(tmp_path)) == vit


def test_backbone_meta_reader_is_strict(tmp_path: Path) -> None:
    path = _meta().write(tmp_path)
    good = json.loads(path.read_text())
    legacy = {k: v for k, v in good.items() if k != "format_version"}  # written before 1
    path.write_text(json.dumps(legacy))
    assert BackboneMeta.read(path).format_version == 1
    cases = {
        json.dumps({**good, "format_version": 9}): "format_version 9 is not supported",
        json.dumps({k: v for k, v in good.items() if k != "steps"}): "missing key 'steps'",
        json.dumps({**good, "colour": 1}): "unknown key 'colour'",
        json.dumps({**good, "in_chans": "one"}): "key 'in_chans' holds 'one', expected type int",
        "{not json": "not valid JSON",
        "[]": "not an export description",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=message) as error:
            BackboneMeta.read(path)
        assert str(path) in str(error.value)
