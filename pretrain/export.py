"""Backbone export: timm-named safetensors plus a JSON description.

A run exports its online encoder when it ends; ``python -m pretrain export`` does the
same from the latest or a kept checkpoint at any time, of a run folder or of one in an
object store (``s3://``: the checkpoint is fetched, the export written back there). The
file loads with
``timm.create_model(arch, pretrained=True, num_classes=0, in_chans=..., [img_size=...,]
pretrained_cfg_overlay=dict(file=".../backbone.safetensors"))`` and with
``pretrain.weights.read_encoder_weights`` (``model.init``, fine-tuning's ``--init``).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import safetensors.torch
from torch import nn

from cluster.atomic import atomic_path
from cluster.config import ConfigError, from_dict
from cluster.storage import is_url, join, local_path, name_of
from cluster.storage.mirror import staged_folder
from cluster.storage.objects import exists, list_files
from cluster.storage.urls import PathOrUrl, absolute, normalize
from data_prep.manifest import Manifest
from pretrain.checkpoint import CHECKPOINT_DIR, LATEST
from pretrain.checkpoint_state import PretrainCheckpoint, read_checkpoint
from pretrain.config import PretrainConfig
from pretrain.export_meta import EXPORT_DIR, EXPORT_META, EXPORT_WEIGHTS, BackboneMeta
from pretrain.probe_log import PROBE_FILE, probe_summary, read_probe_log
from pretrain.stored_init import require
from pretrain.weights import (
    EncoderWeights,
    create_encoder,
    feature_width,
    load_into_encoder,
    takes_img_size,
)


def export_backbone(encoder: nn.Module, folder: Path, config: PretrainConfig, *,
                    epochs: int, steps: int, checkpoint: PathOrUrl | None = None,
                    probe: dict[str, Any] | None = None) -> Path:
    """Write ``encoder``'s weights and their description into ``folder`` (with the live
    segmentation probe's summary and curve, when the run probed)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(folder / EXPORT_WEIGHTS) as tmp:
        safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt"})
    meta = backbone_meta(config, encoder, epochs=epochs, steps=steps)
    meta.checkpoint = absolute(checkpoint) if checkpoint is not None else None
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
    data: dict[str, Any] = {"path": absolute(path)}
    try:
        manifest = Manifest.read(path)
    except (OSError, ValueError):  # OSError: also a store that is gone or denies access
        return data  # exporting an old run does not need its dataset any more
    data.update(name=manifest.name, pretrain_slices=manifest.counts["pretrain_slices"])
    return data


def export_checkpoint(run_dir: PathOrUrl, checkpoint: str = LATEST,
                      out: PathOrUrl | None = None) -> str:
    """Export the online encoder of one of ``run_dir``'s checkpoints: ``last.pt``, a kept
    ``epochNNNN.pt`` or a path. Writes ``run_dir/export`` for ``last.pt`` (as the run's
    end does), ``run_dir/export-NAME`` for others, unless ``out`` says otherwise. Each of
    them may be an ``s3://`` URL: the checkpoint is fetched into the node-local cache
    (``pretrain.stored_init``), the export uploaded description last. Returns ``out``."""
    source = find_checkpoint(run_dir, checkpoint)
    path, saved = _read(source)
    try:
        config = from_dict(PretrainConfig, saved.config)
    except ConfigError as exc:
        raise ValueError(f"{source}: its config does not fit this version of pretrain "
                         f"({exc})") from None
    encoder = create_encoder(config.model.arch, config.model.in_chans, config.data.crop_size)
    load_into_encoder(encoder, EncoderWeights(saved.encoder_state_dict(), path,
                                              arch=config.model.arch,
                                              in_chans=config.model.in_chans))
    if out is None:
        name = PurePosixPath(name_of(source))
        out = join(run_dir, EXPORT_DIR if name.name == LATEST else f"{EXPORT_DIR}-{name.stem}")
    # Finished epochs; a checkpoint taken mid-epoch (run.checkpoint_every) says so in steps.
    # The probe curve up to the checkpoint's step goes with it (pretrain/probe.py).
    rows = [r for r in read_probe_log(join(run_dir, PROBE_FILE)) if r["step"] <= saved.step]
    with staged_folder(out, commit=[EXPORT_META]) as folder:
        export_backbone(encoder, folder, config, epochs=saved.epoch, steps=saved.step,
                        checkpoint=source, probe=probe_summary(rows))
    return normalize(out)


def _read(source: str) -> tuple[Path, PretrainCheckpoint]:
    """The checkpoint at ``source`` and its local path (for a URL: its fetched copy)."""
    if not is_url(source):
        return local_path(source), read_checkpoint(source)
    stored = require(source)
    with stored.naming_urls():
        path = stored.local()
        return path, read_checkpoint(path)


def find_checkpoint(run_dir: PathOrUrl, checkpoint: str = LATEST) -> str:
    """A bare file name is looked up in ``run_dir/checkpoints``; anything else is a path
    (or a URL). Either way the checkpoint's path or URL."""
    folder = join(run_dir, CHECKPOINT_DIR)
    if PurePosixPath(checkpoint).name != checkpoint:
        if not exists(checkpoint):
            raise FileNotFoundError(f"{checkpoint}: checkpoint file does not exist")
        return normalize(checkpoint)
    kept = sorted(name for name in list_files(folder)
                  if "/" not in name and name.endswith(".pt"))
    if not kept:
        if not (list_files(run_dir) if is_url(run_dir) else local_path(run_dir).is_dir()):
            raise FileNotFoundError(f"{run_dir}: run directory does not exist")
        raise FileNotFoundError(
            f"{run_dir}: no checkpoints in {folder} (a run writes them at each epoch end, "
            f"and every run.checkpoint_every steps)")
    if checkpoint not in kept:
        raise FileNotFoundError(f"{folder}: no checkpoint {checkpoint!r}; there are "
                                f"{', '.join(kept)}")
    return join(folder, checkpoint)
