"""Label budgets: nested random subsets of the annotated training slices."""

from __future__ import annotations

import numpy as np


def nested_subset(n_available: int, budget: int, seed: int) -> np.ndarray:
    """Indices of ``budget`` training slices for ``seed`` (sorted).

    For one seed, subsets are prefixes of the same permutation, so the 30-slice subset
    contains the 15-slice one and curves across budgets compare like with like.
    ``budget == 0`` means all slices.
    """
    if budget > n_available:
        raise ValueError(f"label budget {budget} exceeds the {n_available} annotated slices "
                         "of the training split")
    if budget == 0:
        return np.arange(n_available)
    order = np.random.default_rng(np.random.SeedSequence([seed, 0xB0D6E7])).permutation(
        n_available)
    return np.sort(order[:budget])


def epoch_indices(subset: np.ndarray, epoch_samples: int, rng: np.random.Generator) -> np.ndarray:
    """One epoch's sample order: the subset shuffled, tiled to ``epoch_samples`` if larger."""
    count = max(epoch_samples, len(subset))
    repeats = -(-count // len(subset))
    order = np.concatenate([rng.permutation(subset) for _ in range(repeats)])
    return order[:count]
