"""Fine-tuning slices on the training device, or pinned on the host over the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep.labeled_slices import SliceSet
from finetune.device_data import place, place_splits
from finetune.train import predict


def _slices(count: int, size: int = 8) -> SliceSet:
    generator = torch.Generator().manual_seed(count)
    return SliceSet(images=torch.randn(count, 1, size, size, generator=generator),
                    masks=torch.randint(0, 4, (count, size, size), generator=generator),
                    volumes=[f"v{i // 3}" for i in range(count)],
                    patients=["p"] * count, positions=np.arange(count) % 3,
                    spacing=np.ones((count, 3), np.float32))


def test_batches_are_the_slices_at_their_indices_with_int64_masks() -> None:
    slices = _slices(10)
    data = place(slices, torch.device("cpu"), budget_bytes=0)
    assert data.resident  # the CPU is its own device: nothing to copy
    index = torch.tensor([7, 2, 2, 9])
    images, masks = data.batch(index)
    assert torch.equal(images, slices.images[index]) and masks.dtype == torch.int64
    assert torch.equal(masks, slices.masks[index])


def test_predict_pads_the_last_batch_to_one_shape() -> None:
    model = torch.nn.Conv2d(1, 4, 3, padding=1)
    seen = []
    model.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[0]))
    slices = _slices(10)
    cpu = torch.device("cpu")
    labels = predict(model, place(slices, cpu, 0), cpu, batch_size=4)
    assert seen == [4, 4, 4] and labels.shape == (10, 8, 8) and labels.dtype == torch.uint8
    with torch.no_grad():
        expected = model(slices.images).argmax(dim=1)
    assert torch.equal(labels.long(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_over_budget_sets_stay_pinned_on_the_host_and_batch_the_same() -> None:
    cuda = torch.device("cuda")
    train, val = _slices(12), _slices(6)
    size = train.images.nbytes + train.masks.to(torch.uint8).nbytes
    train_on, val_on = place_splits(train, val, cuda, budget_gb=(size + 1) / 2**30)
    assert train_on.resident and not val_on.resident  # the budget holds the training set
    assert val_on.images.is_pinned()
    for start in range(0, 6, 2):  # the two staging buffers take turns
        index = torch.arange(start, start + 2)
        images, masks = val_on.batch(index)
        assert images.device.type == "cuda"
        assert torch.equal(images.cpu(), val.images[index])
        assert torch.equal(masks.cpu(), val.masks[index])
