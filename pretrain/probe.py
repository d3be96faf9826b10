"""A live segmentation probe: how useful the encoder is for segmentation while it trains.

Every ``probe.every_epochs`` epochs (or ``probe.every_steps`` steps), and once before
training starts, rank 0 copies the current encoder (frozen, in eval mode), computes its
multi-scale features once for a fixed labeled subset of the training split, trains a
light head on them (a 1x1 convolution per level, upsampled and summed; optionally a
small decoder) for a fixed number of steps, and scores the head with the project's
volume Dice on fixed whole validation volumes. The subset, the volumes, the head's
initialisation and its batches are the same at every probe, so the curve moves only
with the encoder.

The probe never touches the training state: it works on a deep copy, draws its random
numbers from its own generators (the global RNG is forked around the head's
initialisation), and reads the prepared dataset's zarr store, not the shards.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_prep.geometry import center_pad_crop
from data_prep.label_budgets import budget_subset
from data_prep.labeled_slices import SliceSet, load_slices, open_split, slice_patients
from data_prep.manifest import Manifest
from data_prep.segmentation_metrics import SegmentationMetrics
from pretrain.config import PretrainConfig, ProbeConfig


class ProbeHead(nn.Module):
    """Per-level 1x1 convolutions, upsampled to the input size and summed."""

    def __init__(self, channels: list[int], classes: int, decoder: bool, hidden: int = 32):
        super().__init__()
        width = hidden if decoder else classes
        self.levels = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.decoder = nn.Sequential(
            nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, classes, 1)) if decoder else nn.Identity()

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        total = sum(F.interpolate(level(f.float()), size=size, mode="bilinear",
                                  align_corners=False)
                    for level, f in zip(self.levels, features))
        return self.decoder(total)


def fit_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop or zero-pad the last two axes to ``size`` (the pretraining crop)."""
    planes_first = np.moveaxis(images.numpy(), (-2, -1), (0, 1))
    fitted = np.moveaxis(center_pad_crop(planes_first, size), (0, 1), (-2, -1))
    return torch.from_numpy(np.ascontiguousarray(fitted))


def check_probe_data(config: PretrainConfig, manifest: Manifest) -> None:
    """Refuse a probe on a dataset without labeled train and val slices, before training."""
    if not config.probe.enabled:
        return
    slices = manifest.labeled_store.get("slices", {})
    missing = [split for split in ("train", "val") if not slices.get(split)]
    if missing:
        raise ValueError(f"probe.every_epochs/every_steps: {config.data.path} has no labeled "
                         f"slices in split(s) {', '.join(missing)}; the segmentation probe "
                         "needs labeled train and val slices (set probe.every_epochs=0 to "
                         "pretrain without it)")


def probe_slices(data_path: str, config: ProbeConfig) -> tuple[SliceSet, SliceSet]:
    """The fixed labeled training subset and the fixed whole validation volumes."""
    patients = slice_patients(data_path, "train")
    subset = budget_subset(patients, min(config.budget, len(patients)), "slices", config.seed)
    train = load_slices(data_path, "train", subset)
    store = open_split(data_path, "val")
    volume_of = store.volume_index
    chosen_volumes = sorted(set(volume_of.tolist()))[:config.val_volumes]
    val = load_slices(data_path, "val", np.flatnonzero(np.isin(volume_of, chosen_volumes)))
    return train, val


class SegmentationProbe:
    """Trains and scores the probe head on a frozen copy of an encoder (rank 0 only)."""

    def __init__(self, config: ProbeConfig, data_path: str, crop: int, device: torch.device):
        self.config, self.crop, self.device = config, crop, device
        self.class_names = Manifest.read(data_path).class_names
        train, val = probe_slices(data_path, config)
        self.train_images = fit_to(train.images, crop)
        self.train_masks = fit_to(train.masks, crop)
        self.val = val
        self.val_images, self.val_masks = fit_to(val.images, crop), fit_to(val.masks, crop)

    @torch.no_grad()
    def _features(self, encoder: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        levels: list[list[torch.Tensor]] = []
        keep = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        forward_intermediates = getattr(encoder, "forward_intermediates", None)
        if not callable(forward_intermediates):
            raise TypeError(f"the probe needs a timm encoder (forward_intermediates), "
                            f"got {type(encoder).__name__}")
        for start in range(0, len(images), 32):
            batch = images[start:start + 32].to(self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16,
                                enabled=self.device.type == "cuda"):
                out = forward_intermediates(batch, intermediates_only=True)
            levels.append([f.to(keep) for f in out])
        return [torch.cat(parts) for parts in zip(*levels)]

    def run(self, encoder: nn.Module) -> dict[str, Any]:
        """Probe ``encoder`` (left untouched): mean and per-class volume Dice, seconds."""
        start = time.perf_counter()
        frozen = copy.deepcopy(encoder).eval().requires_grad_(False)
        train_features = self._features(frozen, self.train_images)
        val_features = self._features(frozen, self.val_images)
        del frozen
        with torch.random.fork_rng(devices=[]):  # the training run's RNG stays as it was
            torch.manual_seed(self.config.seed)
            head = ProbeHead([f.shape[1] for f in train_features], len(self.class_names),
                             self.config.decoder).to(self.device)
        self._train_head(head, train_features)
        dice = self._score(head, val_features)
        return {**dice, "seconds": time.perf_counter() - start}

    def _train_head(self, head: ProbeHead, features: list[torch.Tensor]) -> None:
        from monai.losses import DiceCELoss  # MONAI's import costs seconds: only when probing

        optimizer = torch.optim.Adam(head.parameters(), lr=self.config.lr)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        masks = self.train_masks.to(self.device)
        draws = torch.Generator().manual_seed(self.config.seed)
        size = (self.crop, self.crop)
        head.train()
        for _ in range(self.config.steps):
            index = torch.randint(0, len(masks), (self.config.batch_size,), generator=draws)
            index = index.to(self.device)
            logits = head([f.index_select(0, index) for f in features], size)
            loss = loss_fn(logits, masks.index_select(0, index)[:, None])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def _score(self, head: ProbeHead, features: list[torch.Tensor]) -> dict[str, Any]:
        head.eval()
        size = (self.crop, self.crop)
        predictions = [head([f[start:start + 32] for f in features], size).argmax(dim=1).cpu()
                       for start in range(0, len(self.val_masks), 32)]
        metrics = SegmentationMetrics(len(self.class_names), self.class_names)
        metrics.update(torch.cat(predictions).numpy(), self.val_masks.numpy(),
                       self.val.volumes, self.val.positions, self.val.spacing)
        summary = metrics.summary(hd95=False)["volume_dice"]
        return {"dice": summary["mean"] or 0.0, "per_class": summary["per_class"]}
