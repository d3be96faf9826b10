"""The self-supervised model of a run: a timm encoder, initialised as configured, in a method."""

from __future__ import annotations

from torch import nn

from pretrain.config import ModelConfig, PretrainConfig
from pretrain.encoder_init import EncoderInit
from pretrain.methods import SSLMethod, build_method


def build_encoder(model: ModelConfig, crop_size: int, initialise: bool = True) -> nn.Module:
    """The encoder ``model`` describes, built for ``crop_size`` crops, initialised from
    ``model.init``: random, timm's pretrained weights, or a local file or run.
    ``initialise=False`` leaves it random (its weights are about to come from a checkpoint:
    the init source need not be reachable any more)."""
    init = model.encoder_init() if initialise else EncoderInit("random", "model.init")
    return init.build_encoder(model.arch, model.in_chans, crop_size)


def build_model(config: PretrainConfig, initialise: bool = True) -> SSLMethod:
    encoder = build_encoder(config.model, config.data.crop_size, initialise)
    return build_method(config.method, encoder)
