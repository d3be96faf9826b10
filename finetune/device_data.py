"""Fine-tuning slices where the step reads them: on the training device when they fit.

An ACDC-sized labeled subset and validation split are a few hundred MB, so on a GPU they
are copied once and every batch is gathered on the device: a step does no host-to-device
copy. Sets over the memory budget stay in pinned host memory and each batch is gathered
into one of two pinned staging buffers and copied without blocking, so the copy of the
next batch overlaps the current step. On the CPU every set is simply where it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from data_prep.labeled_slices import SliceSet


@dataclass
class DeviceSlices:
    """Images (N, 1, H, W) float32 and masks (N, H, W) uint8 class ids (an eighth of
    int64's memory; batches come out as int64) of one split, gathered by index."""

    images: torch.Tensor
    masks: torch.Tensor
    device: torch.device
    _staging: list[tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]] = field(
        default_factory=list, repr=False)
    _turn: int = 0

    @classmethod
    def images_only(cls, images: torch.Tensor, device: torch.device) -> DeviceSlices:
        """A few images to predict on (overlays, report figures), moved to ``device``."""
        return cls(images.to(device), torch.zeros((len(images), 0, 0), dtype=torch.uint8,
                                                  device=device), device)

    @property
    def resident(self) -> bool:
        """True when the tensors live on the training device (no copy per batch)."""
        return self.images.device == self.device

    def __len__(self) -> int:
        return len(self.images)

    def index_device(self) -> torch.device:
        """Where batch indices should live: next to the tensors they select from."""
        return self.images.device

    def images_at(self, index: torch.Tensor) -> torch.Tensor:
        """Images at ``index``, on the training device."""
        if self.resident:
            return self.images.index_select(0, index)
        return self._copied(index)[0]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and masks at ``index``, on the training device."""
        if self.resident:
            images, masks = self.images.index_select(0, index), self.masks.index_select(0, index)
        else:
            images, masks = self._copied(index)
        return images, masks.long()

    def _copied(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = len(index)
        if len(self._staging) < 2 or self._staging[0][0].shape[0] < rows:
            self._staging = [(torch.empty((rows, *self.images.shape[1:]),
                                          dtype=self.images.dtype).pin_memory(),
                              torch.empty((rows, *self.masks.shape[1:]),
                                          dtype=self.masks.dtype).pin_memory(), None)
                             for _ in range(2)]
        images, masks, copied = self._staging[self._turn]
        if copied is not None:
            copied.synchronize()  # the buffer's last copy has left it: safe to refill
        torch.index_select(self.images, 0, index, out=images[:rows])
        torch.index_select(self.masks, 0, index, out=masks[:rows])
        on_device = (images[:rows].to(self.device, non_blocking=True),
                     masks[:rows].to(self.device, non_blocking=True))
        event = torch.cuda.Event() if self.device.type == "cuda" else None
        if event is not None:
            event.record()
        self._staging[self._turn] = (images, masks, event)
        self._turn = 1 - self._turn
        return on_device


def place(slices: SliceSet, device: torch.device, budget_bytes: float) -> DeviceSlices:
    """``slices`` on ``device`` when they fit in ``budget_bytes``, else pinned on the host."""
    masks = slices.masks.to(torch.uint8)
    if device.type == "cpu" or slices.images.nbytes + masks.nbytes <= budget_bytes:
        return DeviceSlices(slices.images.to(device), masks.to(device), device)
    return DeviceSlices(slices.images.pin_memory(), masks.pin_memory(), device)


def place_splits(train: SliceSet, val: SliceSet, device: torch.device, budget_gb: float
                 ) -> tuple[DeviceSlices, DeviceSlices]:
    """The training subset first (every step reads it), then validation, in the budget."""
    budget = budget_gb * 2**30
    train_on = place(train, device, budget)
    left = budget - (train_on.images.nbytes + train_on.masks.nbytes if train_on.resident
                     else 0)
    return train_on, place(val, device, left)
