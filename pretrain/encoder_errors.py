"""Errors of encoder initialisation, in a module of their own so that parsing an init
(at config load, before any work) needs neither torch nor timm."""

from __future__ import annotations


class EncoderMismatchError(ValueError):
    """Weights do not fit the encoder: the message lists the mismatched keys."""


class WeightsUnavailableError(RuntimeError):
    """timm's pretrained weights could not be fetched or found in the local hub cache."""
