"""Reader for nnU-Net v2 raw datasets and Medical Segmentation Decathlon (MSD) folders.

nnU-Net v2::

    ROOT/dataset.json        {"channel_names": {"0": "MRI"}, "labels": {"background": 0, ...},
                              "file_ending": ".nii.gz", ...}
    ROOT/imagesTr/CASE_0000.nii.gz     channel 0 of a training case (CASE_0001 ... more)
    ROOT/labelsTr/CASE.nii.gz          its labels
    ROOT/imagesTs/CASE_0000.nii.gz     unlabeled cases (used for pretraining only)

MSD: ``dataset.json`` with ``modality``, ``labels`` (id -> name) and ``training`` /
``test`` lists; 4D images hold the channels in their last axis.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_prep.errors import DataError
from data_prep.nifti import (
    check_labels,
    load_nifti,
    voxel_spacing,
)
from data_prep.sources import SourcePatient
from data_prep.volume import Volume

_TRAILING_NUMBER = re.compile(r"(\d+)$")


class NnunetSource:
    format = "nnunet"

    def __init__(self, root: str, channel: int = 0, skip_bad: bool = False) -> None:
        self.root = Path(root)
        self.problems: list[str] = []
        self._skip_bad = skip_bad
        self.channel = channel
        spec_path = self.root / "dataset.json"
        if not spec_path.is_file():
            raise DataError(f"{spec_path}: dataset.json is missing (expected an nnU-Net v2 or "
                            "MSD dataset folder)")
        try:
            spec = json.loads(spec_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{spec_path}: not valid JSON ({exc})") from None
        self._spec_path = spec_path
        self._msd = "training" in spec and "modality" in spec
        self.classes = self._read_labels(spec)
        self.modality = self._read_modality(spec)
        self._cases = self._find_cases(spec)
        if not self._cases:
            raise DataError(f"{self.root}: no cases found in imagesTr/ or imagesTs/")

    # -- dataset.json ------------------------------------------------------------------
    def _read_labels(self, spec: dict) -> dict[int, str]:
        labels = spec.get("labels")
        if not isinstance(labels, dict) or not labels:
            raise DataError(f"{self._spec_path}: 'labels' must be a non-empty mapping")
        try:
            if self._msd:  # id (as text) -> name
                classes = {int(k): str(v) for k, v in labels.items()}
            else:  # name -> id; region lists (nnU-Net's region training) are not classes
                classes = {int(v): str(k) for k, v in labels.items()}
        except (TypeError, ValueError):
            raise DataError(f"{self._spec_path}: 'labels' must map names to integer ids, "
                            f"got {labels}") from None
        if sorted(classes) != list(range(len(classes))):
            raise DataError(f"{self._spec_path}: label ids must be 0..{len(classes) - 1}, "
                            f"got {sorted(classes)}")
        return classes

    def _read_modality(self, spec: dict) -> str:
        channels = spec.get("modality" if self._msd else "channel_names")
        if not isinstance(channels, dict) or str(self.channel) not in channels:
            raise DataError(f"{self._spec_path}: no channel {self.channel} in "
                            f"{'modality' if self._msd else 'channel_names'} ({channels})")
        return str(channels[str(self.channel)])

    def _find_cases(self, spec: dict) -> dict[str, tuple[Path, Path | None]]:
        cases: dict[str, tuple[Path, Path | None]] = {}
        if self._msd:
            for entry in spec.get("training", []):
                image = self.root / entry["image"]
                cases[_msd_case(image)] = (image, self.root / entry["label"])
            for entry in spec.get("test", []):
                image = self.root / (entry if isinstance(entry, str) else entry["image"])
                cases.setdefault(_msd_case(image), (image, None))
            return cases
        ending = spec.get("file_ending", ".nii.gz")
        if ending != ".nii.gz" and ending != ".nii":
            raise DataError(f"{self._spec_path}: file_ending {ending!r} is not supported "
                            "(NIfTI only)")
        suffix = f"_{self.channel:04d}{ending}"
        for folder, labeled in (("imagesTr", True), ("imagesTs", False)):
            for image in sorted((self.root / folder).glob(f"*{suffix}")):
                case = image.name[: -len(suffix)]
                label = self.root / "labelsTr" / f"{case}{ending}" if labeled else None
                if label is not None and not label.is_file():
                    problem = f"{label}: label file for {image.name} is missing"
                    if not self._skip_bad:
                        raise DataError(problem)
                    self.problems.append(problem)
                    continue
                cases.setdefault(case, (image, label))
        return cases

    # -- DatasetSource -----------------------------------------------------------------
    def patients(self) -> list[SourcePatient]:
        result = []
        for case, (_, label) in sorted(self._cases.items()):
            match = _TRAILING_NUMBER.search(case)
            result.append(SourcePatient(case, int(match.group(1)) if match else None,
                                        labeled=label is not None))
        return result

    def labeled_volumes(self, patient: SourcePatient) -> Iterator[Volume]:
        image_path, label_path = self._cases[patient.name]
        if label_path is None:
            return
        image, zooms, affine = self._load_image(image_path)
        labels, label_zooms, label_affine = load_nifti(label_path)
        check_labels(label_path, labels, label_zooms, image_path, image.shape, zooms,
                     self.classes, "dataset.json labels", label_affine, affine)
        yield Volume(patient=patient.name, frame=0, image=image,
                     spacing=voxel_spacing(image_path, zooms), affine=affine,
                     source=image_path, mask=labels.astype(np.uint8),
                     files=(image_path, label_path))

    def pretrain_volumes(self, patient: SourcePatient) -> Iterator[Volume]:
        image_path, _ = self._cases[patient.name]
        image, zooms, affine = self._load_image(image_path)
        yield Volume(patient=patient.name, frame=0, image=image,
                     spacing=voxel_spacing(image_path, zooms), affine=affine,
                     source=image_path)

    # -- helpers ---------------------------------------------------------------------------
    def _load_image(self, path: Path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray | None]:
        """The chosen channel as a 3D volume in stored voxel order (reoriented later)."""
        data, zooms, affine = load_nifti(path)
        if data.ndim == 4:  # MSD: channels in the last axis
            if self.channel >= data.shape[3]:
                raise DataError(f"{path}: has {data.shape[3]} channels, channel "
                                f"{self.channel} was asked for")
            data = data[..., self.channel]
        if data.ndim != 3:
            raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}")
        return np.ascontiguousarray(data), zooms, affine


def _msd_case(image: Path) -> str:
    return image.name.removesuffix(".gz").removesuffix(".nii")
