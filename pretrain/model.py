"""The self-supervised model of a run: a timm encoder, initialised as configured, in a method."""

from __future__ import annotations

from pretrain.config import PretrainConfig
from pretrain.methods import SSLMethod, build_method
from pretrain.weights import create_encoder, load_into_encoder, read_encoder_weights


def build_model(config: PretrainConfig) -> SSLMethod:
    encoder = create_encoder(config.model.arch, config.model.in_chans)
    if config.model.init != "random":
        load_into_encoder(encoder, read_encoder_weights(config.model.init))
    return build_method(config.method, encoder)
