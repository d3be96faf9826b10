"""Epochs over a label subset: their length, and the order their samples come in.

Small budgets are oversampled (tiled) up to ``epoch_samples`` so that every budget of a
sweep trains for the same number of steps (``data_prep.label_budgets`` picks the subsets).
"""

from __future__ import annotations

import numpy as np


def finetune_epoch_samples(subset_size: int, epoch_samples: int) -> int:
    """Samples in one epoch: ``epoch_samples`` when the subset is smaller (oversampling),
    otherwise the subset itself, so that every selected slice is seen each epoch.

    ``epoch_samples == 0`` turns oversampling off. With ``epoch_samples`` at least the
    largest budget of a sweep (the reference study: the whole training split), every
    budget trains for the same number of steps per epoch.
    """
    if subset_size < 1:
        raise ValueError("an empty label subset has no epochs")
    return max(epoch_samples, subset_size)


def epoch_indices(subset: np.ndarray, epoch_samples: int, rng: np.random.Generator) -> np.ndarray:
    """One epoch's sample order: ``subset`` shuffled, tiled to ``finetune_epoch_samples``.

    Tiling whole permutations (rather than drawing with replacement) keeps every slice's
    count within one of every other's, so an oversampled small budget is not skewed.
    """
    count = finetune_epoch_samples(len(subset), epoch_samples)
    repeats = -(-count // len(subset))
    order = np.concatenate([rng.permutation(subset) for _ in range(repeats)])
    return order[:count]
