"""Transmural extent of scar along radial lines, per AHA segment (DOMAIN.md section 2).

The myocardium is cut into thin angular sectors ("rays", ``RAY_WIDTH_DEGREES`` wide) about the LV
centre, and every ray is split by AHA segment, so each (ray, segment) bin holds one segment's
pixels only. In a bin the transmural extent of scar is the share of the wall's radial length that
holds scar. Pixels are weighted by ``1 / r`` (r the distance to the LV centre): in polar
coordinates the area element is ``r dr dtheta``, so the weighted share is the share of radial
length, not of area, and outer layers do not count more than inner ones.

A segment's transmurality is a high but robust statistic of its scarred bins, as in visual
segmental scoring (how far through the wall the enhancement reaches), without the upward bias of a
maximum: a ray is about one pixel wide at the endocardium, so a single ray's extent is off by up to
~0.1 (the pixel staircase of the scar's outer edge), and the largest of a segment's ~16 rays picks
that tail (a uniform band of 0.20 read 0.28). Two steps: each scarred bin's extent becomes the
median of itself and its scarred neighbours along the angle in the same segment (a single noisy ray
is outvoted, a scar two rays wide is kept), then the segment's value is the 75th percentile of those,
weighted by each bin's scar (the extent reached by the quarter of the segment's scar that runs
deepest). A uniform band of fraction f on walls 8-15 pixels thick reads f to within ~0.03 on
average (single cases up to ~0.1 on an 8-pixel wall, the band edge's staircase); a focal transmural
scar still reads transmural from about 10 degrees wide alone, or 12 on top of a thinner band; a scar
under two rays wide cannot be resolved and reads lower.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.anatomy.aha import segment_of_angle
from engine.anatomy.geometry import heart_box, lv_centre, polar_angle, radial_depth
from engine.anatomy.labels import MVO, myocardium_region, scar_region

# 3.75 degrees divides 60 (basal and mid segments) and 45 and 90 (apical segments, whose boundaries
# sit at 45 + 90k), so at any reference angle every segment boundary is a ray boundary; a pixel the
# angle's rounding puts on the other side still counts for its own segment (bins are per segment).
RAY_WIDTH_DEGREES = 3.75
N_RAYS = int(round(360.0 / RAY_WIDTH_DEGREES))
_SEGMENT_SLOTS = 18  # segment numbers 0-17: a bin is ``ray * _SEGMENT_SLOTS + segment``
SEGMENT_PERCENTILE = 75.0

# The clinical 5-point scale of transmural extent.
TRANSMURALITY_CLASSES = ("0%", "1-25%", "26-50%", "51-75%", "76-100%")


def transmurality_class(fraction: float) -> str:
    """Map a transmural fraction in [0, 1] to the 5-point scale (0%, 1-25%, 26-50%, 51-75%, 76-100%).

    Boundaries are inclusive upward in whole percent: 0.25 -> "1-25%", 0.26 -> "26-50%"; any scar
    (fraction > 0) is at least "1-25%".
    """
    if not np.isfinite(fraction) or fraction < 0 or fraction > 1 + 1e-9:
        raise ValueError(f"transmural fraction must be in [0, 1], got {fraction}")
    if fraction <= 0:
        return TRANSMURALITY_CLASSES[0]
    percent = fraction * 100.0
    for upper, name in zip((25.0, 50.0, 75.0), TRANSMURALITY_CLASSES[1:4]):
        if percent <= upper + 1e-9:
            return name
    return TRANSMURALITY_CLASSES[4]


@dataclass(frozen=True)
class ScarAnatomy:
    """What a slice's scar is, anatomically (the input to a caption).

    Attributes:
        segments: AHA segments holding scar, sorted; a segment counts when it holds at least
            ``min_segment_share`` of the slice's scar (radially weighted), the largest always counts.
        segment_extent: transmural extent (0-1) per segment holding any scar.
        transmurality: the largest extent over the listed segments.
        layer: where the scar sits, by DOMAIN.md's thirds of the wall, from the median over its
            rays of its innermost and outermost depth: "subendocardial" (its inner edge in the
            inner third), "subepicardial" (else its outer edge in the outer third), "mid-wall"
            (neither), or "transmural" (extent class 76-100%).
        mvo: whether the slice holds microvascular obstruction (label 4).
    """

    segments: tuple[int, ...]
    segment_extent: dict[int, float]
    transmurality: float
    layer: str
    mvo: bool

    @property
    def transmurality_class(self) -> str:
        return transmurality_class(self.transmurality)


def _rays(label: np.ndarray, level: str, reference_angle: float):
    """Per-pixel ray index, segment, radial weight, depth and scar flag of the myocardium pixels."""
    box = heart_box(label, margin=2)
    centre = lv_centre(label)
    if box is None or centre is None:
        return None
    sub = np.asarray(label)[box.slices()]
    myo = myocardium_region(sub)
    if not myo.any():
        return None
    angle = polar_angle(sub.shape, centre, offset=(box.r0, box.c0))[myo]
    rows, cols = np.nonzero(myo)
    r = np.hypot(rows + box.r0 - centre[0], cols + box.c0 - centre[1])
    depth = radial_depth(sub)[myo]
    # Rays are aligned to the segment grid (see RAY_WIDTH_DEGREES); ``% N_RAYS`` because a float
    # modulo can return 360.0.
    offset = (reference_angle - 120.0) % RAY_WIDTH_DEGREES
    ray = np.floor(((angle - offset) % 360.0) / RAY_WIDTH_DEGREES).astype(np.int64) % N_RAYS
    segment = segment_of_angle(angle, level, reference_angle).astype(np.int64)
    weight = 1.0 / np.maximum(r, 0.5)
    scar = scar_region(sub)[myo]
    return ray, segment, weight, depth, scar, bool((sub == MVO).any())


def _weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The smallest value whose cumulative weight (values sorted ascending) reaches ``q`` percent."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, q / 100.0 * cumulative[-1])])


def segment_transmurality(label: np.ndarray, level: str, reference_angle: float = 120.0) -> dict[int, float]:
    """Transmural extent (0-1) of scar in every AHA segment of the slice that holds scar.

    Args:
        label: 2D label slice (DOMAIN labels), engine orientation.
        level: "basal", "mid", "apical" or "apex".
        reference_angle: anterior RV insertion angle, degrees.

    Returns:
        ``{segment: extent}`` for segments with any scar pixel; empty for a negative slice.
    """
    return describe_scar(label, level, reference_angle).segment_extent


def describe_scar(
    label: np.ndarray, level: str, reference_angle: float = 120.0, min_segment_share: float = 0.1
) -> ScarAnatomy:
    """Segments, per-segment transmural extent, layer and MVO of the scar in a 2D label slice."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"describe_scar expects a 2D label slice, got shape {label.shape}")
    rays = _rays(label, level, reference_angle)
    if rays is None or not rays[4].any():
        return ScarAnatomy((), {}, 0.0, "", bool(rays[5]) if rays else False)
    ray, segment, weight, depth, scar, mvo = rays
    # One bin per (ray, segment): a ray crossing a segment boundary is split, so a segment's extent
    # only ever uses its own pixels.
    shape = (N_RAYS, _SEGMENT_SLOTS)
    bin_of = ray * _SEGMENT_SLOTS + segment
    wall = np.bincount(bin_of, weights=weight, minlength=N_RAYS * _SEGMENT_SLOTS).reshape(shape)
    scarred = np.bincount(bin_of[scar], weights=weight[scar], minlength=N_RAYS * _SEGMENT_SLOTS).reshape(shape)
    hit = scarred > 0
    extent = np.where(hit, scarred / np.where(wall > 0, wall, 1.0), np.nan)
    # Median of each scarred bin and its scarred neighbours along the angle in the same segment
    # (NaN elsewhere, which nanmedian skips; the bin itself is never NaN).
    neighbours = np.stack([np.roll(extent, 1, axis=0), extent, np.roll(extent, -1, axis=0)])
    smoothed = np.nanmedian(neighbours[:, hit], axis=0)
    bin_segment = np.nonzero(hit)[1]
    bin_scar = scarred[hit]

    segment_extent = {
        int(s): _weighted_percentile(smoothed[bin_segment == s], bin_scar[bin_segment == s], SEGMENT_PERCENTILE)
        for s in np.unique(bin_segment)
    }
    share = {s: float(weight[scar & (segment == s)].sum()) for s in segment_extent}
    total = sum(share.values())
    largest = max(share, key=share.get)
    segments = tuple(sorted(s for s in segment_extent if share[s] >= min_segment_share * total or s == largest))
    transmurality = max(segment_extent[s] for s in segments)

    finite = scar & np.isfinite(depth)
    if transmurality_class(min(transmurality, 1.0)) == TRANSMURALITY_CLASSES[-1]:
        layer = "transmural"
    elif finite.any():
        # Where the scar sits along each scarred (ray, segment) bin: its innermost and outermost depth.
        inner = np.full(N_RAYS * _SEGMENT_SLOTS, np.inf)
        outer = np.full(N_RAYS * _SEGMENT_SLOTS, -np.inf)
        np.minimum.at(inner, bin_of[finite], depth[finite])
        np.maximum.at(outer, bin_of[finite], depth[finite])
        reached = np.isfinite(inner)
        if np.median(inner[reached]) < 1 / 3:
            layer = "subendocardial"
        elif np.median(outer[reached]) >= 2 / 3:
            layer = "subepicardial"
        else:
            layer = "mid-wall"
    else:  # no cavity, so depth is undefined: only the extent is known
        layer = "transmural" if transmurality > 0.75 else "subendocardial"
    return ScarAnatomy(segments, segment_extent, min(transmurality, 1.0), layer, mvo)
