"""Transmural extent of scar along radial lines, per AHA segment (DOMAIN.md section 2).

The myocardium is cut into thin angular sectors ("rays") about the LV centre. Along each ray the
transmural extent of scar is the share of the wall's radial length that holds scar. Pixels are
weighted by ``1 / r`` (r the distance to the LV centre): in polar coordinates the area element is
``r dr dtheta``, so the weighted share is the share of radial length, not of area, and outer layers
do not count more than inner ones. A segment's transmurality is the largest extent over its rays,
as in visual segmental scoring (extent of hyperenhancement through the wall).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.anatomy.aha import segment_of_angle
from engine.anatomy.geometry import heart_box, lv_centre, polar_angle, radial_depth
from engine.anatomy.labels import MVO, myocardium_region, scar_region

RAY_WIDTH_DEGREES = 4.0

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
        layer: where the scar sits: "subendocardial" (reaches the endocardium), "subepicardial"
            (reaches the epicardium but not the endocardium), "mid-wall" (neither), or
            "transmural" (extent class 76-100%).
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
    # Rays are aligned to the segment grid so no ray straddles two segments.
    offset = (reference_angle - 120.0) % RAY_WIDTH_DEGREES
    ray = np.floor(((angle - offset) % 360.0) / RAY_WIDTH_DEGREES).astype(np.int64)
    segment = segment_of_angle(angle, level, reference_angle).astype(np.int64)
    weight = 1.0 / np.maximum(r, 0.5)
    scar = scar_region(sub)[myo]
    return ray, segment, weight, depth, scar, bool((sub == MVO).any())


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
    n_rays = int(round(360.0 / RAY_WIDTH_DEGREES))
    wall = np.bincount(ray, weights=weight, minlength=n_rays)
    scarred = np.bincount(ray[scar], weights=weight[scar], minlength=n_rays)
    extent = np.divide(scarred, wall, out=np.zeros_like(wall), where=wall > 0)
    ray_segment = np.zeros(n_rays, dtype=np.int64)
    ray_segment[ray] = segment

    segment_extent = {
        int(s): float(extent[(ray_segment == s) & (scarred > 0)].max()) for s in np.unique(segment[scar])
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
        # Where the scar sits along each scarred ray: its innermost and outermost depth.
        inner = np.full(n_rays, np.inf)
        outer = np.full(n_rays, -np.inf)
        np.minimum.at(inner, ray[finite], depth[finite])
        np.maximum.at(outer, ray[finite], depth[finite])
        hit = np.isfinite(inner)
        if np.median(inner[hit]) < 1 / 3:
            layer = "subendocardial"
        elif np.median(outer[hit]) >= 2 / 3:
            layer = "subepicardial"
        else:
            layer = "mid-wall"
    else:  # no cavity, so depth is undefined: only the extent is known
        layer = "transmural" if transmurality > 0.75 else "subendocardial"
    return ScarAnatomy(segments, segment_extent, min(transmurality, 1.0), layer, mvo)
