"""Patient-level splits: a patient belongs to exactly one of train, val and test."""

from __future__ import annotations

from collections.abc import Iterable

SPLITS = ("train", "val", "test")


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
