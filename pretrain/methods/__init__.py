"""Self-supervised methods: networks around an encoder that produce a training loss."""

from __future__ import annotations

from torch import nn

from pretrain.config import MethodConfig
from pretrain.methods.barlow_twins import BarlowTwins
from pretrain.methods.base import SSLMethod
from pretrain.methods.byol import BYOL
from pretrain.methods.simclr import SimCLR
from pretrain.methods.vicreg import VICReg
from pretrain.weights import feature_width


def build_method(config: MethodConfig, encoder: nn.Module) -> SSLMethod:
    """The method named by ``config.name`` around ``encoder`` (a timm model, no head)."""
    method = _method(config, encoder)
    method.view_batchnorm = config.resolved_view_batchnorm()
    return method


def _method(config: MethodConfig, encoder: nn.Module) -> SSLMethod:
    features = feature_width(encoder)
    if config.name == "byol":
        return BYOL(encoder, features, config.projector_hidden, config.projection_dim,
                    predictor_hidden=config.predictor_hidden or config.projector_hidden)
    if config.name == "simclr":
        return SimCLR(encoder, features, config.projector_hidden, config.projection_dim,
                      config.temperature)
    if config.name == "barlow_twins":
        return BarlowTwins(encoder, features, config.projector_hidden, config.projection_dim,
                           config.lambda_offdiag)
    if config.name == "vicreg":
        invariance, variance, covariance = config.vicreg_weights  # a YAML list or a tuple
        return VICReg(encoder, features, config.projector_hidden, config.projection_dim,
                      (invariance, variance, covariance))
    raise ValueError(f"method.name: unknown method {config.name!r}")


__all__ = ["BYOL", "BarlowTwins", "SSLMethod", "SimCLR", "VICReg", "build_method"]
