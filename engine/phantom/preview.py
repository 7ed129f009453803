"""Preview figures of short-axis slices: LV crops with label contours next to their AHA segment maps,
and a whole field-of-view panel per patient (the small heart in the full thorax) with the
intensity histograms of blood, healthy myocardium and scar.

Works for any slices in engine orientation (phantom or real), not only the phantom's.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from engine.anatomy.aha import LEVEL_SEGMENTS, aha_segments, segment_centre_angle
from engine.anatomy.geometry import heart_box, lv_centre
from engine.anatomy.labels import CAVITY, MVO, MYOCARDIUM, SCAR

# Contour colours: cavity, myocardium (outer border), scar, MVO.
COLOURS = {"cavity": "#ffd400", "myocardium": "#35e335", "scar": "#ff3030", "mvo": "#00d5ff"}
_UNITS_PER_ROW = 3  # each unit is two panels side by side


def _crop_box(label: np.ndarray, image_shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """A square around the LV, wide enough to show the RV and the surrounding fat."""
    box = heart_box(label, margin=0)
    centre = lv_centre(label)
    if box is None or centre is None:
        return None
    half = int(np.ceil(max(box.r1 - box.r0, box.c1 - box.c0) * 1.05)) + 4
    r, c = (int(round(v)) for v in centre)
    r0, c0 = max(r - half, 0), max(c - half, 0)
    return r0, min(r + half, image_shape[0]), c0, min(c + half, image_shape[1])


def _contours(ax, label: np.ndarray, linewidth: float = 0.9) -> None:
    for mask, colour in (
        (label == CAVITY, COLOURS["cavity"]),
        (label >= CAVITY, COLOURS["myocardium"]),
        (label >= SCAR, COLOURS["scar"]),
        (label == MVO, COLOURS["mvo"]),
    ):
        if mask.any() and not mask.all():
            ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=linewidth)


def _window(image: np.ndarray) -> tuple[float, float]:
    values = image[image > 0]
    return 0.0, float(np.percentile(values, 99.5)) if values.size else 1.0


def _segment_numbers(ax, seg: np.ndarray, label: np.ndarray, reference_angle: float) -> None:
    """Write each segment's number at its centre: its centre angle, at its pixels' mean radius."""
    centre = lv_centre(label)
    if centre is None:
        return
    for s in np.unique(seg[seg > 0]):
        rows, cols = np.nonzero(seg == s)
        if s == 17:
            r, c = centre
        else:
            radius = float(np.mean(np.hypot(rows - centre[0], cols - centre[1])))
            a = np.radians(segment_centre_angle(int(s), reference_angle))
            r, c = centre[0] - radius * np.sin(a), centre[1] + radius * np.cos(a)
        ax.text(c, r, str(int(s)), ha="center", va="center", fontsize=7, fontweight="bold", color="black",
                bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.75))


def _patient_key(title: str) -> str:
    return title.split()[0] if title.split() else title


def render_preview(
    slices: Sequence[tuple[np.ndarray, np.ndarray, str | None, str]],
    png_path: str | os.PathLike,
    reference_angle: float = 120.0,
    max_slices: int = 24,
) -> str:
    """Write a PNG grid previewing short-axis slices.

    Each slice gets two panels: the LV-region crop of the image with the label contours (cavity
    yellow, myocardium green, scar red, MVO cyan) and its AHA segment map with the segment numbers
    at the segment centres. Before the first slice of each patient (the first word of the title,
    e.g. ``Case_P001``) come a whole field-of-view panel with the crop's box, and the intensity
    histograms of blood, healthy myocardium and scar over that patient's previewed slices.

    Args:
        slices: ``(image [H, W], label [H, W], level, title)`` per slice, engine orientation;
            ``level`` is "basal", "mid", "apical", "apex" or None (no AHA map).
        png_path: output file (parent folders are created).
        reference_angle: AHA reference angle in degrees (DOMAIN.md section 2).
        max_slices: at most this many slices are shown (the first ones).

    Returns:
        The PNG path written.
    """
    # Figure + Agg canvas, not pyplot: no global backend switch, safe in workers and tests.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if max_slices < 1:
        raise ValueError(f"max_slices must be >= 1, got {max_slices}")
    items = list(slices)[:max_slices]
    if not items:
        raise ValueError("render_preview needs at least one slice")
    groups: dict[str, list[int]] = {}
    for i, (_, _, _, title) in enumerate(items):
        groups.setdefault(_patient_key(title), []).append(i)
    units: list[tuple[str, int]] = []
    seen: set[str] = set()
    for i, (_, _, _, title) in enumerate(items):
        key = _patient_key(title)
        if key not in seen:
            seen.add(key)
            units.append(("patient", i))
        units.append(("slice", i))

    n_rows = int(np.ceil(len(units) / _UNITS_PER_ROW))
    fig = Figure(figsize=(2.6 * 2 * _UNITS_PER_ROW, 2.7 * n_rows), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, 2 * _UNITS_PER_ROW, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    segment_cmap = ListedColormap(
        ["#00000000"] + ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462"] * 3, name="aha"
    )

    for u, (kind, i) in enumerate(units):
        left, right = axes[u // _UNITS_PER_ROW, 2 * (u % _UNITS_PER_ROW)], axes[u // _UNITS_PER_ROW, 2 * (u % _UNITS_PER_ROW) + 1]
        image, label, level, title = items[i]
        image, label = np.asarray(image, dtype=np.float64), np.asarray(label)
        box = _crop_box(label, image.shape)
        if kind == "patient":
            key = _patient_key(title)
            left.imshow(image, cmap="gray", vmin=_window(image)[0], vmax=_window(image)[1], interpolation="nearest")
            if box is not None:
                left.add_patch(Rectangle((box[2] - 0.5, box[0] - 0.5), box[3] - box[2], box[1] - box[0],
                                         fill=False, ec=COLOURS["myocardium"], lw=0.8))
            left.set_title(f"{key}: full field of view", fontsize=7)
            right.set_axis_on()
            pools = {"blood": [], "myocardium": [], "scar": []}
            for j in groups[key]:
                im, lab = np.asarray(items[j][0], dtype=np.float64), np.asarray(items[j][1])
                pools["blood"].append(im[lab == CAVITY])
                pools["myocardium"].append(im[lab == MYOCARDIUM])
                pools["scar"].append(im[lab >= SCAR])
            for name, colour in (("blood", COLOURS["cavity"]), ("myocardium", COLOURS["myocardium"]), ("scar", COLOURS["scar"])):
                v = np.concatenate(pools[name]) if pools[name] else np.zeros(0)
                if v.size:
                    right.hist(v, bins=40, density=True, histtype="stepfilled", alpha=0.45, color=colour, label=f"{name} ({v.size})")
            right.legend(fontsize=5, loc="upper right")
            right.tick_params(labelsize=5)
            right.set_yticks([])
            right.set_title("LV intensities", fontsize=7)
            continue
        if box is None:
            left.imshow(image, cmap="gray", vmin=_window(image)[0], vmax=_window(image)[1], interpolation="nearest")
            left.set_title(f"{title} (no LV)", fontsize=7)
            continue
        r0, r1, c0, c1 = box
        crop_img, crop_lab = image[r0:r1, c0:c1], label[r0:r1, c0:c1]
        left.imshow(crop_img, cmap="gray", vmin=_window(crop_img)[0], vmax=_window(crop_img)[1], interpolation="nearest")
        _contours(left, crop_lab)
        left.set_title(title, fontsize=7)
        if level in LEVEL_SEGMENTS:
            seg = aha_segments(label, level, reference_angle)[r0:r1, c0:c1]
            right.imshow(crop_img, cmap="gray", vmin=_window(crop_img)[0], vmax=_window(crop_img)[1], interpolation="nearest")
            right.imshow(seg, cmap=segment_cmap, vmin=0, vmax=18, interpolation="nearest", alpha=0.85)
            if (crop_lab >= SCAR).any():
                right.contour((crop_lab >= SCAR).astype(float), levels=[0.5], colors=[COLOURS["scar"]], linewidths=0.9)
            _segment_numbers(right, seg, crop_lab, reference_angle)
            right.set_title(f"AHA segments ({level})", fontsize=7)
    fig.tight_layout(pad=0.4)
    png_path = os.fspath(png_path)
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path)
    return png_path


def preview_patient(patient, png_path: str | os.PathLike, reference_angle: float = 120.0, max_slices: int = 24) -> str:
    """Preview every slice of a :class:`~engine.phantom.PhantomPatient` (see :func:`render_preview`)."""
    from engine.anatomy.aha import slice_levels

    levels = patient.meta.get("levels") or slice_levels(patient.label)
    items = [
        (patient.image[k], patient.label[k], levels[k], f"{patient.patient_id} slice {k} {levels[k] or ''}".strip())
        for k in range(patient.image.shape[0])
    ]
    return render_preview(items, png_path, reference_angle=reference_angle, max_slices=max_slices)
