"""One fine-tuning step, as the training loop and the throughput benchmark both run it.

A batch is gathered where the slices live (the device, when they fit), augmented jointly
on the device, and trained on in bf16 autocast and channels_last on CUDA. The loss comes
back as a detached device tensor: nothing here waits for the GPU.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from finetune.augment import augment_pair
from finetune.config import FinetuneConfig, SegAugmentConfig
from finetune.device_data import DeviceSlices
from finetune.model import build_finetune_optimizer


@dataclass
class FinetuneStep:
    model: nn.Module  # owns the parameters and the state that is saved
    forward: nn.Module  # the model, or its torch.compile'd wrapper (same parameters)
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    augment: SegAugmentConfig
    device: torch.device
    grad_clip_norm: float | None = None  # max global gradient norm; None: not clipped

    @property
    def compiled(self) -> bool:
        return self.forward is not self.model

    def __call__(self, data: DeviceSlices, index: torch.Tensor, generator: torch.Generator,
                 lr: float) -> torch.Tensor:
        images, masks = data.batch(index)
        # image and mask move together, on the training device, per-sample parameters
        images, masks = augment_pair(images, masks, self.augment, generator)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.device):
            logits = self.forward(images)
        loss = self.loss_fn(logits.float(), masks[:, None])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip_norm is not None:
            clip_gradients(self.model, self.grad_clip_norm)
        self.optimizer.step()
        return loss.detach()


def build_step(model: nn.Module, config: FinetuneConfig, device: torch.device) -> FinetuneStep:
    """The step for ``model`` (already on ``device``) as ``config`` asks for it."""
    wanted = config.compile if config.compile is not None else device.type == "cuda"
    forward = torch.compile(model, dynamic=False) if wanted else model
    optimizer = build_finetune_optimizer(model.parameters(), config.optimizer, config.lr,
                                         config.weight_decay)
    return FinetuneStep(model, forward, optimizer, loss_function(config.loss),  # type: ignore[arg-type]
                        config.augment, device, config.grad_clip_norm)


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale all gradients so their global L2 norm is at most ``max_norm``; returns the
    norm before clipping, as a device tensor.

    No GradScaler is involved (bf16 autocast needs none), so the gradients are already
    unscaled. torch computes the norm and the scale on the device (foreach kernels where
    the device has them) and never reads them on the host: the step stays free of
    synchronisation. Frozen encoder parameters have no gradient and are skipped.
    """
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def loss_function(name: str) -> nn.Module:
    # imported here: MONAI loads all its submodules, seconds that the sweep driver and
    # the report, which import this module, do not need
    from monai.losses import DiceCELoss, DiceLoss

    if name == "jaccard":
        return DiceLoss(to_onehot_y=True, softmax=True, jaccard=True)
    return DiceCELoss(to_onehot_y=True, softmax=True)


def autocast(device: torch.device) -> AbstractContextManager[object]:
    """bf16 autocast on CUDA; full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
