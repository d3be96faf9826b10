"""Barlow Twins' redundancy-reduction loss on the cross-correlation of the two views."""

from __future__ import annotations

import torch

from pretrain.losses.gather import at_least_float32, gather_with_grad


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix as a flat view, without a (dim, dim) mask.

    Dropping the last element of the flattened matrix and reading it ``dim + 1`` at a time
    puts each diagonal entry first in its row; the remaining columns are the rest.
    """
    dim = matrix.shape[0]
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
    return matrix.flatten()[:-1].view(dim - 1, dim + 1)[:, 1:].flatten()


def _standardise(z: torch.Tensor, eps: float) -> torch.Tensor:
    # Biased variance plus eps inside the root: what the paper's BatchNorm1d(affine=False)
    # computes in training mode, and finite for a constant dimension.
    mean = z.mean(dim=0)
    var = z.var(dim=0, unbiased=False)
    return (z - mean) / torch.sqrt(var + eps)


def barlow_twins_loss(
    z1: torch.Tensor, z2: torch.Tensor, lambda_offdiag: float = 5e-3, *, eps: float = 1e-5
) -> torch.Tensor:
    """``sum_i (1 - C_ii)^2 + lambda_offdiag * sum_{i != j} C_ij^2``.

    ``C = z1n^T z2n / N`` is the cross-correlation between the two views' embeddings, each
    dimension standardised over the *global* batch of ``N`` samples (gathered from every
    rank). The statistics must be global: per-rank means and variances, and a per-rank
    ``C``, give a different loss for every GPU count, and small per-rank batches make the
    estimate of ``C`` noisy, which the off-diagonal term then penalises.

    Every rank evaluates the same global value from the gathered tensors, so it returns the
    single-process loss on the concatenated batch, and after DDP's gradient averaging the
    parameter gradients are the single-process ones (see ``gather.py``). Every rank must
    hold the same number of rows.

    Computed in float32 with autocast disabled: ``C`` sums products over the whole batch.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"expected two (batch, dim) tensors of equal shape, got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    with torch.autocast(z1.device.type, enabled=False):
        a = _standardise(gather_with_grad(at_least_float32(z1)), eps)
        b = _standardise(gather_with_grad(at_least_float32(z2)), eps)
        c = a.T @ b / a.shape[0]
        on_diagonal = (1 - torch.diagonal(c)).pow(2).sum()
        return on_diagonal + lambda_offdiag * off_diagonal(c).pow(2).sum()
