"""One anatomical orientation for every source.

The same phantom anatomy is written as NIfTI files in several voxel orders (RAS, LPS,
LAS, permuted axes), as DICOM series with SEGs in several orientations (file names
shuffled) and as an oblique NIfTI; every one must prepare to byte-identical slices and
masks. The expected layout comes from nibabel (tests/anatomy.py), not from medssl.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from data_prep.acdc import discover_patients
from data_prep.manifest import MANIFEST_NAME, Manifest
from data_prep.orientation import Slicing, orient_volume
from data_prep.prepare import PrepareConfig, prepare_dataset
from data_prep.shard_reader import iterate_shards, shard_paths
from data_prep.verify import verify_dataset
from data_prep.volume import Volume
from data_prep.zarr_store import LabeledSlices
from tests.anatomy import axial_layout
from tests.test_dicom import write_seg

CASES = 3
VOLUMES = 5  # 3 labeled volumes, plus pretraining volumes of the 2 training cases
LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}


# -- the display convention, on a volume with one marked corner ----------------------------
def _marked_volume(affine: np.ndarray) -> Volume:
    """A RAS-stored 4 x 5 x 6 volume, marked at its left-anterior-superior corner."""
    image = np.zeros((4, 5, 6), np.int16)
    image[0, 4, 5] = 7  # x: towards R, so index 0 is the patient's left; y 4 anterior
    return Volume("p", 0, image, (1.0, 2.0, 3.0), Path("p.nii"), mask=image > 0,
                  affine=affine)


@pytest.mark.parametrize(("plane", "shape", "marker", "spacing"), [
    # axial: anterior up (row 0), patient's left on the right, slices towards superior
    ("axial", (5, 4, 6), (0, 3, 5), (2.0, 1.0, 3.0)),
    # coronal: superior up, patient's left on the right, slices towards anterior
    ("coronal", (6, 4, 5), (0, 3, 4), (3.0, 1.0, 2.0)),
    # sagittal: superior up, anterior on the left, slices towards the patient's right
    ("sagittal", (6, 5, 4), (0, 0, 0), (3.0, 2.0, 1.0)),
])
def test_display_convention(plane: str, shape: tuple[int, ...], marker: tuple[int, ...],
                            spacing: tuple[float, ...]) -> None:
    ras = np.diag([1.0, 2.0, 3.0, 1.0])
    oriented = orient_volume(_marked_volume(ras), Slicing(plane=plane))
    image, mask = oriented.volume.image, oriented.volume.mask
    assert image.shape == shape and oriented.volume.spacing == spacing
    assert tuple(np.argwhere(image == 7)[0]) == marker
    assert mask is not None and tuple(np.argwhere(mask)[0]) == marker
    assert oriented.source_axes == "RAS" and oriented.plane == plane
    assert oriented.note is None and oriented.oblique_degrees == 0.0


def test_acquired_plane_follows_the_stored_stack() -> None:
    """Stored axis 2 running anterior: the acquired plane is coronal, laid out as such."""
    stored_coronal = np.array([[1.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])
    volume = _marked_volume(stored_coronal)  # x -> R, y -> S, z -> A
    oriented = orient_volume(volume, Slicing(plane="acquired"))
    assert oriented.plane == "coronal" and oriented.source_axes == "RSA"
    assert oriented.volume.image.shape == (5, 4, 6)  # (S rows, L columns, A slices)
    assert tuple(np.argwhere(oriented.volume.image == 7)[0]) == (0, 3, 5)


# -- whole preparations: NIfTI in several voxel orders, DICOM in several orientations ---------
def _reordered(image: nib.Nifti1Image, codes: str) -> nib.Nifti1Image:
    """The same anatomy stored in the voxel order ``codes`` (e.g. "LPS", "SRA")."""
    transform = ornt_transform(io_orientation(image.affine), axcodes2ornt(tuple(codes)))
    data = apply_orientation(np.asanyarray(image.dataobj), transform)
    affine = image.affine @ inv_ornt_aff(transform, image.shape)
    return nib.Nifti1Image(np.ascontiguousarray(data), affine)


def _rotated(image: nib.Nifti1Image, degrees: float) -> nib.Nifti1Image:
    """The same voxels with an affine turned by ``degrees`` about the superior axis."""
    angle = np.radians(degrees)
    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return nib.Nifti1Image(np.asanyarray(image.dataobj), turn @ image.affine)


@pytest.fixture(scope="module")
def anatomy(phantom_root: Path) -> list[tuple[str, nib.Nifti1Image, nib.Nifti1Image]]:
    """Three phantom ED frames with their labels, stored RAS with a real origin."""
    cases = []
    for patient in discover_patients(phantom_root)[:CASES]:
        image = nib.load(str(patient.frame_path(patient.ed_frame)))
        label = nib.load(str(patient.frame_path(patient.ed_frame, label=True)))
        affine = image.affine.copy()
        affine[:3, 3] = [-30.0, 12.5, 40.0]
        cases.append((f"heart_{patient.number:03d}",
                      nib.Nifti1Image(np.asanyarray(image.dataobj), affine),
                      nib.Nifti1Image(np.asanyarray(label.dataobj).astype(np.uint8), affine)))
    return cases


def _write_nnunet(root: Path, cases, variant) -> Path:
    for case, image, label in cases:
        for folder, name, volume in (("imagesTr", f"{case}_0000", image),
                                     ("labelsTr", case, label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(variant(volume), str(root / folder / f"{name}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "cineMRI"}, "labels": LABELS, "numTraining": len(cases),
        "file_ending": ".nii.gz"}))
    return root


def _write_dicom(root: Path, cases, codes: str) -> Path:
    """Each case as an MR series stored in voxel order ``codes`` (x = column index, y =
    row index, slice), under shuffled file names, with its labels as a DICOM SEG."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    for number, (case, image, label) in enumerate(cases):
        stored, labels = _reordered(image, codes), _reordered(label, codes)
        data = np.asanyarray(stored.dataobj)
        affine = lps @ stored.affine  # DICOM's patient frame is LPS
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        names = [f"IM{k:04d}.dcm" for k in range(data.shape[2])]
        random.Random(number).shuffle(names)
        series_uid, sources = generate_uid(), []
        folder = root / case / "mr"
        folder.mkdir(parents=True)
        for k in range(data.shape[2]):
            ds = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False))
            ds.PatientID, ds.SeriesInstanceUID, ds.SeriesNumber = case, series_uid, 4
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            ds.ImageOrientationPatient = [*(affine[:3, 0] / spacing[0]),
                                          *(affine[:3, 1] / spacing[1])]
            ds.ImagePositionPatient = [float(v) for v in (affine @ [0, 0, k, 1])[:3]]
            ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
            ds.SliceThickness = float(spacing[2])
            pixels = np.ascontiguousarray(data[:, :, k].T)  # (rows = y, columns = x)
            ds.Rows, ds.Columns = pixels.shape
            ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 16, 15
            ds.PixelData = pixels.astype(np.uint16).tobytes()
            ds.save_as(folder / names[k], enforce_file_format=True)
            sources.append(ds)
        masks = np.asanyarray(labels.dataobj).transpose(2, 1, 0)  # (slice, row, column)
        present = {v: n for n, v in LABELS.items() if v and (masks == v).any()}
        write_seg(root / case / "seg.dcm", sources, masks, names=present)
    return root


def _prepare(source: Path, out: Path, fmt: str, **options: object) -> Manifest:
    return prepare_dataset(PrepareConfig(
        source=str(source), out=str(out), format=fmt, name="heart", modality="MR",
        image_size=64, val_fraction=0.34, test_fraction=0.0, min_shards=1, workers=1,
        **options), progress=False)  # type: ignore[arg-type]


def _contents(out: Path) -> dict[str, bytes]:
    """Every prepared slice and mask, as bytes, by split and position or shard key."""
    found = {}
    for split in ("train", "val"):
        store = LabeledSlices(out / "labeled.zarr", split)
        for index in range(len(store)):
            image, mask = store.raw(index)
            key = f"{split}/{store.patient_of(index)}/{int(store.slices[index])}"
            found[key] = image.tobytes() + b"|" + mask.tobytes() + str(image.dtype).encode()
    for sample in iterate_shards(shard_paths(out)):
        key = f"shard/{sample.meta['patient']}/{sample.meta['slice']}"
        found[key] = sample.raw.tobytes() + (b"" if sample.mask is None
                                            else b"|" + sample.mask.tobytes())
    return found


@pytest.fixture(scope="module")
def reference(anatomy, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The RAS-stored NIfTI dataset, prepared: what every other source must equal."""
    work = tmp_path_factory.mktemp("ras")
    root = _write_nnunet(work / "raw", anatomy, lambda volume: volume)
    out = work / "prepared"
    manifest = _prepare(root, out, "nnunet")
    assert manifest.orientation["frame"] == "RAS+" and manifest.orientation["plane"] == "axial"
    assert manifest.orientation["source_axes"] == {"RAS": VOLUMES}
    return out, _contents(out)


def test_reference_slices_follow_the_display_convention(reference, anatomy) -> None:
    out, _ = reference
    by_case = {case: (axial_layout(image), axial_layout(label))
               for case, image, label in anatomy}
    store = LabeledSlices(out / "labeled.zarr", "train")
    assert len(store) > 0
    for index in range(len(store)):
        image, mask = store.raw(index)
        expected_image, expected_mask = by_case[store.patient_of(index)]
        z = int(store.slices[index])
        np.testing.assert_array_equal(image, expected_image[:, :, z])
        np.testing.assert_array_equal(mask, expected_mask[:, :, z])
    manifest = Manifest.read(out)
    assert "anterior up" in manifest.orientation["display"]
    assert (manifest.orientation["rows"], manifest.orientation["columns"]) == ("P", "L")


@pytest.mark.parametrize("codes", ["LPS", "LAS", "SRA", "AIL"])
def test_nifti_in_any_voxel_order_prepares_identically(codes: str, reference, anatomy,
                                                       tmp_path: Path) -> None:
    root = _write_nnunet(tmp_path / "raw", anatomy, lambda v: _reordered(v, codes))
    manifest = _prepare(root, tmp_path / "prepared", "nnunet")
    assert manifest.orientation["source_axes"] == {codes: VOLUMES}
    assert manifest.warnings == [] and manifest.orientation["oblique"]["volumes"] == 0
    assert _contents(tmp_path / "prepared") == reference[1]
    assert manifest.spacing_stats == Manifest.read(reference[0]).spacing_stats


# axial, axial with flipped rows and columns, coronal, sagittal
@pytest.mark.parametrize("codes", ["LPS", "RAI", "LSA", "PSR"])
def test_dicom_series_with_seg_in_any_orientation_prepares_identically(
        codes: str, reference, anatomy, tmp_path: Path) -> None:
    """Shuffled file names, LPS patient frame, SEG frames placed by position: the slices
    and masks equal the NIfTI reference byte for byte."""
    root = _write_dicom(tmp_path / "raw", anatomy, codes)
    manifest = _prepare(root, tmp_path / "prepared", "dicom")
    # the reader stacks slices along row x column (RAI is read as RAS), the rest is stored
    [(axes, count)] = manifest.orientation["source_axes"].items()
    assert axes[:2] == codes[:2] and count == VOLUMES
    assert _contents(tmp_path / "prepared") == reference[1]
    assert verify_dataset(tmp_path / "prepared") == []


def test_oblique_volume_is_sliced_along_its_closest_axes_with_a_warning(
        reference, anatomy, tmp_path: Path) -> None:
    root = _write_nnunet(tmp_path / "raw", anatomy, lambda v: _rotated(v, 20.0))
    manifest = _prepare(root, tmp_path / "prepared", "nnunet")
    assert manifest.orientation["oblique"] == {"volumes": VOLUMES, "max_degrees": 20.0}
    problems = [w["problem"] for w in manifest.warnings]
    assert len(problems) == CASES  # one per image file; labels share their image's grid
    assert all("oblique volume, 20.0 degrees off the closest RAS+ axes" in p
               for p in problems)
    assert _contents(tmp_path / "prepared") == reference[1]  # closest axes: unchanged


def test_as_stored_keeps_the_voxel_order_and_slice_axis(anatomy, tmp_path: Path) -> None:
    root = _write_nnunet(tmp_path / "raw", anatomy, lambda v: _reordered(v, "SRA"))
    manifest = _prepare(root, tmp_path / "prepared", "nnunet", orientation="as_stored",
                        slice_axis=0)
    assert manifest.orientation["frame"] == "as_stored"
    assert manifest.orientation["slice_axis"] == 0
    store = LabeledSlices(tmp_path / "prepared" / "labeled.zarr", "train")
    for index in range(len(store)):
        case = store.patient_of(index)
        stored = np.asanyarray(nib.load(str(root / "imagesTr" / f"{case}_0000.nii.gz")).dataobj)
        np.testing.assert_array_equal(store.raw(index)[0], stored[int(store.slices[index])])
    with pytest.raises(ValueError, match="slice_axis is a raw array axis and needs "
                                         "orientation=as_stored"):
        PrepareConfig(slice_axis=0)
    with pytest.raises(ValueError, match="slice_plane=coronal needs orientation=ras"):
        PrepareConfig(orientation="as_stored", slice_plane="coronal")


def test_a_file_without_orientation_is_sliced_as_stored_with_a_warning(
        anatomy, tmp_path: Path) -> None:
    def unoriented(volume: nib.Nifti1Image) -> nib.Nifti1Image:
        image = nib.Nifti1Image(np.asanyarray(volume.dataobj), volume.affine)
        image.set_sform(None, code=0)
        image.set_qform(None, code=0)
        return image

    root = _write_nnunet(tmp_path / "raw", anatomy, unoriented)
    manifest = _prepare(root, tmp_path / "prepared", "nnunet")
    assert manifest.orientation["source_axes"] == {"unknown": VOLUMES}
    assert len(manifest.warnings) == CASES
    assert all("no orientation in the file" in w["problem"] for w in manifest.warnings)


def test_a_label_stored_in_another_voxel_order_is_refused(anatomy, tmp_path: Path) -> None:
    root = _write_nnunet(tmp_path / "raw", anatomy, lambda v: v)
    case, _, label = anatomy[0]
    nib.save(_reordered(label, "LPS"), str(root / "labelsTr" / f"{case}.nii.gz"))
    with pytest.raises(ValueError, match=f"{case}.nii.gz: voxel axes LPS differ from RAS"):
        _prepare(root, tmp_path / "prepared", "nnunet")


def test_a_dataset_prepared_before_orientation_records_still_reads(prepared: Path,
                                                                   tmp_path: Path) -> None:
    data = json.loads((prepared / MANIFEST_NAME).read_text())
    del data["orientation"]
    data["format_version"] = 2
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    old = Manifest.read(tmp_path)
    assert old.orientation["frame"] == "as_stored" and old.orientation["recorded"] is False
    assert old.splits == Manifest.read(prepared).splits
    data["format_version"] = 1
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format_version 1 is not supported"):
        Manifest.read(tmp_path)


def test_oblique_short_axis_stacks_keep_their_acquired_slices(phantom_root: Path,
                                                              tmp_path: Path) -> None:
    """ACDC (slice_plane=auto: acquired): a stack tilted 60 degrees about the R axis is
    closest to coronal; its stored slices are kept whole, laid out as coronal ones."""
    angle = np.radians(60.0)
    tilt = np.eye(4)
    tilt[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    root = tmp_path / "acdc"
    for number in (1, 2, 3):
        source = phantom_root / "training" / f"patient{number:03d}"
        target = root / "training" / source.name
        target.mkdir(parents=True)
        (target / "Info.cfg").write_bytes((source / "Info.cfg").read_bytes())
        for path in source.glob("*.nii.gz"):
            image = nib.load(str(path))
            nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), tilt @ image.affine),
                     str(target / path.name))
    manifest = prepare_dataset(PrepareConfig(
        source=str(root), out=str(tmp_path / "prepared"), image_size=64, min_shards=1,
        workers=1), progress=False)
    assert manifest.orientation["plane"] == "acquired"
    assert set(manifest.orientation["planes"]) == {"coronal"}
    assert manifest.orientation["oblique"]["max_degrees"] == 30.0  # 60 off S is 30 off A
    assert all("its acquired slices are kept and laid out as coronal ones" in w["problem"]
               for w in manifest.warnings) and manifest.warnings
    # stored x runs R, y closest to S, z closest to P: coronal rows run I (y reversed),
    # columns L (x reversed), slices A (z reversed)
    patients = {p.name: p for p in discover_patients(root)}
    for split in ("train", "val", "test"):
        store = LabeledSlices(tmp_path / "prepared" / "labeled.zarr", split)
        for index in range(len(store)):
            patient = patients[store.patient_of(index)]
            stored = np.asanyarray(nib.load(str(patient.frame_path(
                int(store.frames[index])))).dataobj)
            k = stored.shape[2] - 1 - int(store.slices[index])
            np.testing.assert_array_equal(store.raw(index)[0], stored[::-1, ::-1, k].T)
