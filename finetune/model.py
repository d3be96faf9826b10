"""U-Net with a timm encoder (segmentation_models_pytorch ``tu-`` encoders), initialised
from any source ``pretrain.encoder_init`` reads, optionally frozen for the first epochs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import segmentation_models_pytorch as smp
import torch
from torch import nn

from pretrain.encoder_init import EncoderInit, InitChain
from pretrain.weights import EncoderMismatchError, describe_keys


def build_unet(arch: str, in_chans: int, num_classes: int) -> smp.Unet:
    try:
        return smp.Unet(encoder_name=f"tu-{arch}", encoder_weights=None, in_channels=in_chans,
                        classes=num_classes)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ValueError(f"arch: cannot build a U-Net on timm encoder {arch!r} ({exc})") from None


def initialise_encoder(unet: smp.Unet, arch: str, in_chans: int,
                       init: EncoderInit) -> InitChain:
    """Load ``init`` into the U-Net's encoder and return its provenance (``init_chain``).

    The weights are first loaded into a plain timm model of ``arch`` (``init`` checks the
    architecture, input channels, keys and shapes, and adapts 3-channel stems), then
    copied tensor by tensor into the feature-extraction wrapper the U-Net uses. Any
    mismatch raises before the U-Net is touched; only classifier-side layers the U-Net
    never runs (e.g. a final head norm) may go unused, and they are listed in the chain's
    first link as ``unused_keys``.
    """
    chain = init.chain(arch)
    if init.kind == "random":
        return chain
    unused = _copy_into_unet(unet, init.build_encoder(arch, in_chans), init.text)
    if unused:
        chain[0]["unused_keys"] = unused
    return chain


def set_encoder_frozen(unet: smp.Unet, frozen: bool) -> None:
    """Freeze (or release) the encoder: gradients off and its BatchNorm layers in eval mode.

    Call it after every ``unet.train()``/``unet.eval()``, which reset all modes. Frozen
    weights alone do not freeze an encoder: BatchNorm in train mode would still normalise
    with batch statistics and overwrite its running statistics from the (few, small)
    fine-tuning batches, drifting away from those the pretrained weights were learned
    with. Eval mode uses and keeps the pretrained statistics.
    """
    for parameter in unet.encoder.parameters():
        parameter.requires_grad_(not frozen)
    for module in unet.encoder.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(unet.training and not frozen)


def build_finetune_optimizer(parameters: Iterable[nn.Parameter],
                             name: Literal["adam", "adamw"], lr: float,
                             weight_decay: float) -> torch.optim.Optimizer:
    """Adam (the reference study's, with L2-coupled decay) or AdamW (decoupled decay).

    Pass all parameters, frozen ones included: while frozen they have no gradient and
    the optimizer skips them, so releasing them later needs no new optimizer.
    """
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'adamw', got {name!r}")


def _normalise_key(key: str) -> str:
    # timm's feature wrappers flatten nested names ("stages.0" -> "stages_0").
    return key.replace("_", ".")


def _copy_into_unet(unet: smp.Unet, plain: nn.Module, init: str) -> list[str]:
    """Copy ``plain``'s tensors into the U-Net's feature wrapper; return those unused."""
    source = {_normalise_key(k): (k, v) for k, v in plain.state_dict().items()}
    features: nn.Module = unet.encoder.model
    target = features.state_dict()
    uncovered = [k for k in target if _normalise_key(k) not in source]
    if uncovered:
        raise EncoderMismatchError(f"{init}: U-Net encoder tensors without weights: "
                                   f"{describe_keys('missing keys', uncovered)}")
    features.load_state_dict({k: source[_normalise_key(k)][1] for k in target}, strict=True)
    used = {_normalise_key(k) for k in target}
    return sorted(original for key, (original, _) in source.items() if key not in used)
