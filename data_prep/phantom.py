"""Deterministic synthetic cardiac phantom: short-axis cine-MRI-like patients in ACDC layout.

The phantom lets the whole workflow (preparation, pretraining, fine-tuning, the demo)
run without real scans, while being realistic enough that self-supervised pretraining
and U-Net segmentation have something to learn:

* anatomy is modelled in millimetres in a body frame (anterior up, patient-left on the
  right, as a short-axis view is usually displayed): chest outline with subcutaneous
  fat, chest-wall muscle, lungs, spine, descending aorta, liver towards the apex,
  mediastinal/epicardial fat, and the heart — LV blood pool inside a myocardial ring,
  RV crescent hugging the septum, papillary muscles inside the LV;
* the heart is a truncated prolate shape: the LV shrinks from base to apex, the RV
  shrinks faster and disappears near the apex; boundaries are ellipses with smooth
  low-order Fourier perturbations;
* over the cardiac cycle the LV cavity area follows a systolic/diastolic curve (ED →
  ES → rapid filling → diastasis → atrial kick), the myocardium thickens so its area is
  roughly conserved, the RV contracts, the heart shifts and twists slightly;
* patients differ in pathology group (ACDC's NOR, DCM, HCM, MINF, RV, reflected in the
  geometry), heart size, position, orientation, wall thickness, ejection fraction,
  tissue contrast, coil bias field, noise level, slice/frame counts and voxel spacing;
* the image chain is bSSFP-like: tissue intensities with smooth texture, a slight blur
  (partial volume), a multiplicative coil bias field, then Rician noise, stored as
  non-negative uint16 counts.

Anatomy is physical: the field of view is ``image_size * pixel_spacing`` mm, and the
heart spans roughly 90-130 mm. Below ~112 px at the default spacing the heart may not
fit; raise ``pixel_spacing`` for small images (e.g. ``(2.6, 3.6)`` at 64 px).

Everything is a pure function of ``(seed, patient_id, config)``.
"""

from __future__ import annotations

import gzip
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from cluster.atomic import atomic_write_bytes, atomic_write_text
from data_prep.acdc import ACDC_CLASSES

CLASS_NAMES = ACDC_CLASSES  # the phantom writes ACDC label ids
BG, RV, MYO, LV = 0, 1, 2, 3
GROUPS: tuple[str, ...] = ("NOR", "DCM", "HCM", "MINF", "RV")

_UINT16_MAX = float(np.iinfo(np.uint16).max)
_ENDO_APEX = 0.97  # long-axis position (0 = base, 1 = apex) where the LV cavity closes


@dataclass(frozen=True)
class PhantomConfig:
    """Ranges the per-patient acquisition parameters are drawn from (all inclusive)."""

    image_size: int = 128  # H = W in pixels
    slices: tuple[int, int] = (6, 10)  # slices per patient
    frames: tuple[int, int] = (12, 20)  # cine frames per patient
    pixel_spacing: tuple[float, float] = (1.3, 1.8)  # mm, in-plane isotropic
    slice_thickness: tuple[float, float] = (5.0, 10.0)  # mm
    # Difficulty: Rician noise sigma as a fraction of the blood signal, and a factor on
    # every tissue's difference from soft tissue (1 = typical bSSFP contrast; lower is
    # harder: myocardium nearer its surroundings, blood pools less bright).
    noise: tuple[float, float] = (0.015, 0.05)
    contrast: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"PhantomConfig.image_size must be an int >= 16, "
                             f"got {self.image_size!r}")
        for name, lowest in (("slices", 1), ("frames", 2)):
            lo, hi = getattr(self, name)
            if int(lo) != lo or int(hi) != hi or not lowest <= lo <= hi:
                raise ValueError(f"PhantomConfig.{name} must be integers {lowest} <= lo <= hi, "
                                 f"got {(lo, hi)!r}")
        for name in ("pixel_spacing", "slice_thickness", "noise"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"PhantomConfig.{name} must satisfy 0 < lo <= hi, "
                                 f"got {(lo, hi)!r}")
        if not 0 < self.contrast <= 2:
            raise ValueError(f"PhantomConfig.contrast must be in (0, 2], got {self.contrast!r}")

    @classmethod
    def for_image_size(cls, image_size: int, **kwargs: Any) -> PhantomConfig:
        """Defaults for ``image_size``, with coarser pixels below 128 px so the heart fits."""
        factor = max(1.0, 128 / image_size)
        low, high = cls.pixel_spacing
        return cls(image_size=image_size,
                   pixel_spacing=(round(low * factor, 3), round(high * factor, 3)), **kwargs)


@dataclass
class PhantomPatient:
    """One simulated patient, in ACDC's 4D layout (x, y, slice, frame)."""

    patient_id: int
    cine: np.ndarray  # (H, W, Z, T) uint16
    masks: np.ndarray  # (H, W, Z, T) uint8, labels of CLASS_NAMES for every frame
    ed_frame: int  # 0-based end-diastole (largest LV)
    es_frame: int  # 0-based end-systole (smallest LV)
    spacing: tuple[float, float, float]  # mm along x, y, z
    group: str
    height_cm: float
    weight_kg: float


# Per-group ranges: LV endocardial radius at the base (ED, mm), wall thickness (mm), LV
# ejection fraction, RV crescent width at the base (ED, mm), RV ejection fraction, and
# RV angular half-span (degrees). Chosen so volumes and EFs fall in ACDC-like ranges.
_GROUP_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "NOR": {"r_endo": (22, 27), "wall": (7, 10), "ef": (0.55, 0.70),
            "rv_width": (15, 22), "rv_ef": (0.45, 0.60), "rv_span": (65, 85)},
    "DCM": {"r_endo": (30, 36), "wall": (5, 7), "ef": (0.10, 0.35),
            "rv_width": (15, 24), "rv_ef": (0.25, 0.50), "rv_span": (60, 80)},
    "HCM": {"r_endo": (17, 22), "wall": (11, 16), "ef": (0.65, 0.80),
            "rv_width": (13, 20), "rv_ef": (0.50, 0.65), "rv_span": (65, 85)},
    "MINF": {"r_endo": (26, 32), "wall": (6, 9), "ef": (0.20, 0.40),
             "rv_width": (15, 22), "rv_ef": (0.35, 0.55), "rv_span": (60, 80)},
    "RV": {"r_endo": (21, 26), "wall": (7, 10), "ef": (0.50, 0.65),
           "rv_width": (27, 38), "rv_ef": (0.20, 0.40), "rv_span": (80, 100)},
}


@dataclass(frozen=True)
class _Plan:
    """Every per-patient random draw except textures and noise (those are drawn later)."""

    group: str
    n_slices: int
    n_frames: int
    pixel_spacing: float
    slice_thickness: float
    ed_frame: int
    es_frame: int
    contraction: np.ndarray  # (T,) 0 at ED, 1 at ES
    s: np.ndarray  # (Z,) slice position along the long axis, 0 = base, 1 = apex
    apex_cap: float  # long-axis extent of the solid myocardial apex beyond the cavity
    # Heart geometry (mm, radians, body frame).
    r_endo: float
    wall: float
    ef: float
    rv_width: float
    rv_ef: float
    rv_span: float
    rv_extent: float  # s beyond which the RV is gone
    rv_wall: float
    theta_rv: float  # direction from the LV centre to the RV
    rv_skew: float
    lv_center: np.ndarray  # (2,) (v, h) at the base
    lv_tilt: np.ndarray  # (2,) centre shift from base to apex
    motion: np.ndarray  # (2,) centre shift at ES
    twist: float  # rotation at ES, radians, at the base (opposite at the apex)
    endo_coef: np.ndarray  # (2, 4) complex: base/apex coefficients for k = 2..5
    wall_coef: np.ndarray  # (3,) complex: k = 1, 2, 3
    rv_coef: np.ndarray  # (3,) complex: k = 1, 2, 3
    septal_gain: float  # HCM asymmetric septal hypertrophy
    infarct: tuple[float, float, float]  # direction, half-width (rad), depth of thinning
    papillary: np.ndarray  # (2,) directions of the papillary muscles
    # Body.
    body_axes: tuple[float, float]  # (v, h) half-axes
    body_coef: np.ndarray  # (3,) complex outline perturbation, k = 2, 3, 4
    fat_thickness: float
    chest_wall: float
    lung_coef: np.ndarray  # (2, 3) complex, left/right lung outline perturbation
    aorta: tuple[float, float, float]  # (v, h, radius)
    rotation: float  # image plane rotation
    view_center: np.ndarray  # (2,) body-frame point at the image centre
    # Image chain.
    tissue: dict[str, float]  # relative intensities, blood = 1
    blood_counts: float
    noise: float  # noise sigma as a fraction of blood_counts
    blur: float  # pixels
    bias_coef: np.ndarray  # (5,) quadratic log-bias coefficients
    height_cm: float
    weight_kg: float


def generate_patient(patient_id: int, seed: int = 0,
                     config: PhantomConfig = PhantomConfig()) -> PhantomPatient:
    """Simulate one patient; the same ``(patient_id, seed, config)`` gives identical arrays."""
    if patient_id < 0 or seed < 0:
        raise ValueError(f"patient_id and seed must be non-negative, got {patient_id}, {seed}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, patient_id]))
    plan = _plan_patient(rng, config)
    n, n_slices, n_frames = config.image_size, plan.n_slices, plan.n_frames

    v, h = _body_grid(plan, n)
    image = np.empty((n, n, n_slices, n_frames), np.float32)
    masks = np.empty((n, n, n_slices, n_frames), np.uint8)
    for z in range(n_slices):
        background, textures = _background_slice(rng, plan, v, h, z)
        masks[:, :, z], image[:, :, z] = _heart_slice(plan, v, h, z, background, textures)

    # Partial volume: blur in-plane only, before the coil weighting and the noise.
    ndimage.gaussian_filter(image, sigma=(plan.blur, plan.blur, 0, 0), output=image,
                            mode="nearest", truncate=3.0)
    image *= _bias_field(plan, n)[:, :, None, None]
    image *= plan.blood_counts
    image = _rician(rng, image, plan.noise * plan.blood_counts)
    cine = np.clip(np.rint(image), 0, _UINT16_MAX).astype(np.uint16)

    return PhantomPatient(
        patient_id=patient_id, cine=cine, masks=masks,
        ed_frame=plan.ed_frame, es_frame=plan.es_frame,
        spacing=(plan.pixel_spacing, plan.pixel_spacing, plan.slice_thickness),
        group=plan.group, height_cm=plan.height_cm, weight_kg=plan.weight_kg,
    )


def contraction_curve(n_frames: int, ed_frame: int, es_offset: int) -> np.ndarray:
    """Systolic contraction per frame: 0 at ED, 1 at ES (``es_offset`` frames after ED).

    The cine covers one cycle: cosine-shaped ejection, then rapid early filling (75 %),
    diastasis and the atrial kick (25 %) back to ED. ED and ES are the unique minimum
    and maximum, so the largest/smallest LV frames are well defined.
    """
    if not 0 < es_offset < n_frames:
        raise ValueError(f"es_offset must be in 1..{n_frames - 1}, got {es_offset}")
    phase = ((np.arange(n_frames) - ed_frame) % n_frames) / n_frames
    phase_es = es_offset / n_frames
    systole = 0.5 * (1.0 - np.cos(np.pi * phase / phase_es))
    u = (phase - phase_es) / (1.0 - phase_es)
    diastole = 1.0 - 0.75 * _smoothstep(u / 0.4) - 0.25 * _smoothstep((u - 0.7) / 0.3)
    return np.where(phase <= phase_es, systole, diastole)


def write_acdc_tree(out_dir: str | Path, n_patients: int, seed: int = 0,
                    config: PhantomConfig = PhantomConfig(), first_id: int = 1,
                    subset: str = "training", progress: bool = False) -> list[Path]:
    """Write patients first_id..first_id+n_patients-1 as an ACDC-layout tree.

    Returns the patient folders, ``out_dir/<subset>/patientNNN``, in id order.

    Each file is written atomically and byte-for-byte deterministically (gzip without
    timestamps or names), so re-running over an existing tree rewrites identical files.
    Frame files of earlier runs that this run does not write (other ED/ES) are removed.
    """
    if n_patients < 0 or first_id < 0:
        raise ValueError(f"n_patients and first_id must be non-negative, "
                         f"got {n_patients}, {first_id}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", subset):
        raise ValueError(f"subset must be a plain folder name, got {subset!r}")
    root = Path(out_dir) / subset
    folders = []
    ids = range(first_id, first_id + n_patients)
    for pid in tqdm(ids, desc="phantom patients", unit="patient", disable=not progress):
        folders.append(_write_patient(root, generate_patient(pid, seed=seed, config=config)))
    return folders


# --------------------------------------------------------------------------- planning


def _plan_patient(rng: np.random.Generator, config: PhantomConfig) -> _Plan:
    """Draw the patient: group, acquisition, heart and body geometry, contrast, noise."""

    def uni(lo: float, hi: float) -> float:
        # Python floats, not NumPy scalars, so float32 arrays are not promoted later.
        return float(rng.uniform(lo, hi))

    group = GROUPS[int(rng.integers(len(GROUPS)))]
    g = {key: float(rng.uniform(*bounds)) for key, bounds in _GROUP_RANGES[group].items()}
    n_slices = int(rng.integers(config.slices[0], config.slices[1] + 1))
    n_frames = int(rng.integers(config.frames[0], config.frames[1] + 1))
    spacing = float(rng.uniform(*config.pixel_spacing))
    thickness = float(rng.uniform(*config.slice_thickness))

    # ACDC's ED is usually the first frame, sometimes a little later.
    ed_frame = int(rng.choice([0, 0, 0, 1, 2])) % n_frames
    es_offset = int(np.clip(round(uni(0.30, 0.42) * n_frames), 1, n_frames - 1))
    contraction = contraction_curve(n_frames, ed_frame, es_offset)

    # The stack runs from near the base to near the apex; the long axis is what that
    # implies, kept within a plausible length (short stacks then cover only part of it).
    s_first = uni(0.0, 0.08)
    s_last = uni(0.82, 0.92)
    coverage = (n_slices - 1) * thickness
    long_axis = float(np.clip(coverage / (s_last - s_first), 65.0, 110.0))
    s = s_first + np.arange(n_slices) * thickness / long_axis

    # Body and heart placement in the body frame: v grows posterior, h to the patient's left.
    body_v, body_h = uni(95, 120), uni(135, 170)
    lv_center = np.array([-body_v + uni(68, 85), uni(8, 28)])
    theta_rv = np.pi + math.radians(uni(15, 40))  # anterior and to the patient's right
    r_epi = g["r_endo"] + g["wall"]
    # Image centre: the middle of the heart (LV and RV), jittered but keeping it in view.
    u_rv = np.array([np.sin(theta_rv), np.cos(theta_rv)])
    heart_mid = lv_center + 0.5 * g["rv_width"] * u_rv
    heart_radius = r_epi * 1.15 + 0.5 * g["rv_width"] + 6.0
    slack = max(0.0, 0.5 * config.image_size * spacing - heart_radius - 4.0)
    view_center = heart_mid + rng.uniform(-1, 1, 2) * min(slack, 0.08 * config.image_size
                                                          * spacing)

    tissue = {
        "blood": 1.0,
        "rv_blood": uni(0.88, 1.0),
        "myo": uni(0.20, 0.34),
        "muscle": uni(0.22, 0.36),
        "soft": uni(0.32, 0.46),
        "fat": uni(0.72, 0.95),
        "lung": uni(0.03, 0.08),
        "liver": uni(0.36, 0.50),
        "bone": uni(0.28, 0.42),
        "csf": uni(0.75, 0.95),
    }
    if config.contrast != 1.0:  # the default keeps the original draws byte for byte
        soft = tissue["soft"]
        tissue = {name: max(0.01, soft + config.contrast * (value - soft))
                  for name, value in tissue.items()}
    height = float(np.clip(rng.normal(171, 9), 150, 200))
    bmi = float(np.clip(rng.normal(26, 4), 17, 42))

    return _Plan(
        group=group, n_slices=n_slices, n_frames=n_frames, pixel_spacing=spacing,
        slice_thickness=thickness, ed_frame=ed_frame,
        es_frame=(ed_frame + es_offset) % n_frames, contraction=contraction, s=s,
        apex_cap=0.8 * g["wall"] / long_axis,
        r_endo=g["r_endo"], wall=g["wall"], ef=g["ef"], rv_width=g["rv_width"],
        rv_ef=g["rv_ef"], rv_span=math.radians(g["rv_span"]),
        rv_extent=uni(0.72, 0.95), rv_wall=uni(2.0, 3.5),
        theta_rv=theta_rv, rv_skew=math.radians(uni(-12, 12)),
        lv_center=lv_center, lv_tilt=rng.normal(0, 3, 2), motion=rng.normal(0, 1.5, 2),
        twist=math.radians(uni(2, 7)),
        endo_coef=_fourier(rng, (0.07, 0.03, 0.02, 0.012), n=2),
        wall_coef=_fourier(rng, (0.10, 0.07, 0.04)),
        rv_coef=_fourier(rng, (0.10, 0.06, 0.04)),
        septal_gain=uni(0.2, 0.6) if group == "HCM" else 0.0,
        infarct=(uni(-np.pi, np.pi), math.radians(uni(35, 70)),
                 uni(0.35, 0.55)) if group == "MINF" else (0.0, 1.0, 0.0),
        papillary=theta_rv + np.pi + np.deg2rad(np.array([-50.0, 55.0]) + rng.normal(0, 8, 2)),
        body_axes=(body_v, body_h), body_coef=_fourier(rng, (0.04, 0.02, 0.015)),
        fat_thickness=uni(4, 16), chest_wall=uni(12, 22),
        lung_coef=_fourier(rng, (0.06, 0.04, 0.03), n=2),
        aorta=(body_v - uni(55, 68), uni(14, 26), uni(10, 14)),
        rotation=math.radians(uni(-25, 25)), view_center=view_center,
        tissue=tissue, blood_counts=uni(450, 1300), noise=uni(*config.noise),
        blur=uni(0.4, 0.8), bias_coef=rng.normal(0, [0.25, 0.25, 0.12, 0.08, 0.12]),
        height_cm=float(round(height)), weight_kg=float(round(bmi * (height / 100) ** 2)),
    )


def _fourier(rng: np.random.Generator, amplitudes: tuple[float, ...],
             n: int | None = None) -> np.ndarray:
    """Random complex Fourier coefficients with the given typical magnitude per order."""
    shape = (len(amplitudes),) if n is None else (n, len(amplitudes))
    magnitude = np.asarray(amplitudes) * rng.uniform(0.4, 1.2, shape)
    return magnitude * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))


# --------------------------------------------------------------------------- anatomy


def _body_grid(plan: _Plan, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Body-frame coordinates (v, h) in mm of every pixel; pixel rows run along x."""
    axis = (np.arange(n, dtype=np.float64) - (n - 1) / 2) * plan.pixel_spacing
    x, y = np.meshgrid(axis, axis, indexing="ij")
    c, s = np.cos(plan.rotation), np.sin(plan.rotation)
    v = c * x - s * y + plan.view_center[0]
    h = s * x + c * y + plan.view_center[1]
    return v.astype(np.float32), h.astype(np.float32)


def _perturbed_radius(dv: np.ndarray, dh: np.ndarray, coef: np.ndarray,
                      first_order: int) -> tuple[np.ndarray, np.ndarray]:
    """Distance and ``1 + sum_k Re(c_k e^{ik theta})`` for the angle of each (dv, dh)."""
    rho = np.hypot(dv, dh)
    unit = (dh + 1j * dv) / np.maximum(rho, 1e-6)
    unit = unit.astype(np.complex64)
    power = unit ** first_order
    factor = np.ones(rho.shape, np.float32)
    for c in coef:
        factor += (c * power).real.astype(np.float32)
        power = power * unit
    return rho, factor


def _smooth_fields(rng: np.random.Generator, count: int, n: int, sigma: float) -> np.ndarray:
    """``count`` smooth random fields (n, n) with zero mean and unit standard deviation."""
    noise = rng.standard_normal((count, n, n), dtype=np.float32)
    fields = ndimage.gaussian_filter(noise, sigma=(0, sigma, sigma), mode="wrap", truncate=3.0)
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    fields /= fields.std(axis=(1, 2), keepdims=True) + 1e-6
    return fields


def _lv_radius(plan: _Plan, s: float) -> float:
    """ED endocardial mean radius: a prolate cavity closing at the endocardial apex."""
    return plan.r_endo * math.sqrt(max(0.0, 1.0 - (s / _ENDO_APEX) ** 2))


def _wall_thickness(plan: _Plan, s: float) -> float:
    """ED wall thickness: slightly thinner at the base and towards the apex.

    Past the endocardial apex this is the radius of the solid myocardial cap, which
    closes ``apex_cap`` further down; beyond that the slice holds no heart.
    """
    at_apex = plan.wall * (0.9 + 0.35 * _ENDO_APEX - 0.5 * _ENDO_APEX ** 2)
    if s > _ENDO_APEX:
        return at_apex * math.sqrt(max(0.0, 1.0 - ((s - _ENDO_APEX) / plan.apex_cap) ** 2))
    return plan.wall * (0.9 + 0.35 * s - 0.5 * s * s)


def _rv_width(plan: _Plan, s: float) -> float:
    """ED RV crescent width: the RV ends before the LV does (at ``rv_extent``)."""
    return plan.rv_width * math.sqrt(max(0.0, 1.0 - (s / plan.rv_extent) ** 2))


def _background_slice(rng: np.random.Generator, plan: _Plan, v: np.ndarray, h: np.ndarray,
                      z: int) -> tuple[np.ndarray, np.ndarray]:
    """Static tissue around the heart for slice ``z``, and textures the heart reuses."""
    t = plan.tissue
    n = v.shape[0]
    s = float(plan.s[z])
    px = plan.pixel_spacing
    coarse = _smooth_fields(rng, 4, n, sigma=12.0 / px)  # tissue-scale variation
    fine = _smooth_fields(rng, 2, n, sigma=2.5 / px)  # grain, vessels, trabeculae

    body_v, body_h = plan.body_axes
    rho_b, k_b = _perturbed_radius(v / body_v, h / body_h, plan.body_coef, 2)
    depth = (k_b - rho_b) * min(body_v, body_h)  # ~ mm inside the skin
    img = np.where(depth > 0, t["muscle"] * (1 + 0.15 * coarse[0] + 0.08 * fine[0]), 0.0)
    fat = (depth > 0) & (depth < plan.fat_thickness * (1 + 0.25 * coarse[1]))
    img = np.where(fat, t["fat"] * (1 + 0.06 * fine[1]), img)

    # Lungs: two lateral ellipses inside the rib cage, kept off the heart, spine, aorta.
    inner = depth > plan.fat_thickness + plan.chest_wall
    lungs = np.zeros_like(inner)
    for side, coef in zip((1.0, -1.0), plan.lung_coef, strict=True):
        cv, ch = 0.05 * body_v, side * 0.55 * body_h
        rho_l, k_l = _perturbed_radius((v - cv) / (0.78 * body_v), (h - ch) / (0.40 * body_h),
                                       coef, 2)
        lungs |= rho_l < k_l
    lv_c = plan.lv_center + plan.lv_tilt * s
    u_rv = np.array([np.sin(plan.theta_rv), np.cos(plan.theta_rv)])
    r_heart = _lv_radius(plan, s) + _wall_thickness(plan, s)
    heart_c = lv_c + 0.45 * _rv_width(plan, s) * u_rv
    keep_out = r_heart + 0.6 * _rv_width(plan, s) + 5.0 + 3.0 * coarse[2]
    near_heart = np.hypot(v - heart_c[0], h - heart_c[1]) < keep_out
    spine = (np.abs(h) < 28) & (v > body_v - 80)
    av, ah, ar = plan.aorta
    aorta_d = np.hypot(v - av, h - ah)
    lungs &= inner & ~near_heart & ~spine & (aorta_d > ar + 5)
    lung_tex = t["lung"] * (1 + 0.4 * coarse[3]) + 0.25 * np.clip(fine[0] - 1.6, 0, None)
    img = np.where(lungs, lung_tex, img)

    # Mediastinum: soft tissue mixed with bright pericardial/epicardial fat.
    mediastinum = inner & ~lungs
    mix = np.clip(0.1 + 0.8 * coarse[1], 0, 1)
    soft = t["soft"] + (t["fat"] - t["soft"]) * mix * near_heart
    img = np.where(mediastinum, soft * (1 + 0.06 * fine[1]), img)

    # The liver rises under the heart towards the apex, on the patient's right.
    grow = float(np.clip((s - 0.35) / 0.5, 0, 1)) ** 0.5
    if grow > 0:
        liver = (((v - 0.35 * body_v) / (0.60 * body_v * grow)) ** 2
                 + ((h + 0.30 * body_h) / (0.55 * body_h * grow)) ** 2 < 1) & inner
        liver &= ~near_heart
        img = np.where(liver, t["liver"] * (1 + 0.12 * coarse[3] + 0.05 * fine[0]), img)

    vert = np.hypot(v - (body_v - 48), h) < 17
    canal = np.hypot(v - (body_v - 24), h) < 7
    img = np.where(vert, t["bone"] * (1 + 0.2 * fine[0]), img)
    img = np.where(canal, t["csf"], img)
    img = np.where(aorta_d < ar, 0.95, img)
    return img.astype(np.float32), np.stack([coarse[0], fine[1]])


def _heart_slice(plan: _Plan, v: np.ndarray, h: np.ndarray, z: int, background: np.ndarray,
                 textures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and intensities (H, W, T) of slice ``z`` over the whole cycle."""
    n_frames = plan.n_frames
    labels = np.zeros((*v.shape, n_frames), np.uint8)
    image = np.repeat(background[:, :, None], n_frames, axis=2)
    s = float(plan.s[z])
    r_endo_ed = _lv_radius(plan, s)
    wall_ed = _wall_thickness(plan, s)
    rv_width = _rv_width(plan, s)
    min_wall = max(2.5, 2.2 * plan.pixel_spacing)  # keeps the ring >= ~2 px thick
    if r_endo_ed + wall_ed < plan.pixel_spacing:  # past the apex (long stacks)
        return labels, image

    # Work on the box that can contain the heart: the bound adds up the largest radius
    # every shape term can reach, so nothing is cut off, and it saves ~2/3 of the work.
    endo_coef = (1 - s) * plan.endo_coef[0] + s * plan.endo_coef[1]
    wall_max = max(np.sqrt(r_endo_ed ** 2 * (1 - plan.ef) + 2 * r_endo_ed * wall_ed
                           + wall_ed ** 2) - r_endo_ed * np.sqrt(1 - plan.ef), wall_ed)
    reach = (r_endo_ed * (1 + np.abs(endo_coef).sum())
             + max(wall_max * (1 + np.abs(plan.wall_coef).sum()) * (1 + plan.septal_gain),
                   min_wall)
             + rv_width * (1 + np.abs(plan.rv_coef).sum()) + plan.rv_wall
             + np.hypot(*plan.motion) + 2 * plan.pixel_spacing)
    center = plan.lv_center + plan.lv_tilt * s
    inside = np.hypot(v - center[0], h - center[1]) < reach
    if not inside.any():
        return labels, image
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    v, h, background = v[box], h[box], background[box]
    coarse, fine = textures[0][box][:, :, None], textures[1][box][:, :, None]

    c = plan.contraction.astype(np.float32)  # (T,)
    cv = (center[0] + plan.motion[0] * c).astype(np.float32)
    ch = (center[1] + plan.motion[1] * c).astype(np.float32)
    dv, dh = v[:, :, None] - cv, h[:, :, None] - ch  # (h, w, T)
    rho = np.hypot(dv, dh)
    unit = (dh + 1j * dv) / np.maximum(rho, 1e-6)  # e^{i theta}, complex64
    powers = [unit]
    for _ in range(4):
        powers.append(powers[-1] * unit)  # e^{ik theta}, k = 1..5

    def shape(coef: np.ndarray, first: int) -> np.ndarray:
        """1 + sum_k Re(c_k e^{ik theta}); c_k may carry a per-frame last axis."""
        total = np.ones(rho.shape, np.float32)
        for i, ck in enumerate(coef):
            total += (np.asarray(ck, np.complex64) * powers[first + i - 1]).real
        return total

    def toward(angle: float) -> np.ndarray:
        """cos(theta - angle) for every pixel and frame."""
        return (unit * np.complex64(np.exp(-1j * angle))).real

    # Shape coefficients vary from base to apex and rotate with the systolic twist: a
    # rotation by delta multiplies the order-k coefficient by e^{-ik delta}.
    twist = plan.twist * (1 - 2 * s) * c
    orders = np.arange(2, 2 + endo_coef.size)
    endo_shape = shape(endo_coef[:, None] * np.exp(-1j * orders[:, None] * twist), 2)
    wall_shape = shape(plan.wall_coef, 1)
    if plan.septal_gain:
        wall_shape *= 1 + plan.septal_gain * np.clip(toward(plan.theta_rv), 0, 1) ** 2
    direction, half_width, depth = plan.infarct
    if depth:
        cos_hw = math.cos(half_width)
        scar = np.clip((toward(direction) - cos_hw) / (1 - cos_hw), 0, 1)
        wall_shape *= 1 - depth * np.sqrt(scar)

    # Cavity area follows the contraction (area ~ 1 - EF at ES); myocardial area is kept,
    # so the wall thickens as the cavity shrinks.
    r_endo_t = (r_endo_ed * np.sqrt(1 - plan.ef * c)).astype(np.float32)  # (T,)
    myo_area = (r_endo_ed + wall_ed) ** 2 - r_endo_ed ** 2  # over pi
    wall_t = (np.sqrt(r_endo_t ** 2 + myo_area) - r_endo_t).astype(np.float32)
    r_endo = r_endo_t * endo_shape
    r_epi = r_endo + np.maximum(wall_t * wall_shape, min_wall)

    # RV: a crescent on the epicardium, widest towards theta_rv, tapering to the horns;
    # it narrows with its ejection fraction and its span shortens a little in systole.
    span = plan.rv_span * (1 - 0.08 * c) * (0.75 + 0.25 * max(0.0, 1 - s / plan.rv_extent))
    cos_span = np.cos(span).astype(np.float32)
    profile = np.clip((toward(plan.theta_rv + plan.rv_skew) - cos_span) / (1 - cos_span), 0, 1)
    profile **= 0.8
    rv_w = (rv_width * (1 - plan.rv_ef * c)).astype(np.float32) * profile
    rv_w *= shape(plan.rv_coef, 1)
    rv_outer = r_epi + rv_w

    lv = rho < r_endo
    myo = ~lv & (rho < r_epi)
    # Horn tips thinner than ~2 px would pixelate into specks; end the crescent bluntly.
    rv = ~lv & ~myo & (rho < rv_outer) & (rv_w >= 2 * plan.pixel_spacing)
    _keep_largest_component(rv)
    rv_wall = ~lv & ~myo & ~rv & (profile > 0) & (rho < rv_outer + plan.rv_wall)
    crop = np.select([lv, myo, rv], [LV, MYO, RV], BG).astype(np.uint8)

    # Intensities: blood with mild flow texture, darker trabeculated rim, soft papillary
    # muscles in the cavity (labelled LV, as in ACDC), dark myocardium, thin RV wall.
    t = plan.tissue
    blood = t["blood"] * (1 + 0.03 * coarse) * (
        1 - 0.3 * np.exp(-(r_endo - rho) / 1.5) * (0.8 + 0.4 * np.clip(fine, -1, 1)))
    myo_img = t["myo"] * (1 + 0.05 * fine)
    if 0.1 < s < 0.85:
        sigma = 0.13 * r_endo_t
        for angle in plan.papillary.tolist():
            pv, ph = r_endo_t * (0.76 * math.sin(angle)), r_endo_t * (0.76 * math.cos(angle))
            weight = np.exp(-((dv - pv) ** 2 + (dh - ph) ** 2) / (2 * sigma ** 2))
            blood += (t["myo"] - blood) * np.clip(1.3 * weight, 0, 1)
    crop_image = np.select(
        [lv, myo | rv_wall, rv],
        [blood, myo_img, t["rv_blood"] * (1 + 0.03 * coarse)],
        background[:, :, None],
    )
    labels[box] = crop
    image[box] = crop_image
    return labels, image


def _keep_largest_component(mask: np.ndarray) -> None:
    """In place, per frame (last axis): drop all but the largest 4-connected region.

    A tapering RV horn can pixelate into a detached pixel or two; ground truth is one
    connected crescent.
    """
    for t in range(mask.shape[2]):
        regions, count = ndimage.label(mask[:, :, t])
        if count > 1:
            sizes = np.bincount(regions.ravel())
            sizes[0] = 0
            mask[:, :, t] = regions == sizes.argmax()


# --------------------------------------------------------------------------- image chain


def _bias_field(plan: _Plan, n: int) -> np.ndarray:
    """Smooth multiplicative coil sensitivity, 1 at the image centre, within [0.4, 2.5]."""
    axis = np.linspace(-1, 1, n, dtype=np.float32)
    x, y = np.meshgrid(axis, axis, indexing="ij")
    a = plan.bias_coef
    log_bias = a[0] * x + a[1] * y + a[2] * x * x + a[3] * x * y + a[4] * y * y
    return np.clip(np.exp(log_bias), 0.4, 2.5).astype(np.float32)


def _rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the complex signal with Gaussian noise in both channels."""
    real = rng.standard_normal(signal.shape, dtype=np.float32)
    real *= sigma
    real += signal
    imag = rng.standard_normal(signal.shape, dtype=np.float32)
    imag *= sigma
    return np.hypot(real, imag, out=real)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


# --------------------------------------------------------------------------- ACDC writer


def _write_patient(root: Path, patient: PhantomPatient) -> Path:
    name = f"patient{patient.patient_id:03d}"
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    n_frames = patient.cine.shape[3]
    info = (f"ED: {patient.ed_frame + 1}\nES: {patient.es_frame + 1}\nGroup: {patient.group}\n"
            f"Height: {patient.height_cm:.1f}\nNbFrame: {n_frames}\n"
            f"Weight: {patient.weight_kg:.1f}\n")
    atomic_write_text(folder / "Info.cfg", info)
    _write_nifti(folder / f"{name}_4d.nii.gz", patient.cine, (*patient.spacing, 1.0))

    written = set()
    for frame in sorted({patient.ed_frame, patient.es_frame}):
        stem = f"{name}_frame{frame + 1:02d}"
        _write_nifti(folder / f"{stem}.nii.gz", patient.cine[..., frame], patient.spacing)
        _write_nifti(folder / f"{stem}_gt.nii.gz", patient.masks[..., frame], patient.spacing)
        written |= {f"{stem}.nii.gz", f"{stem}_gt.nii.gz"}
    stale = re.compile(rf"^{name}_frame\d+(_gt)?\.nii\.gz$")
    for path in folder.iterdir():
        if stale.match(path.name) and path.name not in written:
            path.unlink()
    return folder


def _write_nifti(path: Path, data: np.ndarray, zooms: tuple[float, ...]) -> None:
    """Atomic, reproducible .nii.gz: nibabel serialises, gzip runs without a timestamp.

    Level 1: noisy images barely compress further, and higher levels are ~4x slower.
    """
    affine = np.diag([*zooms[:3], 1.0])
    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    image.header.set_data_dtype(data.dtype)
    image.header.set_zooms(zooms)
    image.header.set_xyzt_units("mm", "sec")
    payload = gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)
    atomic_write_bytes(path, payload)
