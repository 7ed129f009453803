"""Parametric scar masks of the paper's inference step, a seeded sampler over plausible
configurations, and scar edge maps (DOMAIN.md section 4).

A scar mask is an ellipse in the myocardium's own polar frame (angle about the LV centre x
normalized radial depth), so it always follows the wall: an ischemic scar is an ellipse centred on
the endocardium (depth 0) whose depth half-axis is its transmural extent, a subepicardial scar is
centred on the epicardium (depth 1), a mid-wall scar on depth 0.5. Its angular half-axis sets its
size. Pixels outside the myocardium never belong to the mask.

A scar grown from a border measures depth as a share of the wall's pixels, as the caption's
transmurality does (:mod:`engine.anatomy.transmurality` counts the scar's share of the wall's pixels
along each ray), so a scar drawn at fraction h covers about h of the wall and is captioned in the
class it was drawn in (see :func:`wall_share_depth`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage

from engine.anatomy.aha import LEVEL_SEGMENTS, TERRITORIES, segment_centre_angle, segment_half_width
from engine.anatomy.geometry import heart_box, lv_centre, polar_angle, radial_depth, wall_share_depth
from engine.anatomy.labels import MYOCARDIUM, SCAR, myocardium_region

Layer = Literal["subendocardial", "mid-wall", "subepicardial"]
PATTERNS = ("ischemic", "midwall", "subepicardial")

# Depth of the ellipse centre for each layer the scar grows from.
_LAYER_CENTRE = {"subendocardial": 0.0, "mid-wall": 0.5, "subepicardial": 1.0}


@dataclass(frozen=True)
class ScarSpec:
    """Parameters of one parametric scar.

    Attributes:
        centre_angle: degrees, counter-clockwise from +x about the LV centre.
        angular_width: full angular extent in degrees (the ellipse's angular axis).
        layer: where the ellipse is centred: "subendocardial", "mid-wall" or "subepicardial".
        transmurality: radial extent as a fraction of wall thickness at the centre ray, (0, 1]: the
            share of the wall's pixels there for a subendocardial or subepicardial scar (see
            :func:`ellipsoid_scar_mask`).
        pattern: "ischemic", "midwall" or "subepicardial" (what the sampler drew).
        territory: coronary territory for ischemic scars ("LAD", "RCA", "LCx"), else "".
        segment: the AHA segment the centre was drawn in.
    """

    centre_angle: float
    angular_width: float
    layer: str
    transmurality: float
    pattern: str = "ischemic"
    territory: str = ""
    segment: int = 0

    def __post_init__(self) -> None:
        if self.layer not in _LAYER_CENTRE:
            raise ValueError(f"layer must be one of {tuple(_LAYER_CENTRE)}, got {self.layer!r}")
        if not 0.0 < self.transmurality <= 1.0:
            raise ValueError(f"transmurality must be in (0, 1], got {self.transmurality}")
        if not 0.0 < self.angular_width <= 360.0:
            raise ValueError(f"angular_width must be in (0, 360] degrees, got {self.angular_width}")


def ellipsoid_scar_mask(label: np.ndarray, spec: ScarSpec) -> np.ndarray:
    """Boolean scar mask shaped like ``label``: the myocardium pixels inside the spec's polar ellipse.

    The ellipse is ``(dtheta / a)^2 + ((d - d0) / h)^2 < 1`` with ``a`` half the angular width,
    ``d0`` the layer's centre depth (0, 0.5 or 1) and ``h`` the transmurality (halved for mid-wall,
    which grows both ways), so the centre ray spans ``transmurality`` of the wall.

    A subendocardial or subepicardial scar grows from its border with ``d`` the share of the wall's
    pixels (:func:`wall_share_depth`), the measure of the caption's transmurality: drawn at
    fraction h, its centre ray holds about ``round(h * N)`` of an N-pixel wall's pixels, and it
    reaches its border wherever it is at least half a pixel deep (a thinner scar is empty, and
    :func:`sample_scar` redraws). A mid-wall scar keeps ``radial_depth``'s ``d = e / (e + o)``: as
    a share of the pixels, one of 26-50% reaches further into the inner and outer thirds of the
    wall, and the caption names it subendocardial or subepicardial more often (sampled on walls
    6-15 pixels thick: captioned mid-wall in 85% of draws against 95%, for the same class agreement,
    0.87). A mid-wall scar's depth stays strictly between 0 and 1: it never reaches either border.
    """
    label = np.asarray(label)
    mask = np.zeros(label.shape, dtype=bool)
    box = heart_box(label, margin=2)
    centre = lv_centre(label)
    if box is None or centre is None:
        raise ValueError("cannot place a scar: the label slice shows no LV")
    sub = label[box.slices()]
    myo = myocardium_region(sub)
    depth = radial_depth(sub) if spec.layer == "mid-wall" else wall_share_depth(sub)
    if np.isnan(depth[myo]).all():
        raise ValueError("cannot place a scar: the slice has no LV cavity, so radial depth is undefined")
    angle = polar_angle(sub.shape, centre, offset=(box.r0, box.c0))
    dtheta = (angle - spec.centre_angle + 180.0) % 360.0 - 180.0
    d0 = _LAYER_CENTRE[spec.layer]
    half_depth = spec.transmurality / (2.0 if spec.layer == "mid-wall" else 1.0)
    with np.errstate(invalid="ignore"):
        inside = (dtheta / (spec.angular_width / 2.0)) ** 2 + ((depth - d0) / half_depth) ** 2 < 1.0
    mask[box.slices()] = myo & inside
    return mask


def apply_scar(label: np.ndarray, scar_mask: np.ndarray) -> np.ndarray:
    """A copy of ``label`` with the scar mask written as scar (3) inside the myocardium; scar already
    there is kept. Pixels of the mask outside the myocardium are ignored."""
    out = np.array(label, dtype=np.uint8, copy=True)
    out[np.asarray(scar_mask, dtype=bool) & (out == MYOCARDIUM)] = SCAR
    return out


def edge_map(scar_mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The boundary band of a scar mask, ``width`` pixels wide, inside the mask (the paper's
    ControlNet condition). 8-connected: with ``width=1`` it equals
    ``skimage.segmentation.find_boundaries(mask, mode="inner", connectivity=2)`` restricted to the mask."""
    if width < 1:
        raise ValueError(f"edge width must be >= 1 pixel, got {width}")
    mask = np.asarray(scar_mask, dtype=bool)
    eroded = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=width, border_value=0)
    return mask & ~eroded


@dataclass
class ScarSamplerConfig:
    """Distribution of parametric scars drawn for synthesis.

    Args:
        pattern_weights: relative weights of "ischemic", "midwall", "subepicardial".
        territory_weights: relative weights of the coronary territories for ischemic scar.
        ischemic_transmurality: (min, max) transmural fraction of ischemic scar (from the endocardium).
        nonischemic_transmurality: (min, max) for mid-wall and subepicardial scar.
        angular_width: (min, max) full angular extent in degrees.
        midwall_segments: segments where mid-wall scar is drawn (default: septal, as in
            non-ischemic cardiomyopathy).
        subepicardial_segments: segments for subepicardial scar (default: lateral and
            inferolateral, as in myocarditis).
        max_tries: draws before giving up on a slice whose wall cannot hold the scar.
        segment_weights: relative weights of the AHA segments ("1".."16") a scar is centred in,
            among those its pattern and territory allow at the slice's level (a missing segment
            weighs 1); empty: all allowed segments equally likely. ``lgesynth loop`` sets them
            toward the segments the downstream model misses. Every pattern (and, for ischemic
            scar, territory) with a positive weight needs a segment of positive weight at each
            level, or its scars there would have nowhere to go (refused; e.g. LAD on apical slices
            is segments 13 and 14).
        transmurality_weights: relative weights of the transmurality classes ("1-25%", "26-50%",
            "51-75%", "76-100%") within each pattern's range (a missing class weighs 1); empty: the
            fraction uniform over the range. Every pattern with a positive weight needs a class of
            positive weight within its range.

    Example:
        >>> cfg = ScarSamplerConfig(pattern_weights={"ischemic": 1.0, "midwall": 0.0, "subepicardial": 0.0})
    """

    pattern_weights: dict[str, float] = field(default_factory=lambda: {"ischemic": 0.7, "midwall": 0.15, "subepicardial": 0.15})
    territory_weights: dict[str, float] = field(default_factory=lambda: {"LAD": 0.4, "RCA": 0.3, "LCx": 0.3})
    ischemic_transmurality: tuple[float, float] = (0.2, 1.0)
    nonischemic_transmurality: tuple[float, float] = (0.2, 0.5)
    angular_width: tuple[float, float] = (25.0, 110.0)
    midwall_segments: tuple[int, ...] = (2, 3, 8, 9, 14)
    subepicardial_segments: tuple[int, ...] = (5, 6, 11, 12, 16)
    max_tries: int = 20
    segment_weights: dict[str, float] = field(default_factory=dict)
    transmurality_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_weights("pattern_weights", self.pattern_weights, PATTERNS)
        _check_weights("territory_weights", self.territory_weights, tuple(TERRITORIES))
        for name in ("ischemic_transmurality", "nonischemic_transmurality"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        lo, hi = self.angular_width
        if not 0.0 < lo <= hi <= 360.0:
            raise ValueError(f"angular_width must satisfy 0 < min <= max <= 360, got {(lo, hi)}")
        for name in ("midwall_segments", "subepicardial_segments"):
            bad = [s for s in getattr(self, name) if not 1 <= s <= 16]
            if bad or not getattr(self, name):
                raise ValueError(f"{name} must list AHA segments 1-16, got {getattr(self, name)}")
        if self.max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {self.max_tries}")
        if self.segment_weights:
            _check_weights("segment_weights", self.segment_weights, tuple(str(s) for s in range(1, 17)), missing=1.0)
            # Each scar that can be drawn needs a segment of positive weight at every level.
            for level in ("basal", "mid", "apical"):
                for pattern, territory in self._drawable():
                    candidates = _candidate_segments(level, pattern, territory, self)
                    if all(self.segment_weights.get(str(c), 1.0) <= 0 for c in candidates):
                        what, key = (f"ischemic {territory}", f"territory_weights[{territory!r}]") if territory \
                            else (pattern, f"pattern_weights[{pattern!r}]")
                        raise ValueError(
                            f"segment_weights: {what} scar on {level} slices is centred in segment(s) "
                            f"{', '.join(map(str, candidates))}, which all have weight 0; give one of them a "
                            f"positive weight or set {key} to 0")
        if self.transmurality_weights:
            _check_weights("transmurality_weights", self.transmurality_weights, tuple(TRANSMURALITY_BINS), missing=1.0)
            # A pattern that can be drawn needs a class of positive weight within its range, or its
            # draws would have nothing to choose from.
            for pattern in PATTERNS:
                if self.pattern_weights.get(pattern, 0.0) <= 0:
                    continue
                lo, hi = self.transmurality_range(pattern)
                classes = list(_transmurality_parts(lo, hi))
                if all(self.transmurality_weights.get(name, 1.0) <= 0 for name in classes):
                    raise ValueError(
                        f"transmurality_weights: pattern {pattern!r} draws transmurality in {[lo, hi]}, but every "
                        f"class there ({', '.join(classes)}) has weight 0; give one of them a positive weight "
                        f"or set pattern_weights[{pattern!r}] to 0")

    def _drawable(self) -> list[tuple[str, str]]:
        """The (pattern, territory) pairs a draw can pick; territory "" for non-ischemic patterns."""
        pairs = []
        for pattern in PATTERNS:
            if self.pattern_weights.get(pattern, 0.0) <= 0:
                continue
            if pattern == "ischemic":
                pairs += [(pattern, t) for t in TERRITORIES if self.territory_weights.get(t, 0.0) > 0]
            else:
                pairs.append((pattern, ""))
        return pairs

    def transmurality_range(self, pattern: str) -> tuple[float, float]:
        """(min, max) transmural fraction a pattern's scars are drawn in."""
        return self.ischemic_transmurality if pattern == "ischemic" else self.nonischemic_transmurality


# The transmurality classes a scar is drawn in (DOMAIN.md section 2's scale without 0%): (lo, hi].
TRANSMURALITY_BINS = {"1-25%": (0.0, 0.25), "26-50%": (0.25, 0.5), "51-75%": (0.5, 0.75), "76-100%": (0.75, 1.0)}


def _transmurality_parts(lo: float, hi: float) -> dict[str, tuple[float, float]]:
    """The transmurality classes overlapping [lo, hi], each with its part of the range."""
    return {name: (max(lo, a), min(hi, b)) for name, (a, b) in TRANSMURALITY_BINS.items()
            if min(hi, b) > max(lo, a) or (lo == hi and a < lo <= b)}


def _draw_transmurality(rng: np.random.Generator, lo: float, hi: float, weights: dict[str, float]) -> float:
    """A transmural fraction in [lo, hi]: uniform without ``weights``, else a class drawn by its
    weight (of those overlapping the range; ScarSamplerConfig makes sure one weighs more than 0) and
    uniform in that class's part of the range."""
    if not weights:
        return float(rng.uniform(lo, hi))
    parts = _transmurality_parts(lo, hi)
    chosen = _choose(rng, {name: weights.get(name, 1.0) for name in parts}) if len(parts) > 1 else next(iter(parts))
    return float(rng.uniform(*parts[chosen]))


def _check_weights(name: str, weights: dict[str, float], allowed: tuple[str, ...], missing: float = 0.0) -> None:
    """Refuse unknown keys, negative weights and weights all 0, a key missing from ``weights``
    weighing ``missing``."""
    unknown = set(weights) - set(allowed)
    if unknown:
        raise ValueError(f"{name}: unknown keys {sorted(unknown)}; expected some of {list(allowed)}")
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"{name}: weights must be >= 0, got {weights}")
    if sum(weights.get(k, missing) for k in allowed) <= 0:
        omitted = f" (a missing key weighs {missing:g})" if missing else ""
        raise ValueError(f"{name}: every weight is 0{omitted}, so nothing can be drawn; got {weights}")


def _choose(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = sorted(weights)
    p = np.array([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _contiguous_arc(segment: int, candidates: list[int], level: str, reference_angle: float) -> tuple[float, float]:
    """Start angle and span (degrees) of the run of angularly adjacent candidate segments holding
    ``segment``; a level's segments are numbered in counter-clockwise order, cyclically."""
    ring = list(LEVEL_SEGMENTS[level])
    allowed = set(candidates)
    i = ring.index(segment)
    n = len(ring)
    back = 0
    while back < n - 1 and ring[(i - back - 1) % n] in allowed:
        back += 1
    fwd = 0
    while back + fwd < n - 1 and ring[(i + fwd + 1) % n] in allowed:
        fwd += 1
    half = segment_half_width(segment)
    first = ring[(i - back) % n]
    return (segment_centre_angle(first, reference_angle) - half) % 360.0, 2.0 * half * (back + fwd + 1)


def _candidate_segments(level: str, pattern: str, territory: str, cfg: ScarSamplerConfig) -> list[int]:
    """The segments at ``level`` a scar of ``pattern`` (and ``territory``, ischemic) may be centred in;
    a non-ischemic pattern whose segments miss the level may use all of the level's."""
    at_level = set(LEVEL_SEGMENTS[level])
    if pattern == "ischemic":
        return sorted(at_level & set(TERRITORIES[territory]))
    allowed = cfg.midwall_segments if pattern == "midwall" else cfg.subepicardial_segments
    return sorted(at_level & set(allowed)) or sorted(at_level)


def draw_scar_spec(level: str, rng: np.random.Generator, cfg: ScarSamplerConfig, reference_angle: float = 120.0) -> ScarSpec:
    """Draw one plausible scar configuration for a slice at ``level`` ("basal", "mid" or "apical")."""
    if level not in ("basal", "mid", "apical"):
        raise ValueError(f"scars are drawn on basal, mid or apical slices, got level {level!r}")
    pattern = _choose(rng, {k: v for k, v in cfg.pattern_weights.items() if v > 0})
    territory = ""
    if pattern == "ischemic":
        territory = _choose(rng, {k: v for k, v in cfg.territory_weights.items() if v > 0})
        layer = "subendocardial"
    else:
        layer = "mid-wall" if pattern == "midwall" else "subepicardial"
    candidates = _candidate_segments(level, pattern, territory, cfg)
    lo, hi = cfg.transmurality_range(pattern)
    if cfg.segment_weights:
        weights = np.array([cfg.segment_weights.get(str(c), 1.0) for c in candidates], dtype=np.float64)
        if weights.sum() <= 0:  # ScarSamplerConfig refuses this; a config changed after it was made may not
            raise ValueError(f"segment_weights: segments {candidates} ({' '.join(filter(None, (pattern, territory)))} "
                             f"scar on {level} slices) all have weight 0")
        segment = int(candidates[int(rng.choice(len(candidates), p=weights / weights.sum()))])
    else:
        segment = int(candidates[int(rng.integers(len(candidates)))])
    # The scar stays inside the contiguous arc of allowed segments around the drawn one (a
    # territory's arc for ischemic scar), so its caption names the region it was drawn for.
    arc_start, arc_span = _contiguous_arc(segment, candidates, level, reference_angle)
    width = min(float(rng.uniform(*cfg.angular_width)), arc_span)
    centre = (arc_start + width / 2.0 + rng.uniform(0.0, arc_span - width)) % 360.0
    return ScarSpec(
        centre_angle=float(centre),
        angular_width=width,
        layer=layer,
        transmurality=_draw_transmurality(rng, lo, hi, cfg.transmurality_weights),
        pattern=pattern,
        territory=territory,
        segment=segment,
    )


def sample_scar(
    label: np.ndarray, level: str, rng: np.random.Generator, cfg: ScarSamplerConfig | None = None,
    reference_angle: float = 120.0,
) -> tuple[np.ndarray, ScarSpec]:
    """Draw a scar configuration and its mask on a (negative) label slice.

    Redraws up to ``cfg.max_tries`` times when the wall is too thin to hold the drawn scar (empty
    mask), then raises ValueError: a slice that cannot take a scar is reported, not skipped.

    Returns:
        ``(scar_mask, spec)``: a boolean mask shaped like ``label`` inside the myocardium, and its spec.
    """
    cfg = cfg or ScarSamplerConfig()
    for _ in range(cfg.max_tries):
        spec = draw_scar_spec(level, rng, cfg, reference_angle)
        mask = ellipsoid_scar_mask(label, spec)
        if mask.any():
            return mask, spec
    raise ValueError(f"no scar fits this {level} slice after {cfg.max_tries} draws (myocardium too thin or too small)")
