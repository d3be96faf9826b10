"""Fine-tuning configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class FinetuneConfig:
    data: str = ""  # prepared dataset folder
    out: str = ""  # run directory
    arch: str = "resnet50"  # timm encoder name
    # "random", or a pretrain export / run folder / checkpoint, or a timm-named weights file.
    init: str = "random"
    init_name: str = ""  # label used in reports; defaults to "random" or the init path
    budget: int = 0  # annotated training slices; 0 = the whole training split
    seed: int = 0
    epochs: int = 150
    batch_size: int = 16
    # Samples per epoch; budgets smaller than this are oversampled so that every budget
    # trains for the same number of steps. 0 = the budget itself.
    epoch_samples: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0
    loss: Literal["dice_ce", "jaccard"] = "dice_ce"
    dice_targets: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.8])
    device: Literal["auto", "cpu"] = "auto"
    progress: bool = True
    overlays: int = 4  # validation slices drawn as PNG overlays at the end
    # Save resumable state every N epochs (0 = never: an interrupted run starts over).
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        if self.budget < 0:
            raise ValueError(f"budget must be >= 0, got {self.budget}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def label(self) -> str:
        return self.init_name or ("random" if self.init == "random" else self.init)
