"""Backbone export: timm-named safetensors plus a JSON description.

A run exports its online encoder when it ends; ``python -m pretrain export`` does the
same from the latest or a kept checkpoint at any time. The file loads with
``timm.create_model(arch, pretrained=True, num_classes=0, in_chans=..., [img_size=...,]
pretrained_cfg_overlay=dict(file=".../backbone.safetensors"))`` and with
``pretrain.weights.read_encoder_weights`` (``model.init``, fine-tuning's ``--init``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn

from cluster.atomic import atomic_path
from cluster.config import ConfigError, from_dict
from data_prep.manifest import Manifest
from pretrain.checkpoint import CHECKPOINT_DIR, LATEST
from pretrain.checkpoint_state import read_checkpoint
from pretrain.config import PretrainConfig
from pretrain.export_meta import EXPORT_DIR, EXPORT_WEIGHTS, BackboneMeta
from pretrain.probe_log import PROBE_FILE, probe_summary, read_probe_log
from pretrain.weights import (
    EncoderWeights,
    create_encoder,
    feature_width,
    load_into_encoder,
    takes_img_size,
)


def export_backbone(encoder: nn.Module, folder: Path, config: PretrainConfig, *,
                    epochs: int, steps: int, checkpoint: Path | None = None,
                    probe: dict[str, Any] | None = None) -> Path:
    """Write ``encoder``'s weights and their description into ``folder`` (with the live
    segmentation probe's summary and curve, when the run probed)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(folder / EXPORT_WEIGHTS) as tmp:
        safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt"})
    meta = backbone_meta(config, encoder, epochs=epochs, steps=steps)
    meta.checkpoint = str(checkpoint.resolve()) if checkpoint is not None else None
    meta.probe = probe
    meta.write(folder)
    return folder / EXPORT_WEIGHTS


def backbone_meta(config: PretrainConfig, encoder: nn.Module, *, epochs: int,
                  steps: int) -> BackboneMeta:
    """What an export needs to be rebuilt and understood: architecture, input, training
    reached (``epochs`` finished of ``planned_epochs``) and data."""
    return BackboneMeta(
        architecture=config.model.arch, in_chans=config.model.in_chans,
        # a model built for one input size records it
        img_size=config.data.crop_size if takes_img_size(config.model.arch) else None,
        num_features=feature_width(encoder), method=config.method.name, epochs=epochs,
        planned_epochs=config.optim.epochs, steps=steps,
        init=config.model.encoder_init().recorded(), data=_data_meta(config.data.path))


def _data_meta(path: str) -> dict[str, Any]:
    data: dict[str, Any] = {"path": str(Path(path).resolve())}
    try:
        manifest = Manifest.read(path)
    except (FileNotFoundError, ValueError):
        return data  # exporting an old run does not need its dataset any more
    data.update(name=manifest.name, pretrain_slices=manifest.counts["pretrain_slices"])
    return data


def export_checkpoint(run_dir: Path, checkpoint: str = LATEST,
                      out: Path | None = None) -> Path:
    """Export the online encoder of one of ``run_dir``'s checkpoints: ``last.pt``, a kept
    ``epochNNNN.pt`` or a path. Writes ``run_dir/export`` for ``last.pt`` (as the run's
    end does), ``run_dir/export-NAME`` for others, unless ``out`` says otherwise."""
    path = find_checkpoint(run_dir, checkpoint)
    saved = read_checkpoint(path)
    try:
        config = from_dict(PretrainConfig, saved.config)
    except ConfigError as exc:
        raise ValueError(f"{path}: its config does not fit this version of pretrain "
                         f"({exc})") from None
    encoder = create_encoder(config.model.arch, config.model.in_chans, config.data.crop_size)
    load_into_encoder(encoder, EncoderWeights(saved.encoder_state_dict(), path,
                                              arch=config.model.arch,
                                              in_chans=config.model.in_chans))
    if out is None:
        out = run_dir / (EXPORT_DIR if path.name == LATEST else f"{EXPORT_DIR}-{path.stem}")
    # Finished epochs; a checkpoint taken mid-epoch (run.checkpoint_every) says so in steps.
    # The probe curve up to the checkpoint's step goes with it (pretrain/probe.py).
    rows = [r for r in read_probe_log(run_dir / PROBE_FILE) if r["step"] <= saved.step]
    return export_backbone(encoder, out, config, epochs=saved.epoch, steps=saved.step,
                           checkpoint=path,
                           probe=probe_summary(rows)).parent


def find_checkpoint(run_dir: Path, checkpoint: str = LATEST) -> Path:
    """A bare file name is looked up in ``run_dir/checkpoints``; anything else is a path."""
    folder = run_dir / CHECKPOINT_DIR
    if Path(checkpoint).name != checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint file does not exist")
        return path
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory does not exist")
    kept = sorted(p.name for p in folder.glob("*.pt")) if folder.is_dir() else []
    if not kept:
        raise FileNotFoundError(
            f"{run_dir}: no checkpoints in {folder} (a run writes them at each epoch end, "
            f"and every run.checkpoint_every steps)")
    if checkpoint not in kept:
        raise FileNotFoundError(f"{folder}: no checkpoint {checkpoint!r}; there are "
                                f"{', '.join(kept)}")
    return folder / checkpoint
