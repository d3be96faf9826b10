"""Dataset sources: what ``prepare`` needs from any raw layout, behind one small protocol."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from data_prep import acdc
from data_prep.volume import Volume


@dataclass(frozen=True)
class SourcePatient:
    """One patient (or case): the unit that splits are made of."""

    name: str
    number: int | None = None  # trailing id, for id-based splits such as ACDC's
    labeled: bool = True  # False: only unlabeled volumes (pretraining material)
    meta: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


class DatasetSource(Protocol):
    """A raw dataset layout. Sources are pickled into ``prepare``'s worker processes, so
    they hold plain data only; discovery happens in ``__init__``, pixel reads in the
    volume methods. With ``skip_bad``, discovery problems go to ``problems`` (recorded in
    the manifest) instead of raising."""

    format: str
    modality: str
    classes: dict[int, str]
    problems: list[str]

    def patients(self) -> list[SourcePatient]: ...

    def labeled_volumes(self, patient: SourcePatient) -> Iterator[Volume]: ...

    def pretrain_volumes(self, patient: SourcePatient) -> Iterator[Volume]: ...


class AcdcSource:
    """ACDC: labeled ED/ES frames; pretraining from the cine (or the labeled frames)."""

    format = "acdc"
    modality = "MR"
    classes = acdc.ACDC_CLASSES

    def __init__(self, root: str, pretrain_frames: str = "cine", frame_stride: int = 1,
                 skip_bad: bool = False):
        self.problems: list[str] = []
        found = acdc.discover_patients(root, self.problems if skip_bad else None)
        self._patients = {p.name: p for p in found}
        self.pretrain_frames = pretrain_frames
        self.frame_stride = frame_stride

    def patients(self) -> list[SourcePatient]:
        return [SourcePatient(p.name, p.number, meta={"group": p.group})
                for p in self._patients.values()]

    def labeled_volumes(self, patient: SourcePatient) -> Iterator[Volume]:
        return acdc.load_labeled_frames(self._patients[patient.name])

    def pretrain_volumes(self, patient: SourcePatient) -> Iterator[Volume]:
        raw = self._patients[patient.name]
        if self.pretrain_frames == "labeled":
            return acdc.load_labeled_frames(raw)
        return acdc.load_cine_frames(raw, stride=self.frame_stride)
