"""Tests of the synthetic cardiac phantom and its ACDC-layout writer."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data_prep.phantom import (
    CLASS_NAMES,
    GROUPS,
    PhantomConfig,
    PhantomPatient,
    contraction_curve,
    generate_patient,
    write_acdc_tree,
)

BG, RV, MYO, LV = 0, 1, 2, 3
PATIENT_IDS = (1, 2, 3, 4, 5, 6)


@pytest.fixture(scope="module")
def patients() -> dict[int, PhantomPatient]:
    return {pid: generate_patient(pid, seed=0) for pid in PATIENT_IDS}


def _mid_slices(patient: PhantomPatient) -> range:
    """The middle third of the stack (at least one slice)."""
    z = patient.masks.shape[2]
    return range(z // 3, max(z // 3 + 1, (2 * z + 2) // 3))


def _four_neighbours(mask: np.ndarray) -> list[np.ndarray]:
    """The label of each pixel's up/down/left/right neighbour; outside the image is BG."""
    padded = np.pad(mask, 1, constant_values=BG)
    return [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]


def test_class_names_follow_acdc() -> None:
    assert CLASS_NAMES == {0: "BG", 1: "RV", 2: "MYO", 3: "LV"}


def test_same_seed_and_id_are_identical_and_ids_differ() -> None:
    a, b = generate_patient(7, seed=3), generate_patient(7, seed=3)
    np.testing.assert_array_equal(a.cine, b.cine)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert (a.ed_frame, a.es_frame, a.spacing, a.group) == (b.ed_frame, b.es_frame, b.spacing,
                                                            b.group)
    other_id, other_seed = generate_patient(8, seed=3), generate_patient(7, seed=4)
    for other in (other_id, other_seed):
        assert other.cine.shape != a.cine.shape or not np.array_equal(other.cine, a.cine)
        assert other.spacing != a.spacing


def test_shapes_dtypes_and_ranges(patients: dict[int, PhantomPatient]) -> None:
    config = PhantomConfig()
    for patient in patients.values():
        h, w, z, t = patient.cine.shape
        assert (h, w) == (config.image_size, config.image_size)
        assert config.slices[0] <= z <= config.slices[1]
        assert config.frames[0] <= t <= config.frames[1]
        assert patient.masks.shape == patient.cine.shape
        assert patient.cine.dtype == np.uint16 and patient.masks.dtype == np.uint8
        assert set(np.unique(patient.masks)) <= {BG, RV, MYO, LV}
        assert 0 <= patient.ed_frame < t and 0 <= patient.es_frame < t
        assert patient.ed_frame != patient.es_frame
        sx, sy, sz = patient.spacing
        assert sx == sy and config.pixel_spacing[0] <= sx <= config.pixel_spacing[1]
        assert config.slice_thickness[0] <= sz <= config.slice_thickness[1]
        assert patient.group in GROUPS
        assert 140 <= patient.height_cm <= 210 and 35 <= patient.weight_kg <= 180
        # MRI-like counts: blood a few hundred to a few thousand, never saturated.
        assert 200 < np.percentile(patient.cine, 99.5) < 5000
        assert patient.cine.max() < 65535


def test_all_classes_present_at_ed_on_mid_slices(patients: dict[int, PhantomPatient]) -> None:
    for patient in patients.values():
        for z in _mid_slices(patient):
            present = set(np.unique(patient.masks[:, :, z, patient.ed_frame]))
            assert present == {BG, RV, MYO, LV}, (patient.patient_id, z, present)


def test_myocardium_encloses_lv_and_rv_stays_outside(patients: dict[int, PhantomPatient]) -> None:
    for patient in patients.values():
        _, _, n_slices, n_frames = patient.masks.shape
        for z in range(n_slices):
            for t in range(n_frames):
                mask = patient.masks[:, :, z, t]
                lv = mask == LV
                for neighbour in _four_neighbours(mask):
                    assert np.isin(neighbour[lv], (LV, MYO)).all(), (patient.patient_id, z, t)
                epicardium = ndimage.binary_fill_holes(lv | (mask == MYO))
                assert not (epicardium & (mask == RV)).any(), (patient.patient_id, z, t)
                # Nothing of the heart is cut off by the field of view.
                border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
                assert (border == BG).all()


def test_lv_contracts_and_shrinks_towards_apex(patients: dict[int, PhantomPatient]) -> None:
    for patient in patients.values():
        lv_area = (patient.masks == LV).sum(axis=(0, 1))  # (Z, T)
        ed, es = patient.ed_frame, patient.es_frame
        for z in _mid_slices(patient):
            assert lv_area[z, es] < 0.9 * lv_area[z, ed], (patient.patient_id, z)
        # ED is the largest and ES the smallest LV volume of the cycle.
        volume = lv_area.sum(axis=0)
        assert volume.argmax() == ed and volume.argmin() == es
        assert lv_area[0, ed] > lv_area[-1, ed]
        # The RV tapers faster than the LV and is small or gone at the apex.
        rv_area = (patient.masks == RV).sum(axis=(0, 1))
        assert rv_area[-1, ed] / rv_area[0, ed] < lv_area[-1, ed] / lv_area[0, ed]


def test_myocardium_thickens_roughly_conserving_area(patients: dict[int, PhantomPatient]) -> None:
    for patient in patients.values():
        myo_area = (patient.masks == MYO).sum(axis=(0, 1))
        ed, es = patient.ed_frame, patient.es_frame
        for z in _mid_slices(patient):
            assert 0.8 < myo_area[z, es] / myo_area[z, ed] < 1.35, (patient.patient_id, z)


def test_image_contrast_follows_bssfp(patients: dict[int, PhantomPatient]) -> None:
    for patient in patients.values():
        ed = patient.ed_frame
        image = patient.cine[..., ed].astype(np.float64)
        mask = patient.masks[..., ed]
        assert np.isfinite(image).all()
        lv, myo, rv = image[mask == LV].mean(), image[mask == MYO].mean(), image[mask == RV].mean()
        assert lv > 1.8 * myo and rv > 1.5 * myo, (patient.patient_id, lv, myo, rv)
        # Air outside the body is only noise: much darker than the blood pool.
        corners = np.concatenate([image[:4, :4].ravel(), image[-4:, -4:].ravel()])
        assert np.median(image) < lv and corners.min() >= 0


def test_cine_frames_change_over_the_cycle(patients: dict[int, PhantomPatient]) -> None:
    patient = patients[PATIENT_IDS[0]]
    ed, es = patient.ed_frame, patient.es_frame
    assert not np.array_equal(patient.masks[..., ed], patient.masks[..., es])
    # Noise is fresh per frame, as in a real acquisition.
    next_frame = (ed + 1) % patient.cine.shape[3]
    assert not np.array_equal(patient.cine[..., ed], patient.cine[..., next_frame])


def test_patients_vary(patients: dict[int, PhantomPatient]) -> None:
    spacings = {p.spacing for p in patients.values()}
    shapes = {p.cine.shape for p in patients.values()}
    lv_volumes = {round(float((p.masks[..., p.ed_frame] == LV).sum()) * np.prod(p.spacing), -2)
                  for p in patients.values()}
    assert len(spacings) == len(patients)
    assert len({s[2] for s in shapes}) > 1 and len({s[3] for s in shapes}) > 1
    assert len(lv_volumes) > len(patients) // 2
    groups = {generate_patient(pid, config=PhantomConfig(image_size=32, slices=(1, 1),
                                                         frames=(2, 2),
                                                         pixel_spacing=(6.0, 6.0))).group
              for pid in range(40)}
    assert groups == set(GROUPS)


def test_config_controls_size_and_is_validated() -> None:
    config = PhantomConfig(image_size=64, slices=(3, 3), frames=(5, 5),
                           pixel_spacing=(3.0, 3.0), slice_thickness=(8.0, 8.0))
    patient = generate_patient(11, config=config)
    assert patient.cine.shape == (64, 64, 3, 5)
    assert patient.spacing == (3.0, 3.0, 8.0)
    assert (patient.masks[..., patient.ed_frame] == LV).any()
    for bad in ({"image_size": 8}, {"slices": (5, 2)}, {"frames": (1, 4)},
                {"pixel_spacing": (0.0, 1.0)}, {"slice_thickness": (6.0, 5.0)}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PhantomConfig(**bad)
    with pytest.raises(ValueError):
        generate_patient(-1)


def test_contraction_curve_has_unique_ed_and_es() -> None:
    curve = contraction_curve(16, ed_frame=1, es_offset=6)
    assert curve.argmin() == 1 and curve.argmax() == 7
    assert curve[1] == 0 and curve[7] == 1
    assert np.sum(curve == 0) == 1 and np.sum(curve == 1) == 1
    assert np.all(np.diff(curve[1:8]) > 0)  # ejection is monotonic


def _read_info(path: Path) -> dict[str, str]:
    entries = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(": ")
        entries[key] = value
    return entries


def test_write_acdc_tree_layout_and_content(tmp_path: Path) -> None:
    config = PhantomConfig(image_size=96, slices=(3, 4), frames=(6, 8),
                           pixel_spacing=(2.0, 2.4))
    folders = write_acdc_tree(tmp_path, n_patients=2, seed=5, config=config, first_id=9)
    assert folders == [tmp_path / "training" / "patient009", tmp_path / "training" / "patient010"]

    for folder, pid in zip(folders, (9, 10), strict=True):
        patient = generate_patient(pid, seed=5, config=config)
        ed, es = patient.ed_frame + 1, patient.es_frame + 1
        name = folder.name
        expected = {"Info.cfg", f"{name}_4d.nii.gz",
                    f"{name}_frame{ed:02d}.nii.gz", f"{name}_frame{ed:02d}_gt.nii.gz",
                    f"{name}_frame{es:02d}.nii.gz", f"{name}_frame{es:02d}_gt.nii.gz"}
        assert {p.name for p in folder.iterdir()} == expected

        info = _read_info(folder / "Info.cfg")
        assert list(info) == ["ED", "ES", "Group", "Height", "NbFrame", "Weight"]
        assert int(info["ED"]) == ed and int(info["ES"]) == es
        assert info["Group"] == patient.group
        assert int(info["NbFrame"]) == patient.cine.shape[3]
        assert float(info["Height"]) == patient.height_cm
        assert float(info["Weight"]) == patient.weight_kg

        cine = nib.load(folder / f"{name}_4d.nii.gz")
        assert cine.get_data_dtype() == np.uint16
        assert cine.header.get_zooms() == pytest.approx((*patient.spacing, 1.0), rel=1e-6)
        assert cine.header.get_xyzt_units() == ("mm", "sec")
        np.testing.assert_array_equal(np.asanyarray(cine.dataobj), patient.cine)

        for frame in (patient.ed_frame, patient.es_frame):
            image = nib.load(folder / f"{name}_frame{frame + 1:02d}.nii.gz")
            labels = nib.load(folder / f"{name}_frame{frame + 1:02d}_gt.nii.gz")
            assert image.get_data_dtype() == np.uint16 and labels.get_data_dtype() == np.uint8
            assert image.shape == labels.shape == patient.cine.shape[:3]
            assert image.header.get_zooms() == pytest.approx(patient.spacing, rel=1e-6)
            assert labels.header.get_zooms() == pytest.approx(patient.spacing, rel=1e-6)
            np.testing.assert_array_equal(np.asanyarray(image.dataobj), patient.cine[..., frame])
            np.testing.assert_array_equal(np.asanyarray(labels.dataobj),
                                          patient.masks[..., frame])


def test_write_acdc_tree_rewrites_identically(tmp_path: Path) -> None:
    config = PhantomConfig(image_size=64, slices=(2, 3), frames=(4, 6),
                           pixel_spacing=(3.0, 3.4))
    write_acdc_tree(tmp_path, 2, seed=1, config=config, subset="testing")
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    write_acdc_tree(tmp_path, 2, seed=1, config=config, subset="testing", progress=True)
    after = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert before == after
    # Byte-identical at any later time too: the gzip header carries no timestamp.
    assert all(data[4:8] == bytes(4) for path, data in after.items() if path.suffix == ".gz")
    assert all(p.parent.parent.name == "testing" for p in after)
    assert not any(".tmp-" in p.name for p in after)


def test_write_acdc_tree_removes_stale_frame_files(tmp_path: Path) -> None:
    config = PhantomConfig(image_size=64, slices=(2, 2), frames=(4, 4),
                           pixel_spacing=(3.0, 3.0))
    folder = tmp_path / "training" / "patient001"
    folder.mkdir(parents=True)
    stale = folder / "patient001_frame99_gt.nii.gz"
    unrelated = folder / "notes.txt"
    stale.write_bytes(b"old")
    unrelated.write_text("keep")
    write_acdc_tree(tmp_path, 1, config=config)
    assert not stale.exists() and unrelated.exists()
