"""timm encoders: creating them, and loading weights into them strictly.

Weights come from timm's pretrained tags (through the Hugging Face hub cache) or from
local files: a pretrain export folder (``backbone.safetensors`` + ``backbone.json``) or
a pretrain run folder holding one, a ``.safetensors`` file, a torch file (loaded with
``weights_only=True``, never unpickling arbitrary objects) holding a plain state dict,
a ``{"state_dict"|"model": ...}`` wrapper or a pretrain checkpoint. Keys use timm's
names; 3-channel first convolutions adapt to 1 channel by summing and ViT position
embeddings are resampled to the model's patch grid, both as timm does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv, get_pretrained_cfg
from torch import nn

from pretrain.checkpoint_state import PretrainCheckpoint
from pretrain.encoder_errors import EncoderMismatchError, WeightsUnavailableError
from pretrain.export_meta import EXPORT_META, BackboneMeta, find_backbone_meta


@dataclass
class EncoderWeights:
    state_dict: dict[str, torch.Tensor]
    source: Path
    arch: str | None = None
    in_chans: int | None = None
    img_size: int | None = None


def create_encoder(arch: str, in_chans: int, img_size: int | None = None) -> nn.Module:
    """A timm model without classifier (``num_classes=0``): pooled features out.

    ``img_size`` (the crop size) reaches only models built for one input size.
    """
    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans,
                                 **_size_kwargs(arch, img_size))
    except RuntimeError as exc:
        raise ValueError(f"model.arch: timm has no model {arch!r} ({exc})") from None


def create_pretrained_encoder(name: str, in_chans: int, img_size: int | None = None,
                              key: str = "model.init") -> nn.Module:
    """timm model ``name`` ("arch" or "arch.tag") with timm's pretrained weights.

    timm fetches them through the Hugging Face hub cache (``HF_HOME``/``HF_HUB_CACHE``;
    ``HF_HUB_OFFLINE=1`` reads only the cache) and applies the model's own checkpoint
    filter, 3 -> 1 channel stem adaptation and position-embedding resampling. The
    classifier is removed only after loading, so that timm's load stays strict. Errors
    name the config ``key`` the weights were asked for with.
    """
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as exc:  # an unknown tag
        raise ValueError(f"{key}: {exc}") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ValueError(f"{key}: timm has no pretrained weights for {name!r}")
    try:
        model = timm.create_model(name, pretrained=True, in_chans=in_chans,
                                  **_size_kwargs(name, img_size))
    except OSError as exc:  # hub, cache and network errors (not-cached-offline included)
        source = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
        raise WeightsUnavailableError(
            f"{key}: cannot load timm's pretrained weights {name!r} from {source} "
            f"({type(exc).__name__}: {exc}). Without internet access, copy the weights "
            f"file (model.safetensors) from there and set {key} to its local path, "
            f"or fill the Hugging Face cache that HF_HOME/HF_HUB_CACHE point to."
        ) from None
    # every timm model has it; nn.Module's stubs type unknown attributes as tensors
    model.reset_classifier(0)  # type: ignore[operator]
    return model


def feature_width(encoder: nn.Module) -> int:
    """The width of the encoder's pooled features (timm's ``num_features``)."""
    width = getattr(encoder, "num_features", None)
    if not isinstance(width, int):
        raise TypeError(f"the encoder ({type(encoder).__name__}) has no integer "
                        "num_features; a timm model is expected")
    return width


def takes_img_size(arch: str) -> bool:
    """Whether timm builds ``arch`` for one input size (ViTs: one position embedding per
    patch), so that it must be told the crop size.

    timm's pretrained config states this as ``fixed_input_size``; such models accept
    ``img_size`` and most others reject it. The entrypoints' signatures (``**kwargs``)
    cannot tell. ``dynamic_img_size`` is not used: it resamples the position
    embeddings at every forward pass, and every loader of the export would have to
    repeat it to reproduce the outputs; a model built at the crop size has one grid.
    """
    cfg = get_pretrained_cfg(arch)  # None for models without pretrained configs
    return bool(cfg and cfg.fixed_input_size)


def _size_kwargs(arch: str, img_size: int | None) -> dict[str, Any]:
    return {"img_size": img_size} if img_size and takes_img_size(arch) else {}


def read_encoder_weights(path: str | Path) -> EncoderWeights:
    path = Path(path)
    if path.is_dir():
        meta_path = find_backbone_meta(path)
        if meta_path is None:
            raise FileNotFoundError(f"{path}: no {EXPORT_META} here or in {path / 'export'}")
        return read_encoder_weights(meta_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: encoder weights file does not exist")
    if path.suffix == ".json":
        meta = BackboneMeta.read(path)
        return _described(read_encoder_weights(path.parent / meta.weights), meta)
    if path.suffix == ".safetensors":
        try:
            state = safetensors.torch.load_file(str(path))
        except Exception as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
        meta_path = find_backbone_meta(path)
        weights = EncoderWeights(state, path)
        return weights if meta_path is None else _described(weights, BackboneMeta.read(meta_path))
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot load as a weights-only torch file ({exc})") from None
    return _weights_from_torch_file(blob, path)


def _described(weights: EncoderWeights, meta: BackboneMeta) -> EncoderWeights:
    """``weights`` with what an export's description says about them."""
    weights.arch, weights.in_chans, weights.img_size = meta.architecture, meta.in_chans, \
        meta.img_size
    return weights


def _weights_from_torch_file(blob: object, path: Path) -> EncoderWeights:
    """The encoder weights in a loaded torch file: a pretraining checkpoint's online
    encoder (with the architecture its config names), else a ``{"state_dict"|"model":
    ...}`` wrapper's or a plain state dict's tensors."""
    if isinstance(blob, dict) and {"model", "config", "epoch"} <= set(blob):
        saved = PretrainCheckpoint.from_dict(blob, path)
        model = saved.config.get("model", {})
        return EncoderWeights(saved.encoder_state_dict(), path, arch=model.get("arch"),
                              in_chans=model.get("in_chans"))
    if isinstance(blob, dict):
        for key in ("model", "state_dict"):
            if isinstance(blob.get(key), dict):
                blob = blob[key]
                break
    if isinstance(blob, dict) and blob and all(isinstance(v, torch.Tensor)
                                               for v in blob.values()):
        return EncoderWeights(blob, path)
    raise ValueError(f"{path}: holds no state dict of tensors")


def load_into_encoder(model: nn.Module, weights: EncoderWeights) -> None:
    """Load ``weights`` into a timm encoder, refusing any partial or mismatched load."""
    state = dict(weights.state_dict)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    for name in _as_list(cfg.get("classifier")):
        # Exported backbones carry no classifier; ImageNet files do, and we drop it.
        if f"{name}.weight" not in model.state_dict():
            state.pop(f"{name}.weight", None)
            state.pop(f"{name}.bias", None)
    _adapt_first_conv(model, state, cfg)
    _resample_pos_embed(model, state)
    expected = model.state_dict()
    mismatches = key_mismatches(expected, state)
    if mismatches:
        arch = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
        # e.g. convnet weights for a ViT: say so before the long key lists
        unrelated = [] if set(state) & set(expected) else [
            "no tensor name in common (weights of another kind of network)"]
        raise EncoderMismatchError(
            f"{weights.source} (arch {weights.arch or 'unknown'}) does not fit encoder {arch}: "
            + "; ".join(unrelated + mismatches))
    model.load_state_dict(state, strict=True)


def _adapt_first_conv(model: nn.Module, state: dict[str, torch.Tensor], cfg: dict) -> None:
    for name in _as_list(cfg.get("first_conv")):
        key = f"{name}.weight"
        if key not in state or key not in model.state_dict():
            continue
        wanted = model.state_dict()[key].shape[1]
        if state[key].ndim == 4 and state[key].shape[1] != wanted:
            state[key] = adapt_input_conv(wanted, state[key])


def _resample_pos_embed(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """ViT position embeddings made for another square patch grid (another crop size)
    are resampled to the model's grid, as timm's ViT checkpoint filter does."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    expected, given = model.state_dict().get("pos_embed"), state.get("pos_embed")
    if grid is None or expected is None or given is None or given.ndim != 3:
        return
    prefix = 0 if getattr(model, "no_embed_class", False) \
        else getattr(model, "num_prefix_tokens", 1)
    patches = given.shape[1] - prefix
    if given.shape == expected.shape or given.shape[2] != expected.shape[2] \
            or patches < 1 or math.isqrt(patches) ** 2 != patches:
        return  # equal, or not a square grid of the same width: the key check reports it
    state["pos_embed"] = resample_abs_pos_embed(given, new_size=list(grid),
                                                num_prefix_tokens=prefix)


def _as_list(value: object) -> list[str]:
    """A timm config entry naming one layer or several."""
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def key_mismatches(expected: dict[str, torch.Tensor],
                   given: dict[str, torch.Tensor]) -> list[str]:
    """Keys of ``given`` missing, unexpected or of another shape than in ``expected``, as
    ``describe_keys`` texts; empty when every key fits."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(given))
              if tuple(given[k].shape) != tuple(expected[k].shape)]
    return [text for text in (describe_keys("missing keys", missing),
                              describe_keys("unexpected keys", unexpected),
                              describe_keys("shape mismatch", shapes)) if text]


def describe_keys(what: str, keys: list[str], limit: int = 8) -> str:
    """``"what: k1, k2 (+N more)"`` for an error message; empty when ``keys`` is."""
    if not keys:
        return ""
    shown = ", ".join(keys[:limit])
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{what}: {shown}{more}"
