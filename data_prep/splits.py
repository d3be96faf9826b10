"""Patient-level splits: a patient belongs to exactly one of train, val and test."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

SPLITS = ("train", "val", "test")
UNLABELED = "unlabeled"  # cases without labels: pretraining material only


def acdc_reference_split(patient_number: int) -> str:
    """The reference study's ACDC split: test 1, 11, ..., 91; val 2, 12, ..., 92; train the rest.

    Applied to any numbering (the phantom's too), it holds out one patient in ten for
    test and one in ten for validation.
    """
    remainder = patient_number % 10
    if remainder == 1:
        return "test"
    if remainder == 2:
        return "val"
    return "train"


def assign_splits(patients: Iterable[tuple[str, int]]) -> dict[str, list[str]]:
    """Map split name -> patient names, from (name, number) pairs."""
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for name, number in patients:
        splits[acdc_reference_split(number)].append(name)
    return splits


def check_disjoint(splits: dict[str, list[str]]) -> None:
    seen: dict[str, str] = {}
    for split, names in splits.items():
        for name in names:
            if name in seen:
                raise ValueError(f"patient {name} is in both {seen[name]} and {split} splits")
            seen[name] = split


def random_split(names: list[str], val_fraction: float, test_fraction: float,
                 seed: int) -> dict[str, list[str]]:
    """Seeded split of patient names; at least one patient in each non-empty fraction."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"split fractions val={val_fraction}, test={test_fraction} must be "
                         ">= 0 and sum to less than 1")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    n_test = max(1, round(test_fraction * len(names))) if test_fraction > 0 else 0
    n_val = max(1, round(val_fraction * len(names))) if val_fraction > 0 else 0
    if n_test + n_val >= len(names):
        raise ValueError(f"{len(names)} patients are too few for val={val_fraction}, "
                         f"test={test_fraction} with a non-empty training split")
    return {"train": sorted(order[n_test + n_val:]), "val": sorted(order[n_test:n_test + n_val]),
            "test": sorted(order[:n_test])}
