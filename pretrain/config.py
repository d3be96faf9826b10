"""Pretraining configuration, as plain dataclasses (see ``cluster.config`` for loading)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pretrain.encoder_init import EncoderInit


@dataclass
class DataConfig:
    path: str = ""  # prepared dataset: a folder or an s3:// URL (data_prep output)
    crop_size: int = 224
    batch_size: int = 128  # global, across all ranks (and accumulated micro batches)
    # > 0: a fixed per-rank micro batch instead; the global batch (and with it the
    # learning rate) then follows the world size, e.g. after an elastic restart.
    batch_per_rank: int = 0
    # webdataset: DataLoader workers read and decode the shards, augmentation runs batched
    # on the training device; dali: an NVIDIA DALI pipeline decodes and augments (on the
    # GPU under CUDA), with ``workers`` CPU threads.
    loader: Literal["webdataset", "dali"] = "webdataset"
    workers: int = 2
    shuffle_buffer: int = 1000  # samples each reader shuffles together
    epoch_samples: int = 0  # samples per epoch; 0 = the shards' slice count
    # Draw shards with replacement up to epoch_samples per epoch instead of a permutation
    # of them: a fixed epoch length whatever the dataset size (mixtures, huge datasets).
    resampled: bool = False
    # Reads each loader worker keeps in flight (ranged GETs on an object store, where each
    # request waits tens of milliseconds); 1 reads one at a time.
    read_ahead: int = 8
    # Object-store datasets: a node-local folder that keeps whole shards once fetched, for
    # later epochs (empty: none), bounded to cache_max_gb (least recently used go first).
    cache_dir: str = ""
    cache_max_gb: float = 50.0

    def __post_init__(self) -> None:
        if self.read_ahead < 1:
            raise ValueError(f"read_ahead must be >= 1, got {self.read_ahead}")
        if self.cache_max_gb <= 0:
            raise ValueError(f"cache_max_gb must be > 0, got {self.cache_max_gb}")


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # any timm model name; ViTs are built for data.crop_size
    in_chans: int = 1
    # "random"; "timm" (timm's default pretrained weights for arch) or "timm:ARCH.TAG"
    # (fetched through the Hugging Face hub cache); or a weights file, pretrain export
    # folder, run folder or checkpoint (hierarchical pretraining): a path or s3:// URL.
    init: str = "random"

    def __post_init__(self) -> None:
        self.encoder_init()  # refuses timm weights of another architecture now

    def encoder_init(self) -> EncoderInit:
        return EncoderInit.parse(self.init, self.arch, "model.init")


@dataclass
class ViewConfig:
    """Augmentation of one view; BYOL uses asymmetric views (see ``AugmentConfig``).

    The fields added to BYOL's crop/flip/colour recipe (rotation, gamma, blur) default to
    off here, so a bare ``ViewConfig()`` is crop, flip, contrast and brightness only.
    """

    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area fraction
    ratio: tuple[float, float] = (0.75, 1.3333)
    hflip: float = 0.5
    vflip: float = 0.0
    # Max degrees, uniform in +-rotation about the crop centre. A rotated crop shrinks until
    # its corners fit the image (no padding is sampled), so its area falls below ``scale``.
    rotation: float = 0.0
    # Exponent range (log-uniform) applied on each image's own [min, max] rescaled to [0, 1].
    gamma: tuple[float, float] = (1.0, 1.0)
    brightness: float = 0.4  # additive shift, in normalised intensity units
    contrast: float = 0.4  # multiplicative factor range 1 +- contrast
    # Chance that a sample gets the contrast and brightness change at all (torchvision's
    # RandomApply around its colour jitter; the reference study used 0.8).
    jitter_prob: float = 1.0
    blur_prob: float = 0.0  # chance of a Gaussian blur per sample
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # blur std range in output pixels
    noise_std: float = 0.0  # max Gaussian noise std, in normalised units

    def __post_init__(self) -> None:
        checks = {
            "scale": 0 < self.scale[0] <= self.scale[1] <= 1,
            "ratio": 0 < self.ratio[0] <= self.ratio[1],
            "hflip": 0 <= self.hflip <= 1,
            "vflip": 0 <= self.vflip <= 1,
            "rotation": 0 <= self.rotation <= 180,
            "gamma": 0 < self.gamma[0] <= self.gamma[1],
            "brightness": self.brightness >= 0,
            "contrast": 0 <= self.contrast < 1,  # a factor <= 0 would invert or flatten
            "jitter_prob": 0 <= self.jitter_prob <= 1,
            "blur_prob": 0 <= self.blur_prob <= 1,
            "blur_sigma": 0 < self.blur_sigma[0] <= self.blur_sigma[1],
            "noise_std": self.noise_std >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"{bad[0]} out of range: {getattr(self, bad[0])!r}")


@dataclass
class AugmentConfig:
    # BYOL's asymmetric pair (blur always on view 1, rarely on view 2; no solarize), with
    # gamma as the 1-channel stand-in for colour jitter. Rotation stays small: slices come in
    # standard orientations, so +-10 degrees covers patient positioning without teaching
    # invariance to the anatomical layout that segmentation relies on.
    view1: ViewConfig = field(default_factory=lambda: ViewConfig(
        rotation=10.0, gamma=(0.7, 1.5), blur_prob=1.0))
    view2: ViewConfig = field(default_factory=lambda: ViewConfig(
        rotation=10.0, gamma=(0.7, 1.5), blur_prob=0.1, noise_std=0.1))


@dataclass
class MethodConfig:
    name: Literal["byol", "simclr", "barlow_twins", "vicreg"] = "byol"
    # Head widths; the papers use 4096/256 (BYOL), 2048/128 (SimCLR), 8192/8192
    # (Barlow Twins, VICReg).
    projector_hidden: int = 4096
    projection_dim: int = 256
    predictor_hidden: int = 0  # BYOL's predictor width; 0 = projector_hidden
    tau_base: float = 0.99  # BYOL: target EMA, cosine-scheduled from tau_base to 1
    temperature: float = 0.1  # SimCLR
    lambda_offdiag: float = 5e-3  # Barlow Twins: weight of the off-diagonal terms
    vicreg_weights: tuple[float, float, float] = (25.0, 25.0, 1.0)  # inv., var., cov.
    # BatchNorm statistics per view ("separate": one pass per view, as the reference BYOL,
    # Barlow Twins and VICReg implementations) or over both views ("joint": one pass, as
    # SimCLR's). "auto" picks separate for BYOL, Barlow Twins and VICReg, joint for SimCLR.
    view_batchnorm: Literal["auto", "separate", "joint"] = "auto"

    def resolved_view_batchnorm(self) -> Literal["separate", "joint"]:
        if self.view_batchnorm != "auto":
            return self.view_batchnorm
        return "joint" if self.name == "simclr" else "separate"


@dataclass
class OptimConfig:
    name: Literal["adamw", "lars"] = "adamw"
    lr: float = 1e-3  # for a global batch of 256; scaled linearly with the batch
    momentum: float = 0.9  # LARS
    eta: float = 0.001  # LARS trust coefficient (biases and norm weights are not adapted)
    # LARS trust ratio: "update" eta*||w||/||g + wd*w||; "paper" (You et al. 2017,
    # solo-learn, the reference study) eta*||w||/(||g|| + wd*||w||). Same when wd = 0.
    trust_ratio: Literal["update", "paper"] = "update"
    # LARS only (adamw ignores it): cap each tensor's adaptive rate at the global lr (LARC)
    clip_lr: bool = False
    weight_decay: float = 1e-6
    warmup_epochs: float = 1.0
    epochs: int = 10
    grad_accum: int = 1  # micro batches per optimizer step

    def __post_init__(self) -> None:
        if self.trust_ratio not in ("update", "paper"):
            raise ValueError(f"optim.trust_ratio must be 'update' or 'paper', "
                             f"got {self.trust_ratio!r}")


@dataclass
class RunConfig:
    out: str = ""  # run directory: a folder or an s3:// URL
    # with an s3:// out: the node-local working copy of the run folder (default:
    # $MEDSSL_LOCAL_RUNS or the temp folder, see cluster/storage/mirror.py)
    local_dir: str = ""
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    device: Literal["auto", "cpu"] = "auto"
    # ddp: torch DistributedDataParallel; deepspeed: a DeepSpeed engine (ZeRO zero_stage),
    # both launched by torchrun.
    backend: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = 0  # DeepSpeed ZeRO: 0 plain, 1 optimizer state, 2 + gradients sharded
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA
    channels_last: bool = True  # on CUDA, with run.backend=ddp
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
class ProbeConfig:
    """The live segmentation probe (pretrain/probe.py)."""

    every_epochs: int = 0  # probe after every K epochs (and before training); 0 = off
    every_steps: int = 0  # or after every K optimizer steps
    budget: int = 64  # labeled training slices the head trains on (the same each time)
    val_volumes: int = 8  # whole validation volumes it is scored on
    steps: int = 150  # head training steps per probe
    batch_size: int = 16
    lr: float = 3e-3
    encoder: Literal["online", "target"] = "online"  # target: BYOL's EMA encoder
    decoder: bool = False  # a small 3x3 decoder after the summed levels
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return self.every_epochs > 0 or self.every_steps > 0

    def __post_init__(self) -> None:
        for key in ("every_epochs", "every_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"probe.{key} must be >= 0, got {getattr(self, key)}")
        if self.every_epochs and self.every_steps:
            raise ValueError("probe.every_epochs and probe.every_steps exclude each other")
        for key in ("budget", "val_volumes", "steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"probe.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
