"""U-Net with a timm encoder (segmentation_models_pytorch ``tu-`` encoders), initialised
from any source the pretrain package can read, optionally frozen for the first epochs."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

from pretrain.config import timm_weights_name
from pretrain.weights import (
    EncoderMismatchError,
    EncoderWeights,
    WeightsUnavailableError,
    create_encoder,
    create_pretrained_encoder,
    describe_keys,
    export_meta_path,
    load_into_encoder,
    read_encoder_weights,
)

InitChain = list[dict[str, Any]]
_MAX_CHAIN = 16  # a longer chain is a loop of exports naming each other


def build_unet(arch: str, in_chans: int, num_classes: int) -> smp.Unet:
    try:
        return smp.Unet(encoder_name=f"tu-{arch}", encoder_weights=None, in_channels=in_chans,
                        classes=num_classes)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ValueError(f"arch: cannot build a U-Net on timm encoder {arch!r} ({exc})") from None


def initialise_encoder(unet: smp.Unet, arch: str, in_chans: int, init: str) -> InitChain:
    """Load ``init`` into the U-Net's encoder and return its provenance (``init_chain``).

    ``init`` is "random", "timm" / "timm:ARCH.TAG" (timm's pretrained weights, e.g.
    supervised ImageNet, through the Hugging Face hub cache), or a local timm-named
    weights file, pretrain export, run folder or checkpoint. The weights are first loaded
    strictly into a plain timm model of ``arch`` (which checks keys and shapes and adapts
    3-channel stems), then copied tensor by tensor into the feature-extraction wrapper the
    U-Net uses. Any mismatch raises before the U-Net is touched; only classifier-side
    layers the U-Net never runs (e.g. a final head norm) may go unused, and they are
    listed in the chain's first link as ``unused_keys``.
    """
    chain = init_chain(init, arch)
    if init == "random":
        return chain
    name = timm_weights_name(init, arch)
    plain = _timm_pretrained(name, arch, in_chans) if name is not None \
        else _encoder_from_file(init, arch, in_chans)
    unused = _copy_into_unet(unet, plain, init)
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


def _timm_pretrained(name: str, arch: str, in_chans: int) -> nn.Module:
    if name.split(".")[0] != arch.split(".")[0]:
        raise EncoderMismatchError(f"init 'timm:{name}' names weights of another architecture "
                                   f"than the U-Net encoder {arch!r}")
    try:
        return create_pretrained_encoder(name, in_chans)
    except (ValueError, WeightsUnavailableError) as exc:
        # pretrain's messages name its own key (model.init); here the key is ``init``.
        raise type(exc)(str(exc).replace("model.init", "init")) from None


def _encoder_from_file(init: str, arch: str, in_chans: int) -> nn.Module:
    weights = read_encoder_weights(init)
    plain = create_encoder(arch, in_chans)
    if weights.arch and weights.arch.split(".")[0] != arch.split(".")[0]:
        raise EncoderMismatchError(f"{weights.source}: weights are for {weights.arch!r}, "
                                   f"the U-Net encoder is {arch!r}: {_key_report(weights, plain)}")
    if weights.in_chans and weights.in_chans != in_chans:
        # Exports say what they were trained on: a 3-channel export given to a 1-channel
        # U-Net is a wrong path, not an ImageNet file to adapt (those carry no in_chans).
        raise EncoderMismatchError(f"{weights.source}: weights are for {weights.in_chans} "
                                   f"input channel(s), the U-Net takes {in_chans}: "
                                   f"{_key_report(weights, plain)}")
    load_into_encoder(plain, weights)
    return plain


def _key_report(weights: EncoderWeights, model: nn.Module) -> str:
    """Missing, unexpected and mis-shaped keys of ``weights`` for ``model``, as given."""
    expected, given = model.state_dict(), weights.state_dict
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(given))
              if tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = [describe_keys(what, keys) for what, keys in (
        ("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes))]
    return "; ".join(p for p in parts if p) or "no key differs"


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


def init_chain(init: str, arch: str) -> InitChain:
    """Where ``init``'s weights came from, newest first: ``init`` itself, then what its
    pretraining started from, and so on (ImageNet -> natural images -> domain).

    Each link is a JSON-ready dict with ``init`` (as written) and ``kind`` ("random",
    "timm", "export", "checkpoint", "weights file" or "unresolved": a recorded path that
    no longer exists here); exports and checkpoints add what they record (method,
    epochs, data).
    """
    chain: InitChain = []
    current: str | None = init
    seen: set[str] = set()
    while current is not None and len(chain) < _MAX_CHAIN:
        link, current, arch = _describe_init(current, arch)
        source = link.get("source")
        if source is not None:
            if source in seen:  # exports naming each other: stop at the repeat
                break
            seen.add(source)
        chain.append(link)
    return chain


def _describe_init(init: str, arch: str) -> tuple[dict[str, Any], str | None, str]:
    """One link of the chain, the init it started from (if recorded) and its arch."""
    if init == "random":
        return {"init": init, "kind": "random"}, None, arch
    name = timm_weights_name(init, arch)
    if name is not None:
        return {"init": init, "kind": "timm", "weights": name, **_hub_id(name)}, None, arch
    path = Path(init)
    meta_path = export_meta_path(path)
    if meta_path is not None:
        return _export_link(init, meta_path, arch)
    if path.is_file() and path.suffix not in (".safetensors", ".json"):
        return _checkpoint_link(init, path, arch)
    kind = "weights file" if path.is_file() else "unresolved"
    return {"init": init, "kind": kind, "source": str(path.resolve())}, None, arch


def _export_link(init: str, meta_path: Path,
                 arch: str) -> tuple[dict[str, Any], str | None, str]:
    meta = json.loads(meta_path.read_text())
    link = {"init": init, "kind": "export", "source": str(meta_path.resolve())}
    link.update({k: meta[k] for k in ("architecture", "in_chans", "method", "epochs",
                                      "planned_epochs", "steps", "data", "checkpoint")
                 if k in meta})
    return link, meta.get("init"), meta.get("architecture") or arch


def _checkpoint_link(init: str, path: Path,
                     arch: str) -> tuple[dict[str, Any], str | None, str]:
    link: dict[str, Any] = {"init": init, "kind": "weights file",
                            "source": str(path.resolve())}
    try:  # mmap: only the small config entries are read, not the tensors
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return link, None, arch  # the weights already loaded; only the history is unknown
    config = blob.get("config") if isinstance(blob, dict) else None
    if not isinstance(config, dict):
        return link, None, arch
    model = config.get("model", {})
    link.update(kind="checkpoint", architecture=model.get("arch"), epochs=blob.get("epoch"),
                steps=blob.get("step"), method=config.get("method", {}).get("name"),
                data={"path": config.get("data", {}).get("path")})
    return link, model.get("init"), model.get("arch") or arch


def _hub_id(name: str) -> dict[str, str]:
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        return {}
    return {"hub_id": cfg.hf_hub_id} if cfg is not None and cfg.hf_hub_id else {}
