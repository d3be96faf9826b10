"""SimCLR's NT-Xent (normalised-temperature cross-entropy, InfoNCE) loss over the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.losses.gather import (
    at_least_float32,
    gather_with_grad,
    global_value_local_gradient,
    rank,
)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent over the ``2N`` views of the global batch; ``z1[i]`` and ``z2[i]`` are positives.

    Every view is contrasted with its positive against all ``2N - 2`` other views of the
    *global* batch (gathered from every rank): negatives are what the method learns from, so
    a rank seeing only its own ``2n`` views would train a different, weaker objective whose
    result depends on the number of GPUs. Similarity is the cosine divided by
    ``temperature``; the loss is the mean over all ``2N`` views.

    Each rank computes only the ``2n x 2N`` logits of its own rows (memory linear, not
    quadratic, in the world size) and returns, through ``global_value_local_gradient``, the
    global mean as its value with gradients scaled so that DDP's averaging yields the
    single-process gradient on the concatenated batch (see ``gather.py``). Every rank must
    hold the same number ``n`` of rows.

    Computed in float32 with autocast disabled: bf16 logits divided by a small temperature
    lose the differences between negatives that the softmax depends on.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"expected two (batch, dim) tensors of equal shape, got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with torch.autocast(z1.device.type, enabled=False):
        q1 = F.normalize(at_least_float32(z1), dim=1)
        q2 = F.normalize(at_least_float32(z2), dim=1)
        keys = torch.cat([gather_with_grad(q1), gather_with_grad(q2)])  # (2N, dim)
        n, n_global = q1.shape[0], keys.shape[0] // 2
        logits = torch.cat([q1, q2]) @ keys.T / temperature  # (2n, 2N)

        # Global column of each local row: first views occupy columns [0, N), second views
        # [N, 2N), and this rank's rows start at rank * n within each half.
        local = torch.arange(n, device=logits.device) + rank() * n
        self_column = torch.cat([local, local + n_global])
        positive_column = torch.cat([local + n_global, local])
        row = torch.arange(2 * n, device=logits.device)
        logits = logits.index_put((row, self_column), logits.new_tensor(float("-inf")))

        local_share = F.cross_entropy(logits, positive_column, reduction="sum") / (2 * n_global)
    return global_value_local_gradient(local_share)
