"""Fine-tuning configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data_prep.label_budgets import BudgetUnit
from finetune.augment import SegAugmentConfig
from pretrain.encoder_init import EncoderInit


@dataclass
class FinetuneConfig:
    data: str = ""  # prepared dataset folder
    out: str = ""  # run directory
    arch: str = "resnet50"  # timm encoder name
    # "random"; "timm" (timm's default pretrained weights for arch, e.g. supervised
    # ImageNet) or "timm:ARCH.TAG", both through the Hugging Face hub cache; or a local
    # timm-named weights file, pretrain export folder, pretrain run folder or checkpoint
    # (also one of a hierarchical chain: its export records what it started from).
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
