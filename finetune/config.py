"""Fine-tuning configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from data_prep.label_budgets import BudgetUnit
from pretrain.encoder_init import EncoderInit


@dataclass
class SegAugmentConfig:
    """Augmentation of labelled slices; defaults aim at cardiac cine MRI (ACDC, M&Ms).

    Probabilities and intensity ranges follow nnU-Net's 2D recipe, which is tuned on these
    datasets: mirroring on both axes, gamma 0.7-1.5 (p 0.3), contrast and brightness (p
    0.15), noise (p 0.1). Geometry is milder than nnU-Net's (+-180 degrees, 0.7-1.4 zoom):
    prepared slices are already centred on the heart at a common pixel spacing, and flips
    already cover large orientation changes, so small rotations, zooms and shifts model the
    remaining patient-to-patient variation without filling corners with padding.
    Intensity units are those of the prepared data (z-scored per volume for MRI).
    """

    enabled: bool = True  # False: augment_pair returns its inputs untouched
    hflip: float = 0.5  # chance of a left-right flip per sample
    vflip: float = 0.5  # chance of an up-down flip per sample
    rotation: float = 15.0  # max degrees, uniform in +-rotation about the image centre
    rotation_prob: float = 0.2
    scale: tuple[float, float] = (0.85, 1.15)  # zoom of the content, log-uniform; >1 enlarges
    scale_prob: float = 0.2
    translate: float = 0.05  # max shift per axis, as a fraction of that side
    translate_prob: float = 0.2
    # Exponent range (log-uniform) applied on each image's own [min, max] rescaled to [0, 1].
    gamma: tuple[float, float] = (0.7, 1.5)
    gamma_prob: float = 0.3
    contrast: float = 0.25  # factor uniform in 1 +- contrast, about the image's mean
    contrast_prob: float = 0.15
    brightness: float = 0.1  # additive shift uniform in +-brightness, normalised units
    brightness_prob: float = 0.15
    noise_std: float = 0.1  # Gaussian noise std uniform in [0, noise_std], normalised units
    noise_prob: float = 0.1

    def __post_init__(self) -> None:
        # YAML gives lists; keep tuples so configs compare and hash the same either way.
        self.scale = _pair(self.scale, "scale")
        self.gamma = _pair(self.gamma, "gamma")
        probs = ("hflip", "vflip", "rotation_prob", "scale_prob", "translate_prob",
                 "gamma_prob", "contrast_prob", "brightness_prob", "noise_prob")
        checks: dict[str, tuple[bool, str]] = {
            name: (0 <= getattr(self, name) <= 1, "a probability in [0, 1]") for name in probs
        }
        checks.update({
            "rotation": (0 <= self.rotation <= 180, "degrees in [0, 180]"),
            "scale": (0 < self.scale[0] <= self.scale[1], "(low, high) with 0 < low <= high"),
            # Half a side already moves the image centre onto its border.
            "translate": (0 <= self.translate <= 0.5, "a fraction of the side in [0, 0.5]"),
            "gamma": (0 < self.gamma[0] <= self.gamma[1], "(low, high) with 0 < low <= high"),
            # A factor <= 0 would flatten or invert the image.
            "contrast": (0 <= self.contrast < 1, "in [0, 1)"),
            "brightness": (self.brightness >= 0, ">= 0"),
            "noise_std": (self.noise_std >= 0, ">= 0"),
        })
        for name, (ok, expected) in checks.items():
            value = getattr(self, name)
            numbers = value if isinstance(value, tuple) else (value,)
            if not ok or not all(math.isfinite(v) for v in numbers):
                raise ValueError(f"augment {name} must be {expected}, got {value!r}")


def _pair(value: tuple[float, float] | list[float], name: str) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"augment {name} must be (low, high), got {value!r}")
    return float(value[0]), float(value[1])


@dataclass
class FinetuneConfig:
    data: str = ""  # prepared dataset: a folder or an s3:// URL
    out: str = ""  # run directory
    arch: str = "resnet50"  # timm encoder name
    # "random"; "timm" (timm's default pretrained weights for arch, e.g. supervised
    # ImageNet) or "timm:ARCH.TAG", both through the Hugging Face hub cache; or a
    # timm-named weights file, pretrain export folder, pretrain run folder or checkpoint,
    # as a path or an s3:// URL (also one of a hierarchical chain: its export records
    # what it started from).
    init: str = "random"
    init_name: str = ""  # label used in reports; defaults to "random" or the init path
    # The first K epochs train the decoder only (encoder weights and BatchNorm statistics
    # fixed); 0 = never frozen.
    freeze_encoder_epochs: int = 0
    # Annotated training slices or patients (all labeled slices of each); 0 = the whole
    # training split. Subsets are nested across budgets for one seed.
    budget: int = 0
    budget_unit: BudgetUnit = "slices"
    seed: int = 0
    epochs: int = 150
    batch_size: int = 16
    # Oversampling: samples per epoch; budgets smaller than this are tiled up to it so
    # that every budget trains for the same number of steps (set it to at least the
    # sweep's largest budget, e.g. the training split size, as the reference study did).
    # Larger budgets see each slice once per epoch. 0 = no oversampling.
    epoch_samples: int = 0
    # The reference study used Adam (lr 1e-4); AdamW decouples weight decay from the
    # gradient (identical to Adam at weight_decay 0).
    optimizer: Literal["adam", "adamw"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0
    # The linear warm-up climbs from this rate to lr (the study: 1e-6 -> 1e-4 over 10
    # epochs, then cosine); step k of W warm-up steps uses start + (lr - start)(k + 1)/W.
    warmup_start_lr: float = 0.0
    # Clip the global gradient norm to this before each optimizer step (the study: 5.0);
    # None = no clipping.
    grad_clip_norm: float | None = None
    loss: Literal["dice_ce", "jaccard"] = "dice_ce"  # MONAI's DiceCELoss / Jaccard DiceLoss
    # spatial (image and mask together) and intensity (image) augmentation, on the device
    augment: SegAugmentConfig = field(default_factory=SegAugmentConfig)
    dice_targets: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.8])
    device: Literal["auto", "cpu"] = "auto"
    progress: bool = True
    overlays: int = 4  # validation slices drawn as PNG overlays at the end
    # Save resumable state every N epochs (0 = never: an interrupted run starts over).
    checkpoint_every: int = 1
    # Validate every N epochs (and after the last); convergence metrics use the validated
    # epochs only, without interpolation. Validation batches hold val_batch_size slices.
    val_every: int = 1
    val_batch_size: int = 64
    # torch.compile the U-Net; None: on for CUDA, off on the CPU.
    compile: bool | None = None
    # GB of device memory the labeled training subset and the validation split may take
    # there (no host-to-device copy per step); larger sets stay in pinned host memory.
    device_data_gb: float = 8.0

    def __post_init__(self) -> None:
        for key, lowest in (("budget", 0), ("epochs", 1), ("batch_size", 1),
                            ("epoch_samples", 0), ("freeze_encoder_epochs", 0),
                            ("overlays", 0), ("checkpoint_every", 0), ("val_every", 1),
                            ("val_batch_size", 1)):
            if getattr(self, key) < lowest:
                raise ValueError(f"{key} must be >= {lowest}, got {getattr(self, key)}")
        if self.freeze_encoder_epochs > self.epochs:
            raise ValueError(f"freeze_encoder_epochs ({self.freeze_encoder_epochs}) exceeds "
                             f"epochs ({self.epochs})")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.device_data_gb < 0:
            raise ValueError(f"device_data_gb must be >= 0, got {self.device_data_gb}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_start_lr <= self.lr:
            raise ValueError(f"warmup_start_lr must lie in [0, lr={self.lr}], "
                             f"got {self.warmup_start_lr}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm must be > 0 (or null: no clipping), "
                             f"got {self.grad_clip_norm}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must lie in [0, epochs={self.epochs}], "
                             f"got {self.warmup_epochs}")
        if any(not 0 < t <= 1 for t in self.dice_targets):
            raise ValueError(f"dice_targets must lie in (0, 1], got {self.dice_targets}")
        self.encoder_init()  # refuses timm weights of another architecture now

    def encoder_init(self) -> EncoderInit:
        return EncoderInit.parse(self.init, self.arch, "init")

    @property
    def label(self) -> str:
        return self.init_name or ("random" if self.init == "random" else self.init)
