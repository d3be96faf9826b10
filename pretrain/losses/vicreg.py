"""VICReg's variance-invariance-covariance loss, with statistics over the global batch."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from pretrain.losses.barlow_twins import off_diagonal
from pretrain.losses.gather import at_least_float32, gather_with_grad


class VICRegTerms(NamedTuple):
    """The three unweighted terms, for logging them separately."""

    invariance: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor


def _variance_term(z: torch.Tensor, eps: float) -> torch.Tensor:
    # Hinge on the per-dimension standard deviation (unbiased, as in the paper) with target 1;
    # eps keeps the square root differentiable when a dimension has collapsed.
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(1 - std).mean()


def _covariance_term(z: torch.Tensor) -> torch.Tensor:
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (z.shape[0] - 1)
    return off_diagonal(cov).pow(2).sum() / z.shape[1]


def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-4) -> VICRegTerms:
    """Invariance (mean squared error), variance (mean hinge on std, averaged over the two
    views) and covariance (squared off-diagonal covariances / dim, summed over the views),
    all over the *global* batch gathered from every rank.

    Variance and covariance are batch statistics, so they must see the global batch to mean
    the same thing at every GPU count; the invariance is computed on the gathered tensors
    too, so that every rank evaluates the identical global value and the gradient scaling
    of ``gather.py`` applies to all three terms alike.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"expected two (batch, dim) tensors of equal shape, got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    with torch.autocast(z1.device.type, enabled=False):
        a = gather_with_grad(at_least_float32(z1))
        b = gather_with_grad(at_least_float32(z2))
        if a.shape[0] < 2:
            raise ValueError("VICReg needs at least 2 samples in the global batch "
                             "for its variance and covariance terms")
        return VICRegTerms(
            invariance=F.mse_loss(a, b),
            variance=(_variance_term(a, eps) + _variance_term(b, eps)) / 2,
            covariance=_covariance_term(a) + _covariance_term(b),
        )


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """VICReg: ``sim_weight * invariance + var_weight * variance + cov_weight * covariance``.

    Defaults are the paper's (25, 25, 1, eps 1e-4). Every rank returns the single-process
    loss on the concatenated global batch, and after DDP's gradient averaging the parameter
    gradients are the single-process ones (see ``gather.py``); every rank must hold the same
    number of rows. Computed in float32 with autocast disabled.
    """
    terms = vicreg_terms(z1, z2, eps)
    return (sim_weight * terms.invariance + var_weight * terms.variance
            + cov_weight * terms.covariance)
