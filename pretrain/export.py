"""Backbone export: timm-named safetensors plus a JSON description.

The file loads with ``timm.create_model(arch, pretrained=True, num_classes=0,
in_chans=..., pretrained_cfg_overlay=dict(file=".../backbone.safetensors"))`` and with
``finetune``'s encoder initialisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn

from cluster.atomic import atomic_path, atomic_write_json
from pretrain.weights import EXPORT_META, EXPORT_WEIGHTS


def export_backbone(encoder: nn.Module, folder: Path, meta: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(folder / EXPORT_WEIGHTS) as tmp:
        safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_json(folder / EXPORT_META, {"weights": EXPORT_WEIGHTS, **meta})
    return folder / EXPORT_WEIGHTS
