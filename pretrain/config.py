"""Pretraining configuration, as plain dataclasses (see ``cluster.config`` for loading)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataConfig:
    path: str = ""  # prepared dataset folder (data_prep output)
    crop_size: int = 224
    batch_size: int = 128  # global, across all ranks
    workers: int = 2
    shuffle_buffer: int = 1000
    epoch_samples: int = 0  # samples per epoch; 0 = the shards' slice count


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # any timm model name
    in_chans: int = 1
    # "random", or a local weights file / pretrain export folder / pretrain checkpoint.
    init: str = "random"


@dataclass
class ViewConfig:
    """Augmentation of one view; BYOL uses asymmetric views."""

    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area fraction
    ratio: tuple[float, float] = (0.75, 1.3333)
    hflip: float = 0.5
    vflip: float = 0.0
    brightness: float = 0.4  # additive shift, in normalised intensity units
    contrast: float = 0.4  # multiplicative factor range 1 +- contrast
    noise_std: float = 0.0  # max Gaussian noise std, in normalised units


@dataclass
class AugmentConfig:
    view1: ViewConfig = field(default_factory=ViewConfig)
    view2: ViewConfig = field(default_factory=lambda: ViewConfig(noise_std=0.1))


@dataclass
class MethodConfig:
    name: Literal["byol", "simclr", "barlow_twins", "vicreg"] = "byol"
    # Head widths; the papers use 4096/256 (BYOL), 2048/128 (SimCLR), 8192/8192
    # (Barlow Twins, VICReg).
    projector_hidden: int = 4096
    projection_dim: int = 256
    tau_base: float = 0.99  # BYOL: target EMA, cosine-scheduled from tau_base to 1
    temperature: float = 0.1  # SimCLR
    lambda_offdiag: float = 5e-3  # Barlow Twins: weight of the off-diagonal terms
    vicreg_weights: tuple[float, float, float] = (25.0, 25.0, 1.0)  # inv., var., cov.


@dataclass
class OptimConfig:
    name: Literal["adamw", "lars"] = "adamw"
    lr: float = 1e-3  # for a global batch of 256; scaled linearly with the batch
    momentum: float = 0.9  # LARS
    eta: float = 0.001  # LARS trust coefficient (biases and norm weights are not adapted)
    weight_decay: float = 1e-6
    warmup_epochs: float = 1.0
    epochs: int = 10


@dataclass
class RunConfig:
    out: str = ""  # run directory
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    device: Literal["auto", "cpu"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA
    channels_last: bool = True  # on CUDA
    compile: bool = False  # torch.compile the networks (CUDA)
    sync_batchnorm: bool = True  # BatchNorm statistics over the global batch (multi-process)
    # Checkpoints: checkpoints/last.pt at every epoch end and every N steps (0: epochs
    # only); the end-of-epoch checkpoints of keep_epochs are also kept as epochNNNN.pt
    # (to study how pretraining length affects fine-tuning).
    checkpoint_every: int = 0
    # Seconds a collective may wait before the process group fails (then torchrun restarts).
    dist_timeout_s: float = 1800.0
    keep_epochs: list[int] = field(default_factory=list)


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
