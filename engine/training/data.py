"""From a validated cohort to the arrays and torch datasets every model of the engine trains on.

Three layers, each usable alone:

1. :func:`build_slice_arrays`: slice records -> :class:`SliceArrays`, stacked numpy arrays of
   LV-centred crops (compact, picklable, cheap to put in the Ray object store), with per-slice
   intensity normalization and the caption of every slice (DOMAIN.md section 3).
2. Pure numpy inputs of each stage: :func:`segmentation_arrays` (reward and downstream models),
   :func:`inpainting_arrays` (generator training on positive slices, DOMAIN.md section 4),
   :func:`synthesis_candidates` (negative slices + parametric scars for the synthesis stage) and
   :func:`mix_real_and_synthetic` (the downstream training set).
3. Torch datasets with MONAI dictionary transforms, in :mod:`engine.training.datasets`
   (:class:`SegmentationDataset`, :class:`InpaintingDataset`, the :class:`EdgeMap` /
   :class:`EdgeMapd` transforms, :func:`collate`). This module imports neither torch nor MONAI
   (importing MONAI takes ~7 s of CPU): the synthesis plan, the settings and every Ray worker that
   only needs arrays start without it.

Shapes (``S`` = ``SliceDataConfig.crop_size``): images are channel-first ``[N, 1, S, S]``; labels
``[N, S, S]`` (DOMAIN labels 0-4); binary masks ``[N, 1, S, S]`` uint8 (0/1) in the numpy layers and
float ``[1, S, S]`` tensors from the datasets.

Example::

    from engine.training import datasets

    cohort = load_cohort(CohortConfig(root="data/phantom"))
    cfg = SliceDataConfig(crop_size=96)
    arrays = build_slice_arrays(cohort.records, cfg, reference_angle=120.0)
    parts = split_arrays(arrays, SplitConfig(seed=0).split(patients_in(arrays)))
    reward_train = datasets.SegmentationDataset(parts["train"], cfg, train=True, seed=0)
    generator_train = datasets.InpaintingDataset(parts["train"], cfg, train=True, seed=0)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
from scipy import ndimage

from engine.anatomy.captions import caption
from engine.anatomy.labels import VALID_LABELS, scar_region
from engine.anatomy.masks import ScarSamplerConfig, apply_scar, edge_map
from engine.io.crop import LVCentredCrop

__all__ = [
    "DownstreamData", "SliceArrays", "SliceDataConfig", "build_slice_arrays", "concat", "conditions", "derive_seed",
    "dilate_masks", "draw_synthetic", "image_label", "inpainting_arrays", "masked_image", "mix_real_and_synthetic",
    "normalize_intensity", "patients_in", "positive_weighted_sampler_weights", "segmentation_arrays", "select",
    "split_arrays", "synthesis_candidates",
]

# Levels a parametric scar can be drawn on (the apex cap has no AHA ring to place it in).
SCAR_LEVELS = ("basal", "mid", "apical")
# Largest rotation the config accepts: a basal/mid AHA segment is 60 degrees wide, so a rotation of
# 30 already moves a scar centred in one segment onto its border; beyond that captions go wrong.
MAX_ROTATE_DEGREES = 30.0


# ---------------------------------------------------------------------------------------------------
# config


@dataclass
class SliceDataConfig:
    """How slices become model inputs.

    Args:
        crop_size: side in pixels of the LV-centred crop (the window is placed from the labels).
        intensity: intensity normalization; ``"percentile"`` only.
        percentile: each crop is divided by this percentile of its own intensities and clipped to
            [0, 1]. Per slice, not per cohort: raw scanner values (0-4095) have no common scale between
            patients (coil, gain, inversion time differ), so a cohort-wide scale would put one
            patient's scar at another's blood-pool level. A high percentile rather than the maximum
            keeps a few hot pixels (fat, vessels, noise) from darkening the whole slice.
        edge_width: width in pixels of the scar edge map (:func:`engine.anatomy.edge_map`).
        mask_dilation: pixels the inpainting region extends beyond the scar (8-connected dilation).
        condition: the generator's condition: ``"edges"`` (the scar's edge map; the paper's choice,
            which beat filled masks in its ablation) or ``"mask"`` (the filled scar mask).
        caption_mode: ``"descriptive"`` (anatomy-aware) or ``"constant"`` (the ablation's fixed caption).
        augment: augment training datasets (never validation or test ones).
        rotate_degrees: largest rotation, uniform in ``[-rotate_degrees, rotate_degrees]``, at most
            30. Kept small because the caption names AHA segments, which are angular sectors about the
            LV centre: a large rotation would move the scar into segments the caption does not name.
            There is no flip at all: a mirror image swaps septum and lateral wall (the RV would lie
            on the wrong side) and reverses the counter-clockwise segment order, so every caption
            would be wrong.
        scale_range: largest relative zoom, factor uniform in ``[1 - scale_range, 1 + scale_range]``.
        intensity_jitter: largest relative intensity scaling and largest intensity shift (in units
            of the [0, 1] normalized range) of the image.
        noise_std: largest standard deviation of added Gaussian noise (normalized units).

    Example::

        SliceDataConfig(crop_size=128, condition="mask", augment=False)
    """

    crop_size: int = 96
    intensity: Literal["percentile"] = "percentile"
    percentile: float = 99.5
    edge_width: int = 1
    mask_dilation: int = 2
    condition: Literal["edges", "mask"] = "edges"
    caption_mode: Literal["descriptive", "constant"] = "descriptive"
    augment: bool = True
    rotate_degrees: float = 10.0
    scale_range: float = 0.1
    intensity_jitter: float = 0.1
    noise_std: float = 0.02

    def __post_init__(self) -> None:
        def integer(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"SliceDataConfig.{name} must be an integer >= {lo}, got {v!r}")
            setattr(self, name, int(v))

        def number(name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
            v = getattr(self, name)
            ok = not isinstance(v, bool) and isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(v)
            ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
            if not ok:
                interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
                raise ValueError(f"SliceDataConfig.{name} must be a number in {interval}, got {v!r}")
            setattr(self, name, float(v))

        integer("crop_size", 16)
        integer("edge_width", 1)
        integer("mask_dilation", 0)
        for name, allowed in (("intensity", ("percentile",)), ("condition", ("edges", "mask")),
                              ("caption_mode", ("descriptive", "constant"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"SliceDataConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.augment, bool):
            raise ValueError(f"SliceDataConfig.augment must be true or false, got {self.augment!r}")
        number("percentile", 0.0, 100.0, lo_open=True)
        number("rotate_degrees", 0.0, MAX_ROTATE_DEGREES)
        number("scale_range", 0.0, 0.5, hi_open=True)
        number("intensity_jitter", 0.0, 1.0, hi_open=True)
        number("noise_std", 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# slice arrays


@dataclass(eq=False)  # arrays inside: identity equality
class SliceArrays:
    """Stacked LV-centred slices of a cohort (or of part of one), ``N`` slices of side ``S``.

    Attributes:
        image: float32 [N, 1, S, S], per-slice normalized to [0, 1] (see ``SliceDataConfig.percentile``).
        label: uint8 [N, S, S], DOMAIN labels 0-4.
        level: "basal", "mid", "apical" or "apex" per slice (apex slices are kept for segmentation;
            no scar is ever synthesized on them).
        source: "patient/slice" per slice (:attr:`engine.io.cohort.SliceRecord.source`).
        patient_id: patient per slice.
        caption: caption of each cropped label (:func:`engine.anatomy.caption`).
        positive: bool [N], the slice holds scar (labels 3 or 4).
        pixel_area_mm2: float32 [N], in-plane area of one pixel.
    """

    image: np.ndarray
    label: np.ndarray
    level: list[str]
    source: list[str]
    patient_id: list[str]
    caption: list[str]
    positive: np.ndarray
    pixel_area_mm2: np.ndarray

    def __post_init__(self) -> None:
        self.image = np.asarray(self.image, dtype=np.float32)
        self.label = np.asarray(self.label, dtype=np.uint8)
        self.positive = np.asarray(self.positive, dtype=bool)
        self.pixel_area_mm2 = np.asarray(self.pixel_area_mm2, dtype=np.float32)
        for name in ("level", "source", "patient_id", "caption"):
            setattr(self, name, list(getattr(self, name)))
        n = self.image.shape[0] if self.image.ndim == 4 else -1
        if self.image.ndim != 4 or self.image.shape[1] != 1 or self.image.shape[2] != self.image.shape[3]:
            raise ValueError(f"SliceArrays.image must be [N, 1, S, S], got shape {self.image.shape}")
        if self.label.shape != (n, *self.image.shape[2:]):
            raise ValueError(f"SliceArrays.label must be [N, S, S] = {(n, *self.image.shape[2:])}, got {self.label.shape}")
        for name in ("level", "source", "patient_id", "caption", "positive", "pixel_area_mm2"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"SliceArrays.{name} has {len(getattr(self, name))} entries for {n} slices")

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @property
    def crop_size(self) -> int:
        return int(self.image.shape[-1])


def normalize_intensity(image: np.ndarray, percentile: float) -> np.ndarray:
    """``image / percentile(image)`` clipped to [0, 1], float32 (one slice; see :class:`SliceDataConfig`).

    Raises:
        ValueError: the percentile is not positive (an empty, all-zero slice), so there is no scale.
    """
    scale = float(np.percentile(image, percentile))
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"the {percentile} percentile of the slice is {scale}: no intensity scale (empty slice?)")
    return np.clip(np.asarray(image, dtype=np.float32) / np.float32(scale), 0.0, 1.0)


def build_slice_arrays(records: Sequence, cfg: SliceDataConfig | None = None, reference_angle: float = 120.0) -> SliceArrays:
    """LV-centred crops, normalized images and captions of slice records, stacked.

    Args:
        records: :class:`engine.io.cohort.SliceRecord` s (anything with ``image``, ``label``, ``level``,
            ``patient_id``, ``source`` and ``spacing``).
        cfg: crop size, normalization and caption mode.
        reference_angle: the cohort's AHA reference angle (``CohortConfig.reference_angle``).

    Raises:
        ValueError: no records; or a slice whose crop fails (no LV, the window cuts part of the heart
            off, no intensity scale), named by its source. Nothing is skipped silently.
    """
    cfg = cfg or SliceDataConfig()
    records = list(records)
    if not records:
        raise ValueError("build_slice_arrays: no slice records given")
    cropper = LVCentredCrop(cfg.crop_size)
    n, s = len(records), cfg.crop_size
    image = np.empty((n, 1, s, s), np.float32)
    label = np.empty((n, s, s), np.uint8)
    captions, area = [], np.empty(n, np.float32)
    for i, r in enumerate(records):
        try:
            lab = np.asarray(r.label, dtype=np.uint8)
            crop_label, box = cropper(lab)
            heart = int(np.count_nonzero(lab))
            if np.count_nonzero(crop_label) != heart:
                raise ValueError(f"the {s}-pixel crop cuts {heart - np.count_nonzero(crop_label)} of {heart} "
                                 "labelled pixels off; raise crop_size")
            image[i, 0] = normalize_intensity(cropper.apply_box(np.asarray(r.image, np.float32), box), cfg.percentile)
            label[i] = crop_label
            captions.append(caption(crop_label, r.level, reference_angle, cfg.caption_mode))
        except ValueError as e:
            raise ValueError(f"slice {r.source}: {e}") from e
        area[i] = float(r.spacing[0]) * float(r.spacing[1])
    return SliceArrays(
        image=image, label=label, level=[r.level for r in records], source=[r.source for r in records],
        patient_id=[r.patient_id for r in records], caption=captions,
        positive=scar_region(label).any(axis=(1, 2)), pixel_area_mm2=area,
    )


def _indices(n: int, mask_or_indices: Any) -> np.ndarray:
    sel = np.asarray(mask_or_indices)
    if sel.dtype == bool:
        if sel.shape != (n,):
            raise ValueError(f"boolean selection must have shape ({n},), got {sel.shape}")
        return np.flatnonzero(sel)
    if sel.size == 0:
        return np.zeros(0, np.int64)
    if not np.issubdtype(sel.dtype, np.integer) or sel.ndim != 1:
        raise ValueError(f"selection must be a boolean mask or 1D integer indices, got dtype {sel.dtype}, shape {sel.shape}")
    if sel.min() < -n or sel.max() >= n:
        raise IndexError(f"selection index out of range for {n} slices")
    return sel % n


def select(arrays: SliceArrays, mask_or_indices: Any) -> SliceArrays:
    """The slices chosen by a boolean mask [N] or integer indices, in that order (a copy)."""
    idx = _indices(len(arrays), mask_or_indices)
    return SliceArrays(**{
        f.name: (getattr(arrays, f.name)[idx] if isinstance(getattr(arrays, f.name), np.ndarray)
                 else [getattr(arrays, f.name)[i] for i in idx])
        for f in fields(SliceArrays)
    })


def concat(parts: Iterable[SliceArrays]) -> SliceArrays:
    """Slices of several :class:`SliceArrays` one after the other (same crop size)."""
    parts = list(parts)
    if not parts:
        raise ValueError("concat: nothing to concatenate")
    sizes = {p.crop_size for p in parts}
    if len(sizes) > 1:
        raise ValueError(f"concat: crop sizes differ {sorted(sizes)}")
    return SliceArrays(**{
        f.name: (np.concatenate([getattr(p, f.name) for p in parts]) if isinstance(getattr(parts[0], f.name), np.ndarray)
                 else [v for p in parts for v in getattr(p, f.name)])
        for f in fields(SliceArrays)
    })


def patients_in(arrays: SliceArrays) -> dict[str, bool]:
    """Patient id -> positive (any of its slices here holds scar), ids sorted; the input of
    :func:`engine.io.splits.split_patients`."""
    out: dict[str, bool] = {}
    for pid, pos in zip(arrays.patient_id, arrays.positive):
        out[pid] = out.get(pid, False) or bool(pos)
    return dict(sorted(out.items()))


def split_arrays(arrays: SliceArrays, splits: Mapping[str, Sequence[str]]) -> dict[str, SliceArrays]:
    """Slices grouped by the split of their patient (``{"train": [ids], ...}``), as
    :func:`engine.io.splits.split_records` does for records.

    Raises:
        ValueError: a patient is in several splits, or a slice's patient is in none.
    """
    where: dict[str, str] = {}
    for name, ids in splits.items():
        for pid in ids:
            if where.setdefault(pid, name) != name:
                raise ValueError(f"patient {pid!r} is in both the {where[pid]!r} and {name!r} splits")
    missing = sorted({pid for pid in arrays.patient_id if pid not in where})
    if missing:
        raise ValueError(f"patients in no split: {missing}")
    of = np.array([where[pid] for pid in arrays.patient_id], dtype=object)
    return {name: select(arrays, of == name) for name in splits}


# ---------------------------------------------------------------------------------------------------
# stage inputs (numpy)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, stable across processes and Python versions (hashlib, not ``hash()``,
    which is salted per process)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def dilate_masks(masks: np.ndarray, pixels: int) -> np.ndarray:
    """Binary masks [..., H, W] grown by ``pixels`` (8-connected, as the edge maps are); 0 -> a copy."""
    masks = np.asarray(masks, dtype=bool)
    if pixels <= 0:
        return masks.copy()
    structure = np.ones((1,) * (masks.ndim - 2) + (3, 3), bool)
    return ndimage.binary_dilation(masks, structure=structure, iterations=pixels)


def conditions(scar: np.ndarray, cfg: SliceDataConfig) -> np.ndarray:
    """The generator's condition for scar masks [N, H, W]: edge maps, or the filled masks."""
    if cfg.condition == "mask":
        return scar.copy()
    return np.stack([edge_map(m, cfg.edge_width) for m in scar]) if len(scar) else scar.copy()


def masked_image(image, mask):
    """The image with the inpainting region blanked: ``image * (1 - mask)``, i.e. 0 (mid grey in the
    generator's [-1, 1] range, the diffusers inpainting convention). numpy or torch, any matching shape."""
    return image * (1 - mask)


def segmentation_arrays(arrays: SliceArrays) -> dict[str, np.ndarray]:
    """Inputs of the segmentation models (reward and downstream): ``image`` float32 [N, 1, S, S] in
    [0, 1] and ``label`` uint8 [N, S, S]."""
    return {"image": arrays.image, "label": arrays.label}


def inpainting_arrays(arrays: SliceArrays, cfg: SliceDataConfig | None = None) -> dict[str, Any]:
    """Generator training inputs from the positive slices (DOMAIN.md section 4); others are left out.

    Returns:
        ``image`` float32 [P, 1, S, S] in [-1, 1]; ``scar`` uint8 [P, 1, S, S], the scar target {3, 4};
        ``mask`` uint8 [P, 1, S, S], the inpainting region: the scar dilated by ``mask_dilation``
        pixels. The dilation is deliberately not restricted to the myocardium: the ring it adds may
        reach the cavity or the tissue outside the heart, and that is part of what the model must
        fill, so it learns the scar's border with its surroundings (partial volume, grey zone)
        instead of seeing it in the unmasked context. ``condition`` uint8 [P, 1, S, S]: the scar's
        edge map (``edge_width``), or the filled scar when ``condition == "mask"``;
        ``masked_image`` float32 [P, 1, S, S] (:func:`masked_image`); ``label`` uint8 [P, S, S];
        ``caption``, ``source`` and ``level``: lists of P strings.

    Raises:
        ValueError: no positive slice.
    """
    cfg = cfg or SliceDataConfig()
    pos = select(arrays, arrays.positive)
    if len(pos) == 0:
        raise ValueError(f"inpainting_arrays: none of the {len(arrays)} slices is positive (holds scar)")
    scar = scar_region(pos.label)
    mask = dilate_masks(scar, cfg.mask_dilation)
    image = pos.image * np.float32(2.0) - np.float32(1.0)
    return {
        "image": image,
        "scar": scar[:, None].astype(np.uint8),
        "mask": mask[:, None].astype(np.uint8),
        "condition": conditions(scar, cfg)[:, None].astype(np.uint8),
        "masked_image": masked_image(image, mask[:, None].astype(np.float32)),
        "label": pos.label,
        "caption": pos.caption,
        "source": pos.source,
        "level": pos.level,
    }


def synthesis_candidates(
    arrays: SliceArrays, sampler_cfg: ScarSamplerConfig | None = None, k: int = 1, seed: int = 0,
    reference_angle: float = 120.0, cfg: SliceDataConfig | None = None,
) -> dict[str, Any]:
    """Inputs of the synthesis stage: ``k`` parametric scars on each negative slice (DOMAIN.md section 4).

    The synthesis plan's candidates (:mod:`engine.synthesis.plan`), all at once: candidate ``draw`` of
    slice ``source`` has the sample id ``f"{source}#{draw}@{seed}"`` and draws its scar with the seed
    ``derive_seed(seed, source, draw)``, so it depends only on that slice, the seed and the draw:
    never on which other slices are present or their order. Rows are sorted by patient, slice
    number and draw.

    Every requested id ends up either in the candidates or in ``skipped``: negative apex slices (no
    AHA ring to place a scar in) and draws where no scar fits (:func:`engine.anatomy.sample_scar`
    gives up) are listed there with the reason. Positive slices are not negatives and take no part.

    Args:
        arrays: the slices (negative ones are used).
        sampler_cfg: the scar distribution.
        k: candidates per negative slice (>= 1).
        seed: the synthesis seed.
        reference_angle: the cohort's AHA reference angle.
        cfg: edge width, mask dilation, condition kind and caption mode (as in training).

    Returns:
        ``sample_id``, ``source``, ``patient_id``, ``level``, ``caption`` (of the resulting label):
        lists of M strings; ``seed`` int64 [M] (also usable for the diffusion noise); ``spec``: M
        dicts (:class:`engine.anatomy.ScarSpec` fields); ``image`` float32 [M, 1, S, S] in [-1, 1]
        (the negative slice); ``scar`` uint8 [M, 1, S, S] (the ellipsoid mask, inside the
        myocardium); ``label`` uint8 [M, S, S] (the slice's label with the scar applied);
        ``condition`` and ``mask`` uint8 [M, 1, S, S] (as in :func:`inpainting_arrays`);
        ``masked_image`` float32 [M, 1, S, S]; ``pixel_area_mm2`` float32 [M]; ``skipped``: dicts
        ``{"sample_id", "source", "reason"}``.
    """
    import json

    from engine.synthesis.plan import build_shard_inputs, make_plan

    cfg = cfg or SliceDataConfig()
    sampler_cfg = sampler_cfg or ScarSamplerConfig()
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"synthesis_candidates: k must be an integer >= 1, got {k!r}")
    plan = make_plan(arrays, int(k), seed)
    inputs = build_shard_inputs(plan.slices, plan.jobs, seed, sampler_cfg, cfg, reference_angle)
    meta = json.loads(inputs["meta"])
    made = np.asarray([not reason for reason in meta["skip_reason"]], bool)
    skipped = list(plan.skipped) + [{"sample_id": i, "source": src, "reason": r}
                                    for i, src, r in zip(meta["sample_id"], meta["source"], meta["skip_reason"]) if r]
    rows = plan.jobs[made, 0]
    slices, scar = plan.slices, inputs["scar"][made]
    s = slices.crop_size
    label = (np.stack([apply_scar(slices.label[r], m[0] > 0) for r, m in zip(rows, scar)]) if len(rows)
             else np.zeros((0, s, s), np.uint8))
    kept = lambda key: [v for v, m in zip(meta[key], made) if m]  # noqa: E731
    return {
        "sample_id": kept("sample_id"),
        "source": kept("source"),
        "patient_id": [slices.patient_id[r] for r in rows],
        "level": [slices.level[r] for r in rows],
        "seed": np.asarray(meta["seed"], np.int64).reshape(-1)[made],
        "spec": [json.loads(spec) for spec in kept("spec")],
        "image": inputs["image"][made],
        "scar": scar,
        "label": label,
        "condition": inputs["condition"][made],
        "mask": inputs["mask"][made],
        "masked_image": inputs["masked_image"][made],
        "caption": kept("caption"),
        "pixel_area_mm2": slices.pixel_area_mm2[rows],
        "skipped": skipped,
    }


# ---------------------------------------------------------------------------------------------------
# downstream data


@dataclass(eq=False)
class DownstreamData:
    """The downstream segmentation training set: real slices, optionally followed by synthetic ones.

    Attributes:
        image: float32 [N, 1, S, S] in [0, 1].
        label: uint8 [N, S, S], DOMAIN labels (a synthetic sample's scar is the filter's prediction).
        source: "patient/slice" of a real slice; the sample id (or ``"synthetic#i"``) of a synthetic one.
        synthetic: bool [N].
    """

    image: np.ndarray
    label: np.ndarray
    source: list[str]
    synthetic: np.ndarray

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @property
    def positive(self) -> np.ndarray:
        """bool [N]: the slice holds scar."""
        return scar_region(self.label).any(axis=(1, 2))


def _check_segmentation_pair(image: np.ndarray, label: np.ndarray, what: str) -> None:
    if image.ndim != 4 or image.shape[1] != 1 or label.shape != (image.shape[0], *image.shape[2:]):
        raise ValueError(f"{what}: expected image [N, 1, S, S] and label [N, S, S], got {image.shape} and {label.shape}")


def draw_synthetic(available: int, n: int, seed: int = 0, what: str = "synthetic samples") -> np.ndarray:
    """Sorted positions of ``n`` of ``available`` synthetic samples, drawn without replacement; the
    draw depends only on the seed and ``available``. A caller that draws before reading (the
    downstream driver: only the drawn images are read from the store) and
    :func:`mix_real_and_synthetic` (over the samples it is given) draw the same samples.

    Raises:
        ValueError: more asked for than available (both numbers and ``what`` in the message).
    """
    if n > available:
        raise ValueError(f"asked for {n} synthetic samples but only {available} {what} are available")
    rng = np.random.default_rng(derive_seed("mix_real_and_synthetic", seed))
    return np.sort(rng.choice(available, size=int(n), replace=False))


def mix_real_and_synthetic(real: SliceArrays, synthetic: Mapping[str, Any] | None, n_synthetic: int, seed: int = 0) -> DownstreamData:
    """Real slices plus ``n_synthetic`` synthetic ones drawn without replacement.

    Args:
        real: the real training slices.
        synthetic: ``image`` [M, 1, S, S] in [0, 1] and ``label`` [M, S, S] (0-4) numpy arrays;
            optional ``sample_id`` (or ``source``) [M] to name them and ``passed`` bool [M]: when
            present only passed samples are available (those that failed the quality filter never
            train the downstream model).
        n_synthetic: how many synthetic samples to add (0: real only; ``synthetic`` may be None).
        seed: the draw depends only on the seed and the available samples.

    Raises:
        ValueError: more synthetic samples asked for than available (both numbers in the message),
            or arrays of the wrong shape, range or crop size.
    """
    if isinstance(n_synthetic, bool) or not isinstance(n_synthetic, (int, np.integer)) or n_synthetic < 0:
        raise ValueError(f"n_synthetic must be an integer >= 0, got {n_synthetic!r}")
    real_part = DownstreamData(real.image, real.label, list(real.source), np.zeros(len(real), bool))
    if n_synthetic == 0:
        return real_part
    if synthetic is None:
        raise ValueError(f"n_synthetic = {n_synthetic} but no synthetic data was given")
    image = np.asarray(synthetic["image"])
    label = np.asarray(synthetic["label"])
    _check_segmentation_pair(image, label, "synthetic data")
    if image.shape[-1] != real.crop_size:
        raise ValueError(f"synthetic crop size {image.shape[-1]} differs from the real one {real.crop_size}")
    names = synthetic.get("sample_id", synthetic.get("source"))
    names = [str(x) for x in names] if names is not None else [f"synthetic#{i}" for i in range(len(image))]
    available = np.arange(len(image))
    what = "synthetic samples"
    if "passed" in synthetic:
        available = np.flatnonzero(np.asarray(synthetic["passed"], dtype=bool))
        what = f"synthetic samples that passed the filter (of {len(image)})"
    chosen = available[draw_synthetic(len(available), int(n_synthetic), seed, what)]
    syn_image = image[chosen].astype(np.float32)
    syn_label = label[chosen]
    if syn_image.min() < 0 or syn_image.max() > 1 or not np.isfinite(syn_image).all():
        raise ValueError(f"synthetic images must lie in [0, 1], got [{syn_image.min()}, {syn_image.max()}]")
    if np.isin(syn_label, VALID_LABELS, invert=True).any():
        raise ValueError(f"synthetic labels must be in {VALID_LABELS}, got {np.unique(syn_label).tolist()}")
    return DownstreamData(
        image=np.concatenate([real.image, syn_image]),
        label=np.concatenate([real.label, syn_label.astype(np.uint8)]),
        source=list(real.source) + [names[i] for i in chosen],
        synthetic=np.concatenate([np.zeros(len(real), bool), np.ones(len(chosen), bool)]),
    )


def image_label(data: Any) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) of SliceArrays, DownstreamData or a mapping with those keys."""
    if isinstance(data, Mapping):
        image, label = np.asarray(data["image"]), np.asarray(data["label"])
    else:
        image, label = np.asarray(data.image), np.asarray(data.label)
    _check_segmentation_pair(image, label, "segmentation data")
    return image, label


def positive_weighted_sampler_weights(data: Any) -> np.ndarray:
    """Per-slice weights (float64 [N], summing to 1) under which positive and negative slices are
    drawn equally often: each positive slice gets ``0.5 / n_positive``, each negative ``0.5 / n_negative``.
    For ``torch.utils.data.WeightedRandomSampler``; keeps a downstream model on data with few scar
    slices from collapsing to "no scar".

    Raises:
        ValueError: no positive or no negative slice (nothing to balance).
    """
    _, label = image_label(data)
    positive = scar_region(label).any(axis=(1, 2))
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"cannot balance classes: {n_pos} positive and {n_neg} negative slices")
    return np.where(positive, 0.5 / n_pos, 0.5 / n_neg)
