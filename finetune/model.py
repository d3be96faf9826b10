"""U-Net with a timm encoder (segmentation_models_pytorch ``tu-`` encoders), initialised
from any source the pretrain package can read."""

from __future__ import annotations

import segmentation_models_pytorch as smp
from torch import nn

from pretrain.weights import (
    EncoderMismatchError,
    create_encoder,
    load_into_encoder,
    read_encoder_weights,
)


def build_unet(arch: str, in_chans: int, num_classes: int) -> smp.Unet:
    try:
        return smp.Unet(encoder_name=f"tu-{arch}", encoder_weights=None, in_channels=in_chans,
                        classes=num_classes)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ValueError(f"arch: cannot build a U-Net on timm encoder {arch!r} ({exc})") from None


def _normalise_key(key: str) -> str:
    # timm's feature wrappers flatten nested names ("stages.0" -> "stages_0").
    return key.replace("_", ".")


def initialise_encoder(unet: smp.Unet, arch: str, in_chans: int, init: str) -> None:
    """Load ``init`` into the U-Net's encoder; every encoder tensor must be covered.

    The weights are first loaded strictly into a plain timm model of ``arch`` (which
    checks keys and shapes and adapts 3-channel stems), then copied tensor by tensor
    into the feature-extraction wrapper the U-Net uses. Only classifier-side layers the
    U-Net never runs (e.g. a final head norm) may go unused.
    """
    if init == "random":
        return
    weights = read_encoder_weights(init)
    if weights.arch and weights.arch != arch:
        raise EncoderMismatchError(f"{weights.source}: weights are for {weights.arch!r}, "
                                   f"the U-Net encoder is {arch!r}")
    if weights.in_chans and weights.in_chans != in_chans:
        raise EncoderMismatchError(f"{weights.source}: weights are for {weights.in_chans} "
                                   f"input channel(s), the U-Net takes {in_chans}")
    plain = create_encoder(arch, in_chans)
    load_into_encoder(plain, weights)
    source = {_normalise_key(k): v for k, v in plain.state_dict().items()}
    features: nn.Module = unet.encoder.model
    target = features.state_dict()
    uncovered = [k for k in target if _normalise_key(k) not in source]
    if uncovered:
        raise EncoderMismatchError(f"{weights.source}: U-Net encoder tensors without weights: "
                                   f"{', '.join(uncovered[:8])}")
    features.load_state_dict({k: source[_normalise_key(k)] for k in target}, strict=True)
