"""Reading encoder weights from local files and loading them strictly into timm models.

Accepted sources: a pretrain export folder (``backbone.safetensors`` + ``backbone.json``)
or a pretrain run folder holding one, a ``.safetensors`` file, a torch file (loaded with
``weights_only=True``, never unpickling arbitrary objects) holding a plain state dict,
a ``{"state_dict"|"model": ...}`` wrapper or a pretrain checkpoint. Keys use timm's
names; 3-channel first convolutions adapt to 1 channel by summing, as timm does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

EXPORT_WEIGHTS = "backbone.safetensors"
EXPORT_META = "backbone.json"
CHECKPOINT_ENCODER_PREFIX = "online_encoder."


class EncoderMismatchError(ValueError):
    """Weights do not fit the encoder: the message lists the mismatched keys."""


@dataclass
class EncoderWeights:
    state_dict: dict[str, torch.Tensor]
    source: Path
    arch: str | None = None
    in_chans: int | None = None


def create_encoder(arch: str, in_chans: int) -> nn.Module:
    """A timm model without classifier (``num_classes=0``): pooled features out."""
    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans)
    except RuntimeError as exc:
        raise ValueError(f"model.arch: timm has no model {arch!r} ({exc})") from None


def read_encoder_weights(path: str | Path) -> EncoderWeights:
    path = Path(path)
    if path.is_dir():
        for candidate in (path / EXPORT_META, path / "export" / EXPORT_META):
            if candidate.is_file():
                return read_encoder_weights(candidate)
        raise FileNotFoundError(f"{path}: no {EXPORT_META} here or in {path / 'export'}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: encoder weights file does not exist")
    if path.suffix == ".json":
        meta = json.loads(path.read_text())
        weights = read_encoder_weights(path.parent / meta.get("weights", EXPORT_WEIGHTS))
        weights.arch, weights.in_chans = meta.get("architecture"), meta.get("in_chans")
        return weights
    if path.suffix == ".safetensors":
        try:
            state = safetensors.torch.load_file(str(path))
        except Exception as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
        meta_path = path.with_name(EXPORT_META)
        weights = EncoderWeights(state, path)
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            weights.arch, weights.in_chans = meta.get("architecture"), meta.get("in_chans")
        return weights
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot load as a weights-only torch file ({exc})") from None
    return EncoderWeights(_unwrap_state_dict(blob, path), path,
                          arch=_nested_get(blob, "config", "model", "arch"),
                          in_chans=_nested_get(blob, "config", "model", "in_chans"))


def _nested_get(blob: object, *keys: str) -> object:
    for key in keys:
        if not isinstance(blob, dict) or key not in blob:
            return None
        blob = blob[key]
    return blob


def _unwrap_state_dict(blob: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(blob, dict) and "model" in blob and isinstance(blob["model"], dict):
        inner = blob["model"]
        encoder = {k[len(CHECKPOINT_ENCODER_PREFIX):]: v for k, v in inner.items()
                   if k.startswith(CHECKPOINT_ENCODER_PREFIX)}
        return encoder or inner  # a pretrain checkpoint, or a {"model": state_dict} wrapper
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        return blob["state_dict"]
    if isinstance(blob, dict) and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return blob
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
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state)
                         if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong_shape:
        arch = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
        raise EncoderMismatchError(
            f"{weights.source} (arch {weights.arch or 'unknown'}) does not fit encoder {arch}: "
            + "; ".join(filter(None, [
                _describe("missing keys", missing),
                _describe("unexpected keys", unexpected),
                _describe("shape mismatch", [
                    f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                    for k in wrong_shape]),
            ]))
        )
    model.load_state_dict(state, strict=True)


def _adapt_first_conv(model: nn.Module, state: dict[str, torch.Tensor], cfg: dict) -> None:
    for name in _as_list(cfg.get("first_conv")):
        key = f"{name}.weight"
        if key not in state or key not in model.state_dict():
            continue
        wanted = model.state_dict()[key].shape[1]
        if state[key].ndim == 4 and state[key].shape[1] != wanted:
            state[key] = adapt_input_conv(wanted, state[key])


def _as_list(value: object) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)  # type: ignore[arg-type]


def _describe(what: str, keys: list[str], limit: int = 8) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:limit])
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{what}: {shown}{more}"
