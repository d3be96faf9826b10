"""Label budgets: nested random subsets of the annotated training split.

A budget counts annotated training slices (the reference study: 1, 3, 7, 15, 30, 75,
150, 300, 749, 1498) or annotated patients (every labeled slice of each chosen patient).
For one seed the subsets are nested -- the 30-slice subset contains the 15-slice one, the
4-patient subset the 2-patient one -- because each is a prefix of one seeded permutation,
so curves across budgets compare like with like. Subsets index the training split only;
the prepared store keeps splits apart by patient, so no validation or test patient can
enter a budget. Fine-tuning trains on these subsets; the pretraining probe uses one too.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

BudgetUnit = Literal["slices", "patients"]
BUDGET_UNITS: tuple[BudgetUnit, ...] = ("slices", "patients")
REFERENCE_SLICE_BUDGETS = (1, 3, 7, 15, 30, 75, 150, 300, 749, 1498)

# Distinct stream salts: a slice budget and a patient budget of the same seed must not
# share one permutation (their index spaces differ).
_SALT = {"slices": 0xB0D6E7, "patients": 0x9A7E27}


def budget_subset(patients: np.ndarray, budget: int, unit: BudgetUnit, seed: int,
                  split: str = "train") -> np.ndarray:
    """Sorted indices of the ``split`` slices that a ``budget`` of ``unit`` picks for ``seed``.

    ``patients`` holds each slice's patient (any hashable-to-numpy values: names or ids).
    ``budget == 0`` means the whole split.
    """
    if unit == "slices":
        return nested_subset(len(patients), budget, seed, split)
    if unit == "patients":
        return nested_patient_subset(patients, budget, seed, split)
    raise ValueError(f"budget_unit must be one of {', '.join(BUDGET_UNITS)}, got {unit!r}")


def nested_subset(n_available: int, budget: int, seed: int, split: str = "train") -> np.ndarray:
    """Sorted indices of ``budget`` of the ``n_available`` slices of ``split`` for ``seed``."""
    _check_budget(budget, n_available, "slices", split)
    if budget == 0:
        return np.arange(n_available)
    return np.sort(_permutation(n_available, seed, "slices")[:budget])


def nested_patient_subset(patients: np.ndarray, budget: int, seed: int,
                          split: str = "train") -> np.ndarray:
    """Sorted indices of every slice of ``budget`` patients of ``split`` chosen for ``seed``.

    Patients are permuted in sorted-name order, so the choice depends on who is in the
    split, not on the order their slices were stored in.
    """
    patients = np.asarray(patients)
    names = np.unique(patients)  # sorted
    _check_budget(budget, len(names), "patients", split)
    if budget == 0:
        return np.arange(len(patients))
    chosen = names[_permutation(len(names), seed, "patients")[:budget]]
    return np.flatnonzero(np.isin(patients, chosen))


def _permutation(n: int, seed: int, unit: BudgetUnit) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, _SALT[unit]])).permutation(n)


def _check_budget(budget: int, available: int, unit: BudgetUnit, split: str) -> None:
    if budget < 0:
        raise ValueError(f"label budget must be >= 0 {unit} (0 = the whole split), got {budget}")
    if budget > available:
        raise ValueError(f"label budget of {budget} {unit} exceeds the {split!r} split, which "
                         f"has {available} annotated {unit}")
