"""One phantom patient: plan (anatomy, scar, contrast) and render, deterministically from (seed, index)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.anatomy.aha import TERRITORIES, aha_segments, slice_levels
from engine.anatomy.labels import MYOCARDIUM, scar_region
from engine.phantom.config import PATTERNS, PhantomConfig
from engine.phantom.heart import HeartPlan, sample_heart
from engine.phantom.render import PatientTextures, bias_coefficients, body_radii_map, render_slice
from engine.phantom.scar import ScarPlan, sample_scar
from engine.phantom.thorax import ThoraxSlice, place_thorax
from engine.phantom.tissue import Contrast, sample_contrast

# Negatives are stratified over blocks of this many consecutive patients, so every cohort holds
# close to ``negative_fraction`` negatives while patient i still depends on (seed, i) alone.
NEGATIVE_BLOCK = 12
_BLOCK_STREAM = 0x4E4547  # tags the block's random stream apart from the patients' streams
_MAX_SCAR_TRIES = 4


@dataclass
class PhantomPatient:
    """One rendered phantom patient.

    Attributes:
        patient_id: ``Case_P001`` (positive) or ``Case_N001`` (negative), number = index + 1.
        image: float32 [k, H, W] raw scanner intensities (integer values in 0-4095), engine
            orientation (row 0 at the top, RV to the left of the LV), slices base to apex.
        label: uint8 [k, H, W] labels 0-4 (DOMAIN.md section 1).
        spacing: ``(slice, row, col)`` in mm.
        meta: JSON-friendly facts: index, seed, pattern, territory, positive, mvo, levels,
            contrast figures, heart figures.
    """

    patient_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    meta: dict = field(default_factory=dict)

    @property
    def positive(self) -> bool:
        return bool(scar_region(self.label).any())


@dataclass
class PatientPlan:
    """Everything drawn for a patient before rendering (see :func:`plan_patient`)."""

    index: int
    seed: int
    pixel_mm: float
    slice_mm: float
    heart: HeartPlan
    thorax: list[ThoraxSlice]
    scar: ScarPlan
    contrast: Contrast
    bias: np.ndarray
    texture_seed: np.random.SeedSequence
    noise_seed: np.random.SeedSequence
    scar_seed: np.random.SeedSequence
    tiny: bool


def is_negative(index: int, seed: int, negative_fraction: float) -> bool:
    """Whether patient ``index`` of cohort ``seed`` is drawn without scar (stratified in blocks)."""
    block, slot = divmod(index, NEGATIVE_BLOCK)
    rng = np.random.default_rng(np.random.SeedSequence([seed, block, _BLOCK_STREAM]))
    expected = negative_fraction * NEGATIVE_BLOCK
    n_negative = int(np.floor(expected)) + int(rng.random() < expected - np.floor(expected))
    return bool(rng.permutation(NEGATIVE_BLOCK)[slot] < n_negative)


def _choose(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = [p for p in PATTERNS if weights.get(p, 0.0) > 0]
    p = np.array([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def plan_patient(index: int, seed: int, cfg: PhantomConfig) -> PatientPlan:
    """Draw a patient's anatomy, scar and contrast from ``SeedSequence([seed, index])``."""
    if index < 0:
        raise ValueError(f"patient index must be >= 0, got {index}")
    root = np.random.SeedSequence([seed, index])
    case_ss, anatomy_ss, scar_ss, contrast_ss, texture_ss, noise_ss = root.spawn(6)
    case = np.random.default_rng(case_ss)
    negative = is_negative(index, seed, cfg.negative_fraction)
    pattern = "none" if negative else _choose(case, cfg.pattern_weights)
    tiny = (not negative) and bool(case.random() < cfg.tiny_scar_fraction)
    n_slices = int(case.integers(cfg.min_slices, cfg.max_slices + 1))
    pixel_mm = float(case.uniform(*cfg.pixel_spacing_range)) * cfg.spacing_scale()
    slice_mm = cfg.slice_thickness
    if cfg.max_slice_thickness > cfg.slice_thickness and case.random() < cfg.thick_slice_fraction:
        slice_mm = float(np.round(case.uniform(cfg.slice_thickness, cfg.max_slice_thickness), 1))

    anatomy = np.random.default_rng(anatomy_ss)
    heart = sample_heart(anatomy, n_slices, slice_mm, cfg.image_size * pixel_mm, pixel_mm)
    thorax = place_thorax(anatomy, heart, cfg.image_size, pixel_mm)
    contrast_rng = np.random.default_rng(contrast_ss)
    contrast = sample_contrast(contrast_rng, cfg)
    bias = bias_coefficients(contrast_rng, cfg.bias_strength)
    scar = sample_scar(np.random.default_rng(scar_ss), pattern, heart.levels(), tiny, cfg.mvo_probability)
    return PatientPlan(
        index=index, seed=seed, pixel_mm=pixel_mm, slice_mm=slice_mm, heart=heart, thorax=thorax, scar=scar,
        contrast=contrast, bias=bias, texture_seed=texture_ss, noise_seed=noise_ss, scar_seed=scar_ss, tiny=tiny,
    )


def render_patient(plan: PatientPlan, cfg: PhantomConfig) -> tuple[np.ndarray, np.ndarray]:
    """Render a plan's slices: ``(image float32 [k, H, W], label uint8 [k, H, W])``."""
    textures = PatientTextures(np.random.default_rng(plan.texture_seed), cfg.image_size)
    noise_rng = np.random.default_rng(plan.noise_seed)
    first = plan.thorax[0]
    radii = body_radii_map(cfg.image_size, plan.pixel_mm, np.asarray(first.body, dtype=np.float64), first.body_profiles)
    images, labels = [], []
    s = plan.scar
    for k, (heart, thorax) in enumerate(zip(plan.heart.slices, plan.thorax)):
        image, label = render_slice(
            heart, (s.lo[k], s.hi[k], s.mvo_lo[k], s.mvo_hi[k]), thorax, plan.contrast, textures, plan.bias, radii, noise_rng,
            cfg.image_size, plan.pixel_mm, cfg.supersampling, cfg.thorax_supersampling,
        )
        images.append(image)
        labels.append(label)
    return np.stack(images), np.stack(labels)


def _outside_territory(label: np.ndarray, levels: list, territory: str) -> np.ndarray:
    """Scar pixels lying in AHA segments outside ``territory`` (measured as the manifest does)."""
    allowed = np.asarray(TERRITORIES[territory])
    out = np.zeros(label.shape, dtype=bool)
    for k, level in enumerate(levels):
        if level is None or not scar_region(label[k]).any():
            continue
        seg = aha_segments(label[k], level)
        out[k] = scar_region(label[k]) & ~np.isin(seg, allowed)
    return out


def generate_patient(index: int, seed: int = 0, cfg: PhantomConfig | None = None,
                     case_number: int | None = None) -> PhantomPatient:
    """Generate phantom patient ``index`` of the cohort drawn with ``seed``.

    Deterministic: the patient depends only on ``(seed, index, cfg)``, not on how many patients
    are generated or in which order.

    Args:
        index: patient index (>= 0).
        seed: cohort seed.
        cfg: phantom configuration (defaults to ``PhantomConfig()``).
        case_number: the number in its id (``Case_P<number>``; default ``index + 1``), so that a
            second cohort (an external test set) can be numbered apart from the first.
    """
    cfg = cfg or PhantomConfig()
    plan = plan_patient(index, seed, cfg)
    image, label = render_patient(plan, cfg)
    tries = 1
    # A planned scar that the pixel grid swallowed entirely is drawn again, not tiny, so a patient
    # is negative only when planned so.
    while plan.scar.pattern != "none" and not scar_region(label).any() and tries < _MAX_SCAR_TRIES:
        retry = np.random.default_rng(np.random.SeedSequence(plan.scar_seed.entropy, spawn_key=(*plan.scar_seed.spawn_key, tries)))
        plan.scar = sample_scar(retry, plan.scar.pattern, plan.heart.levels(), False, cfg.mvo_probability)
        image, label = render_patient(plan, cfg)
        tries += 1
    levels = slice_levels(label)
    trimmed = 0
    if plan.scar.territory is not None:
        # Safety net: an ischemic scar stays in its territory even where the label's LV centre or
        # slice levels differ from the plan's (drawn with a margin, so this is rare and tiny).
        stray = _outside_territory(label, levels, plan.scar.territory)
        trimmed = int(stray.sum())
        label[stray] = MYOCARDIUM
    positive = bool(scar_region(label).any())
    meta = {
        "index": index,
        "seed": seed,
        "pattern": plan.scar.pattern if positive else "none",
        "territory": plan.scar.territory if positive else None,
        "positive": positive,
        "tiny": plan.tiny and positive,
        "mvo": bool((label == 4).any()),
        "levels": levels,
        "scar_draws": tries,
        "trimmed_scar_pixels": trimmed,
        "pixel_spacing_mm": round(plan.pixel_mm, 4),
        "slice_thickness_mm": plan.slice_mm,
        "contrast": plan.contrast.summary(),
        "heart": plan.heart.params,
    }
    patient_id = f"Case_{'P' if positive else 'N'}{(index + 1 if case_number is None else case_number):03d}"
    spacing = (float(plan.slice_mm), float(plan.pixel_mm), float(plan.pixel_mm))
    return PhantomPatient(patient_id=patient_id, image=image, label=label, spacing=spacing, meta=meta)
