"""DicomSource: series discovery, slice order, intensities, SEG masks and bad input.

Everything is built from the small files bundled with pydicom (CT_small, MR_small, the
dicomdirtests tree), copied into multi-slice series with new UIDs and positions, and SEGs
written with highdicom from those series: no downloads.
"""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from data_prep.dicom import DicomSource
from data_prep.errors import DataError

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # normal = row x column = (-1, 0, 0)
PIXEL_SPACING = (0.5, 0.8)  # (between rows, between columns) -> spacing (x=0.8, y=0.5)
SLICE_GAP = 2.5
DICOMDIR_TESTS = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests"


def _bundled(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name, download=False))


def write_series(folder: Path, n: int = 5, *, template: str = "CT_small.dcm",
                 patient_id: str = "P001", series_number: int = 3,
                 orientation: tuple[float, ...] = AXIAL, gap: float = SLICE_GAP,
                 seed: int = 0, edit=None) -> list[Dataset]:
    """``n`` slices under shuffled file names, InstanceNumber counting the wrong way.

    Slice k (in position order) holds the template's pixels plus 10 * k, so the test can
    tell the slices apart. ``edit(k, ds)`` may change a slice before it is written.
    Returns the datasets in position order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    normal = np.cross(orientation[:3], orientation[3:])
    names = [f"IM{i:04d}.dcm" for i in range(n)]
    random.Random(seed).shuffle(names)
    datasets = []
    for k in range(n):
        ds = _bundled(template)
        ds.PatientID, ds.SeriesInstanceUID, ds.SeriesNumber = patient_id, series_uid, series_number
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = [float(v) for v in np.array([-40.0, -30.0, 12.0])
                                   + k * gap * normal]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.InstanceNumber = n - k
        ds.PixelData = (ds.pixel_array + 10 * k).astype(ds.pixel_array.dtype).tobytes()
        if edit is not None:
            edit(k, ds)
        ds.save_as(folder / names[k], enforce_file_format=True)
        datasets.append(ds)
    return datasets


def write_seg(path: Path, sources: list[Dataset], labels: np.ndarray,
              names: dict[int, str] | None = None, seg_type: str = "BINARY") -> Dataset:
    """A SEG of ``sources`` from a (slice, row, column) label array, or from a
    (slice, row, column, segment) array (overlapping BINARY, or FRACTIONAL values)."""
    names = names or {1: "liver", 2: "tumor"}
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for number, label in sorted(names.items())]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=labels, segmentation_type=seg_type,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(),
        series_number=100, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="medssl", manufacturer_model_name="tests", software_versions="0",
        device_serial_number="0")
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return seg


def example_labels(sources: list[Dataset]) -> np.ndarray:
    """Segment 1 on slices 1-2, segment 2 on slice 3, slice 0 and 4 empty."""
    labels = np.zeros((len(sources), sources[0].Rows, sources[0].Columns), dtype=np.uint8)
    labels[1, 20:60, 30:50] = 1
    labels[2, 10:20, 5:90] = 1
    labels[3, 70:100, 40:45] = 2
    return labels


def only(iterator):
    items = list(iterator)
    assert len(items) == 1
    return items[0]


# -- series: order, spacing, intensities -----------------------------------------------------
def test_ct_series_sorted_by_position_in_hounsfield_units(tmp_path: Path) -> None:
    sources = write_series(tmp_path / "P001" / "ct")
    source = DicomSource(str(tmp_path))
    patient = only(source.patients())
    assert (patient.name, patient.number, patient.labeled) == ("P001", 1, False)
    assert source.modality == "CT" and source.format == "dicom"
    volume = only(source.pretrain_volumes(patient))
    assert volume.image.dtype == np.int16
    expected = np.stack([ds.pixel_array.T.astype(np.int64) * int(ds.RescaleSlope)
                         + int(ds.RescaleIntercept) for ds in sources], axis=-1)
    assert volume.image.shape == (128, 128, 5)
    np.testing.assert_array_equal(volume.image, expected)
    assert volume.spacing == pytest.approx((0.8, 0.5, SLICE_GAP))
    assert volume.mask is None
    assert volume.name == "P001_series3" and "." not in volume.volume_id
    assert [pydicom.dcmread(f).SOPInstanceUID for f in volume.files] == \
        [ds.SOPInstanceUID for ds in sources]
    assert volume.meta["modality"] == "CT"


def test_sagittal_series_ordered_along_the_slice_normal(tmp_path: Path) -> None:
    sources = write_series(tmp_path / "sag", 4, orientation=SAGITTAL, seed=3)
    source = DicomSource(str(tmp_path))
    volume = only(source.pretrain_volumes(only(source.patients())))
    # positions step along (-1, 0, 0): x decreases slice by slice, the order we wrote
    np.testing.assert_array_equal(volume.image[:, :, 3], sources[3].pixel_array.T - 1024)
    assert volume.spacing[2] == pytest.approx(SLICE_GAP)


def test_instance_number_orders_slices_without_positions(tmp_path: Path) -> None:
    def drop_position(k: int, ds: Dataset) -> None:
        del ds.ImagePositionPatient, ds.ImageOrientationPatient

    sources = write_series(tmp_path / "s", 3, edit=drop_position)
    source = DicomSource(str(tmp_path))
    volume = only(source.pretrain_volumes(only(source.patients())))
    by_instance = sorted(sources, key=lambda ds: ds.InstanceNumber)
    np.testing.assert_array_equal(volume.image[:, :, 0], by_instance[0].pixel_array.T - 1024)
    assert volume.spacing[2] == pytest.approx(float(sources[0].SliceThickness))


@pytest.mark.parametrize(("slope", "intercept", "dtype"), [
    (0.5, -3.25, np.float32),  # fractional rescale
    (20, -1024, np.float32),  # integral but beyond int16 (2191 * 20)
    (1, 0, np.int16),  # identity: stored values and dtype
])
def test_rescale_never_wraps_or_truncates(tmp_path: Path, slope: float, intercept: float,
                                          dtype: type) -> None:
    def rescale(k: int, ds: Dataset) -> None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept

    sources = write_series(tmp_path / "s", 2, edit=rescale)
    source = DicomSource(str(tmp_path))
    image = only(source.pretrain_volumes(only(source.patients()))).image
    assert image.dtype == dtype
    expected = np.stack([ds.pixel_array.T * np.float64(slope) + intercept for ds in sources],
                        axis=-1)
    np.testing.assert_array_equal(image, expected.astype(dtype))


def test_mr_kept_as_stored(tmp_path: Path) -> None:
    sources = write_series(tmp_path / "mr", 3, template="MR_small.dcm", gap=0.8)
    source = DicomSource(str(tmp_path))
    assert source.modality == "MR"
    volume = only(source.pretrain_volumes(only(source.patients())))
    assert volume.image.dtype == sources[0].pixel_array.dtype
    np.testing.assert_array_equal(volume.image[:, :, 2], sources[2].pixel_array.T)
    assert volume.spacing == pytest.approx((0.8, 0.5, 0.8))


def test_mixed_modalities_need_a_choice(tmp_path: Path) -> None:
    write_series(tmp_path / "ct", 2)
    write_series(tmp_path / "mr", 2, template="MR_small.dcm", series_number=4)
    with pytest.raises(DataError, match=r"CT: 1 series, MR: 1 series.*modality="):
        DicomSource(str(tmp_path))
    source = DicomSource(str(tmp_path), modality="mr")
    assert source.modality == "MR"
    assert only(source.pretrain_volumes(only(source.patients()))).name == "P001_series4"


def test_patients_series_names_and_skipped_files(tmp_path: Path) -> None:
    write_series(tmp_path / "a", 2, patient_id="Case 007")
    write_series(tmp_path / "b", 2, patient_id="LIDC-IDRI-0012")
    (tmp_path / "README.txt").write_text("not DICOM")
    shutil.copy(DICOMDIR_TESTS / "DICOMDIR", tmp_path / "DICOMDIR")
    for folder in ("MR1",):  # three one-slice series sharing SeriesNumber 1
        shutil.copytree(DICOMDIR_TESTS / "98892003" / folder, tmp_path / folder)
    source = DicomSource(str(tmp_path), modality="CT")
    assert [(p.name, p.number) for p in source.patients()] == \
        [("Case_007", 7), ("LIDC-IDRI-0012", 12)]
    assert set(source.skipped) >= {"README.txt", "DICOMDIR"}
    mr = DicomSource(str(tmp_path), modality="MR")
    names = [v.name for v in mr.pretrain_volumes(only(mr.patients()))]
    assert len(set(names)) == 3 and all(n.startswith("98890234_") and "." not in n
                                        for n in names)


# -- SEG ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seg_type", ["BINARY", "LABELMAP", "FRACTIONAL"])
def test_seg_round_trips_to_the_mask(tmp_path: Path, seg_type: str) -> None:
    sources = write_series(tmp_path / "P001" / "ct")
    write_series(tmp_path / "P002" / "ct", 2, patient_id="P002")
    labels = example_labels(sources)
    pixels = labels
    if seg_type == "FRACTIONAL":  # 0.6 is inside, 0.4 outside
        pixels = np.stack([labels == 1, labels == 2], axis=-1) * np.float32(0.6)
        pixels[0, :5, :5, 0] = 0.4
    write_seg(tmp_path / "P001" / "seg.dcm", sources[::-1], pixels[::-1],  # any order
              seg_type=seg_type)
    source = DicomSource(str(tmp_path))
    assert source.classes == {0: "background", 1: "liver", 2: "tumor"}
    p1, p2 = source.patients()
    assert (p1.labeled, p2.labeled) == (True, False)
    assert list(source.labeled_volumes(p2)) == []
    volume = only(source.labeled_volumes(p1))
    assert volume.mask is not None and volume.mask.dtype == np.uint8
    np.testing.assert_array_equal(volume.mask, labels.transpose(2, 1, 0))
    assert volume.files[-1].name == "seg.dcm" and len(volume.files) == 6
    assert only(source.pretrain_volumes(p1)).mask is None


def test_seg_placed_by_plane_position_alone(tmp_path: Path) -> None:
    sources = write_series(tmp_path / "ct")
    labels = example_labels(sources)
    seg = write_seg(tmp_path / "seg.dcm", sources, labels)
    for frame in seg.PerFrameFunctionalGroupsSequence:  # no source-image references left
        del frame.DerivationImageSequence
    seg.save_as(tmp_path / "seg.dcm")
    source = pickle.loads(pickle.dumps(DicomSource(str(tmp_path))))  # sent to worker processes
    volume = only(source.labeled_volumes(only(source.patients())))
    np.testing.assert_array_equal(volume.mask, labels.transpose(2, 1, 0))


def test_seg_of_a_series_not_used_is_skipped(tmp_path: Path) -> None:
    write_series(tmp_path / "ct", 2)
    mr = write_series(tmp_path / "mr", 2, template="MR_small.dcm", series_number=4)
    write_seg(tmp_path / "mr" / "seg.dcm", mr, np.ones((2, 64, 64), dtype=np.uint8))
    ct_only = DicomSource(str(tmp_path), modality="CT")
    assert not only(ct_only.patients()).labeled and ct_only.classes == {0: "background"}
    assert ct_only.skipped["mr/seg.dcm"].startswith("SEG of a series not used")
    assert only(DicomSource(str(tmp_path), modality="MR").patients()).labeled


def test_overlapping_segments(tmp_path: Path) -> None:
    sources = write_series(tmp_path / "ct", 2)
    both = np.zeros((2, 128, 128, 2), dtype=bool)
    both[1, 10:20, 10:20, :] = True  # liver and tumor claim the same pixels
    write_seg(tmp_path / "seg.dcm", sources, both)
    source = DicomSource(str(tmp_path))
    with pytest.raises(DataError, match=r"seg\.dcm: segments overlap on slice 1"):
        list(source.labeled_volumes(only(source.patients())))


def test_two_segs_for_one_series(tmp_path: Path) -> None:
    sources = write_series(tmp_path / "ct", 2)
    labels = np.ones((2, 128, 128), dtype=np.uint8)
    write_seg(tmp_path / "a.dcm", sources, labels, {1: "liver"})
    write_seg(tmp_path / "b.dcm", sources, labels, {1: "liver"})
    with pytest.raises(DataError, match=r"b\.dcm: a second SEG for .*first: .*a\.dcm"):
        DicomSource(str(tmp_path))


def test_segs_disagreeing_on_a_label(tmp_path: Path) -> None:
    a = write_series(tmp_path / "a", 2, patient_id="A1")
    b = write_series(tmp_path / "b", 2, patient_id="B2")
    labels = np.ones((2, 128, 128), dtype=np.uint8)
    write_seg(tmp_path / "a" / "seg.dcm", a, labels, {1: "liver"})
    write_seg(tmp_path / "b" / "seg.dcm", b, labels, {1: "spleen"})
    with pytest.raises(DataError, match=r"seg\.dcm: segment 1 is 'spleen' here but 'liver'"):
        DicomSource(str(tmp_path))


def _edited_seg(tmp_path: Path, edit) -> Path:
    sources = write_series(tmp_path / "ct")
    seg = write_seg(tmp_path / "seg.dcm", sources, example_labels(sources))
    edit(seg)
    seg.save_as(tmp_path / "seg.dcm")
    return tmp_path / "seg.dcm"


def _move_first_frame_off_slice(seg: Dataset) -> None:
    frame = seg.PerFrameFunctionalGroupsSequence[0]
    del frame.DerivationImageSequence
    position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
    frame.PlanePositionSequence[0].ImagePositionPatient = [*position[:2], position[2] + 1.0]


def _undeclared_segment(seg: Dataset) -> None:
    seg.PerFrameFunctionalGroupsSequence[0].SegmentIdentificationSequence[0] \
        .ReferencedSegmentNumber = 7


def _other_pixel_spacing(seg: Dataset) -> None:
    seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [0.9, 0.9]


@pytest.mark.parametrize(("edit", "problem"), [
    (_move_first_frame_off_slice, "lies on no slice"),
    (_undeclared_segment, "segment 7, which the SegmentSequence does not declare"),
    (_other_pixel_spacing, "PixelSpacing"),
])
def test_seg_not_matching_its_series(tmp_path: Path, edit, problem: str) -> None:
    path = _edited_seg(tmp_path, edit)
    with pytest.raises(DataError, match=problem) as error:
        DicomSource(str(tmp_path))
    assert str(error.value).startswith(str(path))


# -- bad input --------------------------------------------------------------------------------
def test_empty_or_non_dicom_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no readable DICOM image files") as error:
        DicomSource(str(tmp_path))
    assert str(tmp_path) in str(error.value)
    (tmp_path / "README").write_text("nothing here")
    with pytest.raises(DataError, match="no readable DICOM image files"):
        DicomSource(str(tmp_path))


@pytest.mark.parametrize("content", [
    b"\x00" * 128 + b"DICM" + b"\xff" * 64,  # DICOM marker, garbage after it
    bytes(range(256)) * 4,  # .dcm name, no marker, not DICOM either
])
@pytest.mark.filterwarnings("ignore:End of file reached")  # pydicom's note on the way
def test_corrupt_file(tmp_path: Path, content: bytes) -> None:
    write_series(tmp_path / "s", 2)
    (tmp_path / "s" / "broken.dcm").write_bytes(content)
    with pytest.raises(DataError, match=r"broken\.dcm: (cannot read DICOM|not a DICOM file)"):
        DicomSource(str(tmp_path))


def test_truncated_header(tmp_path: Path) -> None:
    write_series(tmp_path / "s", 2)
    good = next((tmp_path / "s").iterdir())
    (tmp_path / "s" / "cut.dcm").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"cut\.dcm: missing .*Rows"):
        DicomSource(str(tmp_path))


def test_truncated_and_missing_pixel_data(tmp_path: Path) -> None:
    write_series(tmp_path / "s", 3)
    first, second = sorted((tmp_path / "s").iterdir())[:2]
    first.write_bytes(first.read_bytes()[:-2000])
    source = DicomSource(str(tmp_path))
    with pytest.raises(DataError, match=rf"{first.name}: cannot decode pixel data"):
        list(source.pretrain_volumes(only(source.patients())))
    ds = pydicom.dcmread(second)
    del ds.PixelData
    ds.save_as(first)
    with pytest.raises(DataError, match=rf"{first.name}: no pixel data"):
        list(source.pretrain_volumes(only(source.patients())))


def test_nan_or_inf_after_rescale(tmp_path: Path) -> None:
    def overflow(k: int, ds: Dataset) -> None:
        ds.RescaleSlope, ds.RescaleIntercept = "1e+39", "0.5"  # beyond float32

    write_series(tmp_path / "s", 2, edit=overflow)
    source = DicomSource(str(tmp_path))
    with pytest.raises(DataError, match=r"IM\d{4}\.dcm: NaN or Inf"):
        list(source.pretrain_volumes(only(source.patients())))


def _shrink_slice_2(k: int, ds: Dataset) -> None:
    if k == 2:
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[:64, :64]).tobytes()
        ds.Rows = ds.Columns = 64


def _tilt_slice_2(k: int, ds: Dataset) -> None:
    if k == 2:
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.8, -0.6]


def _shift_slice_2(k: int, ds: Dataset) -> None:  # 1 mm off the regular grid
    if k == 2:
        ds.ImagePositionPatient = [-40.0, -30.0, 12.0 + 2 * SLICE_GAP + 1.0]


def _repeat_slice_1(k: int, ds: Dataset) -> None:
    if k == 2:
        ds.ImagePositionPatient = [-40.0, -30.0, 12.0 + SLICE_GAP]


@pytest.mark.parametrize(("edit", "problem"), [
    (_shrink_slice_2, "mixed Rows/Columns"),
    (_tilt_slice_2, "mixed orientations"),
    (_shift_slice_2, "non-uniform slice spacing"),
    (_repeat_slice_1, "same slice position"),
])
def test_inconsistent_series(tmp_path: Path, edit, problem: str) -> None:
    write_series(tmp_path / "series", 4, edit=edit)
    with pytest.raises(DataError, match=problem) as error:
        DicomSource(str(tmp_path))
    assert str(tmp_path / "series") in str(error.value)


def test_real_localizer_series_with_mixed_orientations(tmp_path: Path) -> None:
    # three series in one folder: two 3-plane localizers and one single slice
    shutil.copytree(DICOMDIR_TESTS / "98892003" / "MR2", tmp_path / "MR2")
    with pytest.raises(DataError, match=r"MR2.*mixed orientations"):
        DicomSource(str(tmp_path))
    source = DicomSource(str(tmp_path), skip_bad=True)
    assert [s.files[0].name for s in source.series(only(source.patients()))] == ["15970"]
    assert len(source.problems) == 2
    assert all("mixed orientations" in problem for problem in source.problems)


def test_skip_bad_leaves_out_what_discovery_cannot_use(tmp_path: Path) -> None:
    good = write_series(tmp_path / "good", patient_id="P1")
    write_series(tmp_path / "gap", 4, patient_id="P2", edit=_shift_slice_2)
    (tmp_path / "good" / "broken.dcm").write_bytes(bytes(range(256)) * 4)
    write_seg(tmp_path / "good" / "seg.dcm", good, example_labels(good))
    write_seg(tmp_path / "good" / "seg2.dcm", good, example_labels(good))
    source = DicomSource(str(tmp_path), skip_bad=True)
    assert [p.name for p in source.patients()] == ["P1"]  # P2's only series has a gap
    assert only(source.patients()).labeled
    assert [Path(p.split(":")[0]).name for p in source.problems] == \
        ["broken.dcm", "gap", "seg2.dcm"]
