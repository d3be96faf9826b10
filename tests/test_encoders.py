"""Encoders and their initialisation: timm convnets and ViTs built for the crop size,
timm's pretrained weights through an offline Hugging Face cache, local files, and
weights that do not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from cluster.config import ConfigError, load_config
from pretrain.config import ModelConfig, PretrainConfig
from pretrain.engine import pretrain
from pretrain.export import export_backbone
from pretrain.model import build_encoder
from pretrain.weights import (
    EncoderMismatchError,
    WeightsUnavailableError,
    create_encoder,
    read_encoder_weights,
)
from tests.conftest import HubCache, small_pretrain_config

# A small timm ViT with a fixed input size (no dynamic_img_size): built at any other size
# than the crop size it fails on the crops. Its pretrained tag is test_vit3.r160_in1k.
VIT = "test_vit3"
CROP = 32  # small_pretrain_config's crop size: a 2 x 2 patch grid

def test_vits_get_the_crop_size_and_convnets_do_not() -> None:
    vit = create_encoder(VIT, 1, CROP)
    assert vit.patch_embed.grid_size == (2, 2)
    assert vit(torch.randn(2, 1, CROP, CROP)).shape == (2, vit.num_features)
    with pytest.raises(AssertionError):  # built for the crop size, not timm's default
        vit(torch.randn(2, 1, 160, 160))
    resnet = create_encoder("resnet18", 1, CROP)  # would reject img_size
    assert resnet(torch.randn(2, 1, 48, 48)).shape == (2, 512)


def test_timm_init_loads_cached_weights_and_sums_the_stem(hub_cache: HubCache) -> None:
    saved = hub_cache("resnet18")  # timm's default tag for resnet18
    encoder = build_encoder(ModelConfig(arch="resnet18", in_chans=1, init="timm"), CROP)
    state = encoder.state_dict()
    assert set(state) == set(saved) - {"fc.weight", "fc.bias"}  # no classifier
    torch.testing.assert_close(state["conv1.weight"],
                               saved["conv1.weight"].sum(dim=1, keepdim=True))
    for key in set(state) - {"conv1.weight"}:
        assert torch.equal(state[key], saved[key]), key
    tagged = build_encoder(ModelConfig(arch="resnet18", in_chans=3,
                                       init="timm:resnet18.a1_in1k"), CROP)
    assert torch.equal(tagged.conv1.weight, saved["conv1.weight"])


def test_timm_vit_init_equals_the_same_weights_from_a_local_file(hub_cache: HubCache,
                                                                 tmp_path: Path) -> None:
    saved = hub_cache(VIT)  # made at 160 px: a 10 x 10 patch grid
    from_hub = build_encoder(ModelConfig(arch=VIT, in_chans=1, init="timm"), CROP)
    assert saved["pos_embed"].shape[1] == 1 + 100 and from_hub.pos_embed.shape[1] == 1 + 4
    torch.testing.assert_close(from_hub.patch_embed.proj.weight,
                               saved["patch_embed.proj.weight"].sum(dim=1, keepdim=True))
    # The same file given as a local path: same stem sum, grid resampling, head removal.
    local = tmp_path / "imagenet.safetensors"
    safetensors.torch.save_file(saved, str(local))
    from_file = build_encoder(ModelConfig(arch=VIT, in_chans=1, init=str(local)), CROP)
    hub_state, file_state = from_hub.state_dict(), from_file.state_dict()
    assert set(hub_state) == set(file_state)
    for key in hub_state:
        assert torch.equal(hub_state[key], file_state[key]), key


def test_timm_init_not_cached_offline_fails_naming_the_local_file_way(
        hub_cache: HubCache) -> None:
    with pytest.raises(WeightsUnavailableError) as error:
        build_encoder(ModelConfig(arch="resnet18", in_chans=1, init="timm"), CROP)
    message = str(error.value)
    assert "https://huggingface.co/timm/resnet18.a1_in1k" in message
    assert "set model.init to its local path" in message
    assert "LocalEntryNotFoundError" in message


def test_timm_init_names_are_checked() -> None:
    with pytest.raises(ConfigError, match="another architecture than arch 'resnet18'"):
        load_config(PretrainConfig, None, ["model.arch=resnet18",
                                           "model.init=timm:resnet34.a1_in1k"])
    with pytest.raises(ValueError, match=r"model\.init: Invalid pretrained tag \(nope\)"):
        build_encoder(ModelConfig(arch="resnet18", in_chans=1, init="timm:resnet18.nope"),
                      CROP)


def test_vit_pretrains_end_to_end(prepared: Path, tmp_path: Path) -> None:
    config = small_pretrain_config(prepared, tmp_path / "run", keep_epochs=[1])
    config.model.arch, config.method.name = VIT, "simclr"
    result = pretrain(config)
    assert result.steps == 6 and torch.isfinite(torch.tensor(result.final_loss))
    first = read_encoder_weights(tmp_path / "run" / "checkpoints" / "epoch0001.pt")
    last = read_encoder_weights(tmp_path / "run" / "export")
    assert last.arch == VIT and last.in_chans == 1 and last.img_size == CROP
    assert last.state_dict["pos_embed"].shape == (1, 5, 96)  # 1 register token + 2 x 2
    assert set(first.state_dict) == set(last.state_dict)
    assert not torch.equal(first.state_dict["blocks.0.attn.qkv.weight"],
                           last.state_dict["blocks.0.attn.qkv.weight"])  # it trained


def test_vit_and_convnet_weights_do_not_mix(prepared: Path, tmp_path: Path) -> None:
    config = small_pretrain_config(prepared, tmp_path / "vit")
    resnet_export = tmp_path / "resnet_export"
    export_backbone(create_encoder("resnet18", 1), resnet_export, config, epochs=0, steps=0)
    config.model.arch, config.model.init = VIT, str(resnet_export)
    with pytest.raises(EncoderMismatchError,
                       match=rf"weights are for 'resnet18', the encoder is '{VIT}': "
                             r"missing keys: attn_pool.*unexpected keys: bn1\."):
        pretrain(config)
    assert not (tmp_path / "vit" / "checkpoints").exists()  # failed before training

    vit_file = tmp_path / "vit.safetensors"
    safetensors.torch.save_file(create_encoder(VIT, 1, CROP).state_dict(), str(vit_file))
    with pytest.raises(EncoderMismatchError, match="does not fit encoder resnet18: no tensor"):
        build_encoder(ModelConfig(arch="resnet18", in_chans=1, init=str(vit_file)), CROP)
    # A ViT's own weights made for another crop size do fit: the grid is resampled.
    vit = build_encoder(ModelConfig(arch=VIT, in_chans=1, init=str(vit_file)), 64)
    assert vit.pos_embed.shape == (1, 1 + 16, 96)
