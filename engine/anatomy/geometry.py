"""Short-axis geometry: the LV centre, polar angle about it and normalized radial depth.

Orientation (the engine's one 2D convention, see `engine.io.cohort`): a slice is an array
``[row, col]`` displayed with row 0 at the top and columns increasing to the right. Angles are in
degrees, counter-clockwise from +x (to the right) about the LV centre, so "up" is decreasing row
index: ``angle = atan2(-(row - row_c), col - col_c)``, mapped to [0, 360).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

from engine.anatomy.labels import cavity_region, myocardium_region


class Box(NamedTuple):
    """A half-open pixel box ``rows [r0, r1) x cols [c0, c1)``."""

    r0: int
    r1: int
    c0: int
    c1: int

    def slices(self) -> tuple[slice, slice]:
        return slice(self.r0, self.r1), slice(self.c0, self.c1)


def heart_box(label: np.ndarray, margin: int = 2) -> Box | None:
    """Bounding box of cavity + myocardium grown by ``margin`` pixels, clipped to the image.

    None when the slice holds neither cavity nor myocardium.
    """
    label = np.asarray(label)
    rows = np.flatnonzero(np.any((label >= 1) & (label <= 4), axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(np.any((label >= 1) & (label <= 4), axis=0))
    return Box(
        max(int(rows[0]) - margin, 0),
        min(int(rows[-1]) + 1 + margin, label.shape[0]),
        max(int(cols[0]) - margin, 0),
        min(int(cols[-1]) + 1 + margin, label.shape[1]),
    )


def lv_centre(label: np.ndarray) -> tuple[float, float] | None:
    """LV centre ``(row, col)``: centroid of the cavity, or of the myocardium if there is no cavity.

    None when the slice shows no LV at all.
    """
    label = np.asarray(label)
    region = cavity_region(label)
    if not region.any():
        region = myocardium_region(label)
        if not region.any():
            return None
    rows, cols = np.nonzero(region)
    return float(rows.mean()), float(cols.mean())


def polar_angle(shape: tuple[int, int], centre: tuple[float, float], offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Angle in degrees [0, 360) of every pixel of an array of ``shape`` about ``centre``.

    ``offset`` is the (row, col) of the array's first pixel in the frame of ``centre`` (for crops).
    Counter-clockwise from +x with "up" being decreasing row index (DOMAIN.md section 2).
    """
    rows = np.arange(shape[0], dtype=np.float64)[:, None] + offset[0] - centre[0]
    cols = np.arange(shape[1], dtype=np.float64)[None, :] + offset[1] - centre[1]
    return np.degrees(np.arctan2(-rows, cols)) % 360.0


def _wall_distances(label: np.ndarray):
    """``(box, myo, e, o)`` of the slice's heart box: the myocardium and every pixel's Euclidean
    distance (scipy's exact EDT, pixels) to the endocardial border (the myocardium's pixels
    8-adjacent to the cavity, ``e = 0`` on them) and to the epicardial border (those 8-adjacent to
    the outside, ``o = 0``); None without a myocardium, a cavity or either border."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"radial depth expects a 2D label slice, got shape {label.shape}")
    box = heart_box(label, margin=2)
    if box is None:
        return None
    sub = label[box.slices()]
    myo = myocardium_region(sub)
    cavity = cavity_region(sub)
    if not myo.any() or not cavity.any():
        return None
    eight = np.ones((3, 3), dtype=bool)
    endo = myo & ndimage.binary_dilation(cavity, structure=eight)
    epi = myo & ndimage.binary_dilation(~(myo | cavity), structure=eight)
    if not endo.any() or not epi.any():
        return None
    return box, myo, ndimage.distance_transform_edt(~endo), ndimage.distance_transform_edt(~epi)


def radial_depth(label: np.ndarray) -> np.ndarray:
    """Normalized transmural depth of every myocardium pixel (DOMAIN.md section 2).

    ``d = e / (e + o)`` with ``e`` the distance from the pixel to the endocardial border (the
    myocardium's pixels 8-adjacent to the cavity, which get ``e = 0``) and ``o`` the distance to the
    epicardial border (the myocardium's pixels 8-adjacent to the outside, ``o = 0``). Distances are
    Euclidean, in pixels (scipy's exact EDT). A pixel on both borders (a wall one pixel thick) gets 0.5.

    Args:
        label: 2D integer label slice (DOMAIN labels).

    Returns:
        float64 array shaped like ``label``: depth in [0, 1] inside the myocardium, NaN elsewhere,
        and NaN everywhere when the slice has no cavity (depth is undefined beyond the cavity).
    """
    depth = np.full(np.shape(label), np.nan)
    wall = _wall_distances(label)
    if wall is None:
        return depth
    box, myo, e, o = wall
    total = e + o
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.5)
    depth[box.slices()] = np.where(myo, np.clip(d, 0.0, 1.0), np.nan)
    return depth


def wall_share_depth(label: np.ndarray) -> np.ndarray:
    """Depth of every myocardium pixel as the share of the wall's pixels it lies within, counted from
    the endocardium: ``(e + 0.5) / (e + o + 1)``, with :func:`radial_depth`'s ``e`` and ``o``.

    The wall through a pixel is ``e + o + 1`` pixels thick and the pixel's centre lies ``e + 0.5``
    pixels in, so keeping the pixels of depth ``< h`` keeps about ``round(h * N)`` of an N-pixel
    wall: the share :mod:`engine.anatomy.transmurality` measures. ``radial_depth``'s ``e / (e + o)``
    runs from the first pixel's centre to the last one's, so ``d < h`` keeps ``ceil(h * (N - 1))``:
    less than h of the wall above 0.5, more below. Symmetric: ``1 - depth`` is the share counted from
    the epicardium. A one-pixel wall's pixel gets 0.5.

    Returns:
        float64 array shaped like ``label``: depth in (0, 1) inside the myocardium, NaN elsewhere,
        and NaN everywhere when the slice has no cavity (as ``radial_depth``).
    """
    depth = np.full(np.shape(label), np.nan)
    wall = _wall_distances(label)
    if wall is None:
        return depth
    box, myo, e, o = wall
    depth[box.slices()] = np.where(myo, (e + 0.5) / (e + o + 1.0), np.nan)
    return depth


SUBENDOCARDIAL, MIDWALL, SUBEPICARDIAL = 1, 2, 3
LAYER_NAMES = {SUBENDOCARDIAL: "subendocardial", MIDWALL: "mid-wall", SUBEPICARDIAL: "subepicardial"}


def radial_layers(depth: np.ndarray) -> np.ndarray:
    """Radial layer of every pixel from its normalized depth: 1 subendocardial ``d < 1/3``,
    2 mid-wall ``1/3 <= d < 2/3``, 3 subepicardial ``d >= 2/3``, 0 where depth is NaN."""
    depth = np.asarray(depth, dtype=np.float64)
    layers = np.zeros(depth.shape, dtype=np.uint8)
    valid = ~np.isnan(depth)
    layers[valid] = np.where(depth[valid] < 1 / 3, SUBENDOCARDIAL, np.where(depth[valid] < 2 / 3, MIDWALL, SUBEPICARDIAL))
    return layers
