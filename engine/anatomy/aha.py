"""AHA 17-segment model on short-axis slices (Cerqueira et al., Circulation 2002; DOMAIN.md section 2).

Ranges are for the idealized geometry, anterior RV insertion at 120 degrees; a different reference
angle rotates every range by ``reference_angle - 120``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from engine.anatomy.geometry import heart_box, lv_centre, polar_angle
from engine.anatomy.labels import cavity_region, myocardium_region

LEVELS = ("basal", "mid", "apical", "apex")

SEGMENT_NAMES = {
    1: "basal anterior", 2: "basal anteroseptal", 3: "basal inferoseptal",
    4: "basal inferior", 5: "basal inferolateral", 6: "basal anterolateral",
    7: "mid anterior", 8: "mid anteroseptal", 9: "mid inferoseptal",
    10: "mid inferior", 11: "mid inferolateral", 12: "mid anterolateral",
    13: "apical anterior", 14: "apical septal", 15: "apical inferior", 16: "apical lateral",
    17: "apex",
}

LEVEL_SEGMENTS = {
    "basal": (1, 2, 3, 4, 5, 6),
    "mid": (7, 8, 9, 10, 11, 12),
    "apical": (13, 14, 15, 16),
    "apex": (17,),
}

# Coronary territories (DOMAIN.md section 2).
TERRITORIES = {
    "LAD": (1, 2, 7, 8, 13, 14, 17),
    "RCA": (3, 4, 9, 10, 15),
    "LCx": (5, 6, 11, 12, 16),
}


def _check_level(level: str) -> None:
    if level not in LEVEL_SEGMENTS:
        raise ValueError(f"unknown slice level {level!r}; expected one of {LEVELS}")


def segment_of_angle(angle: np.ndarray | float, level: str, reference_angle: float = 120.0) -> np.ndarray:
    """AHA segment number of polar angle(s) in degrees at a slice level.

    basal/mid: six 60-degree sectors, the first (anterior) spanning [60, 120) at reference 120;
    apical: four 90-degree sectors, anterior [45, 135); apex: 17.
    """
    _check_level(level)
    a = (np.asarray(angle, dtype=np.float64) - (reference_angle - 120.0)) % 360.0
    if level == "apex":
        return np.full(a.shape, 17, dtype=np.uint8)
    if level == "apical":
        return (np.floor((a - 45.0) / 90.0).astype(np.int64) % 4 + 13).astype(np.uint8)
    first = LEVEL_SEGMENTS[level][0]
    return (np.floor((a - 60.0) / 60.0).astype(np.int64) % 6 + first).astype(np.uint8)


def segment_centre_angle(segment: int, reference_angle: float = 120.0) -> float:
    """Centre angle (degrees, [0, 360)) of an AHA segment 1-16 at the given reference angle."""
    if 1 <= segment <= 12:
        k = (segment - 1) % 6
        centre = 90.0 + 60.0 * k
    elif 13 <= segment <= 16:
        centre = 90.0 + 90.0 * (segment - 13)
    else:
        raise ValueError(f"segment {segment} has no angular range (expected 1-16)")
    return (centre + reference_angle - 120.0) % 360.0


def segment_half_width(segment: int) -> float:
    """Half the angular span of a segment in degrees (30 for basal/mid, 45 for apical)."""
    if 1 <= segment <= 12:
        return 30.0
    if 13 <= segment <= 16:
        return 45.0
    raise ValueError(f"segment {segment} has no angular range (expected 1-16)")


def level_of_segment(segment: int) -> str:
    for level, segments in LEVEL_SEGMENTS.items():
        if segment in segments:
            return level
    raise ValueError(f"segment {segment} is not an AHA segment (1-17)")


def aha_segments(label: np.ndarray, level: str, reference_angle: float = 120.0) -> np.ndarray:
    """AHA segment number (1-17) of every myocardium pixel of a 2D label slice, 0 elsewhere.

    Args:
        label: 2D integer label slice (DOMAIN labels), row 0 at the top of the image.
        level: "basal", "mid", "apical" (or "apex", which maps all myocardium to 17).
        reference_angle: angle of the anterior RV insertion point in degrees (120 when idealized).

    Returns:
        uint8 array shaped like ``label``.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"aha_segments expects a 2D label slice, got shape {label.shape}")
    _check_level(level)
    out = np.zeros(label.shape, dtype=np.uint8)
    box = heart_box(label, margin=0)
    centre = lv_centre(label)
    if box is None or centre is None:
        return out
    sub = label[box.slices()]
    myo = myocardium_region(sub)
    angle = polar_angle(sub.shape, centre, offset=(box.r0, box.c0))
    out[box.slices()] = np.where(myo, segment_of_angle(angle, level, reference_angle), 0)
    return out


def slice_levels(label_stack: Sequence[np.ndarray] | np.ndarray) -> list[str | None]:
    """Level of each slice of a base-to-apex stack (DOMAIN.md section 2).

    Slices showing an LV cavity are split into basal, mid and apical thirds (``np.array_split``
    order, so a remainder goes to the basal then mid third). Slices past the last cavity slice that
    still show myocardium are "apex"; slices before the first cavity slice that show myocardium are
    "basal"; slices with no LV at all are None.
    """
    with_cavity = [bool(cavity_region(s).any()) for s in label_stack]
    with_myo = [bool(myocardium_region(s).any()) for s in label_stack]
    idx = [i for i, c in enumerate(with_cavity) if c]
    levels: list[str | None] = [None] * len(with_cavity)
    if not idx:
        return [("apex" if m else None) for m in with_myo]
    for name, part in zip(("basal", "mid", "apical"), np.array_split(np.asarray(idx), 3)):
        for i in part:
            levels[int(i)] = name
    first, last = idx[0], idx[-1]
    for i in range(len(levels)):
        if levels[i] is None and with_myo[i]:
            if i < first:
                levels[i] = "basal"
            elif i > last:
                levels[i] = "apex"
            else:  # a gap in the cavity between cavity slices: take the neighbour's level
                levels[i] = levels[i - 1]
    return levels
