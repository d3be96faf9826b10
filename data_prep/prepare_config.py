"""What ``prepare`` is asked to do: one dataclass, light to import (worker processes
unpickle it without loading the shard and zarr writers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data_prep.orientation import AS_STORED, RAS, Slicing
from data_prep.splits import SPLITS, UNLABELED


@dataclass
class PrepareConfig:
    source: str = ""
    out: str = ""
    format: Literal["acdc", "nnunet", "dicom", "images", "natural"] = "acdc"
    name: str = "acdc"
    modality: str = ""  # default: what the source declares
    image_size: int = 256
    modality_filter: str = ""  # DICOM: keep only series of this modality (e.g. "CT")
    channel: int = 0  # nnU-Net/MSD: which input channel
    # 3D volumes (acdc, nnunet, dicom) are permuted/flipped to RAS+ and sliced in a named
    # plane (data_prep/orientation.py holds the display convention); "auto": acquired for
    # ACDC (cardiac short-axis stacks), axial otherwise. orientation=as_stored keeps the
    # stored voxel order and slices along the raw array axis slice_axis (default 2).
    orientation: Literal["ras", "as_stored"] = "ras"
    slice_plane: Literal["auto", "axial", "coronal", "sagittal", "acquired"] = "auto"
    slice_axis: int | None = None
    # 2D image folders (format "images"): patient id from a regex group on the relative
    # path (default: one patient per file), declared classes (default 0 background,
    # 1 foreground), stored mask value -> class id (e.g. {255: 1}), pixel spacing (mm).
    patient_pattern: str | None = None
    classes: dict[int, str] | None = None
    mask_values: dict[int, int] | None = None
    pixel_spacing: tuple[float, float] = (1.0, 1.0)
    to_gray: bool = False  # convert colour images to luma instead of refusing them
    # Natural images (format "natural"): 1 (luma) or 3 (RGB) channels, files per work unit.
    channels: int = 1
    chunk_size: int = 256
    # In-plane resampling to this spacing (mm, x then y) before resizing; None keeps it.
    target_spacing: tuple[float, float] | None = None
    # How slices reach image_size: "pad_crop" (lossless), "fit" (scale the longer side,
    # pad), "fill" (scale the shorter side, centre-crop); "auto": fill for natural
    # images, pad_crop otherwise.
    resize: Literal["auto", "pad_crop", "fit", "fill"] = "auto"
    normalization: Literal["zscore", "fixed", "ct_window", "percentile"] = "zscore"
    fixed_mean: float = 67.27  # the reference study's ACDC statistics
    fixed_std: float = 84.66
    ct_window: tuple[float, float] = (-160.0, 240.0)  # HU, soft-tissue window
    percentiles: tuple[float, float] = (0.5, 99.5)
    # "auto": ACDC's id rule for ACDC, a seeded random split by patient otherwise.
    split: Literal["auto", "acdc", "random"] = "auto"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    pretrain_frames: Literal["cine", "labeled"] = "cine"
    cine_frame_stride: int = 1
    # Evaluation patients stay out of pretraining shards unless asked for; "unlabeled"
    # covers cases without labels (e.g. nnU-Net imagesTs).
    pretrain_splits: list[str] = field(default_factory=lambda: ["train", "unlabeled"])
    shard_max_bytes: int = 64 * 2**20
    min_shards: int = 8
    workers: int = 0  # processes converting patients in parallel; 0 = one per CPU core
    # Turn bad-input errors into warnings recorded in the manifest (the patient is left out).
    skip_bad: bool = False

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if self.cine_frame_stride < 1:
            raise ValueError(f"cine_frame_stride must be >= 1, got {self.cine_frame_stride}")
        unknown = sorted(set(self.pretrain_splits) - {*SPLITS, UNLABELED})
        if unknown:
            raise ValueError(f"pretrain_splits: unknown split {unknown[0]!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.target_spacing is not None and min(self.target_spacing) <= 0:
            raise ValueError(f"target_spacing must be positive, got {self.target_spacing}")
        if self.slice_axis is not None and self.slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {self.slice_axis}")
        if self.orientation == "ras" and self.slice_axis is not None:
            raise ValueError("slice_axis is a raw array axis and needs orientation=as_stored; "
                             "with orientation=ras choose slice_plane=axial|coronal|sagittal|"
                             "acquired")
        if self.orientation == "as_stored" and self.slice_plane != "auto":
            raise ValueError(f"slice_plane={self.slice_plane} needs orientation=ras (with "
                             "orientation=as_stored, slice_axis picks the raw array axis)")

    def slicing(self) -> Slicing:
        """How volumes become slices, with ``auto`` resolved for the format."""
        if self.orientation == "as_stored":
            return Slicing(AS_STORED, "", 2 if self.slice_axis is None else self.slice_axis)
        plane = self.slice_plane
        if plane == "auto":
            plane = "acquired" if self.format == "acdc" else "axial"
        return Slicing(RAS, plane)

    @property
    def volumetric(self) -> bool:
        """3D medical volumes, which are reoriented before slicing (not 2D image folders)."""
        return self.format in ("acdc", "nnunet", "dicom")
