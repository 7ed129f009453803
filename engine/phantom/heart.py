"""Heart geometry of a phantom patient: LV, RV, epicardial fat, coronary vessels and papillary
muscles on each short-axis slice, base to apex.

Everything is a profile around the LV centre, one value per degree (``fields.N_ANGLES``), angles
counter-clockwise from +x with "up" the decreasing row (DOMAIN.md section 2), distances in mm:
the LV cavity is ``r < r_endo(theta)``, the LV wall ``r_endo <= r < r_epi``, and beyond the LV
epicardium lie, in this order, the RV blood pool (``rv_cavity`` deep, non-zero only between the RV
insertion points near 120 and 240 degrees, i.e. on the septal side, to the left of the LV), the thin
RV free wall (``rv_wall``) and the epicardial fat (``fat``). Discs add papillary muscles and
trabeculae inside the cavity (labelled cavity, as in EMIDEC) and coronary vessels in the fat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.phantom.fields import ANGLES, N_ANGLES, angular_distance, arc_window, bump, circular_noise, harmonics

# Disc kinds.
CAVITY_MUSCLE = 0  # papillary muscle or trabecula: inside the cavity, labelled cavity
CORONARY = 1  # coronary vessel in the epicardial fat

# Smallest cavity radius (mm and pixels) a slice with a cavity gets, so a planned cavity is never
# lost to the pixel grid (slice levels depend on which slices show one).
_MIN_CAVITY_MM = 3.0
_MIN_CAVITY_PX = 1.6


@dataclass
class HeartSlice:
    """Geometry of one short-axis slice, relative to its LV centre.

    Attributes:
        centre: LV centre ``(x, y)`` in mm from the image's top-left corner (x along columns,
            y along rows).
        r_endo, r_epi, rv_cavity, rv_wall, fat: float64 [N_ANGLES] profiles in mm (see module doc).
            ``r_endo`` is all zero on a slice past the cavity (apical cap).
        discs: float64 [n, 5] rows ``(dx, dy, radius, kind, level)``: offset from the LV centre in
            mm (dy along rows), radius in mm, ``CAVITY_MUSCLE`` or ``CORONARY``, and an intensity:
            for cavity muscle the fraction of the way from healthy myocardium to blood (dark to
            grey), for vessels relative to blood.
    """

    centre: tuple[float, float]
    r_endo: np.ndarray
    r_epi: np.ndarray
    rv_cavity: np.ndarray
    rv_wall: np.ndarray
    fat: np.ndarray
    discs: np.ndarray

    @property
    def has_cavity(self) -> bool:
        return bool(self.r_endo.max() > 0)

    def outer_radius(self) -> np.ndarray:
        """Radius of the heart's outer boundary (epicardial fat included) per angle, mm."""
        return self.r_epi + self.rv_cavity + self.rv_wall + self.fat

    def bound(self) -> float:
        """Radius of a circle about the LV centre holding every heart structure of the slice, mm."""
        r = float(self.outer_radius().max())
        if len(self.discs):
            r = max(r, float(np.max(np.hypot(self.discs[:, 0], self.discs[:, 1]) + self.discs[:, 2])))
        return r + 1.0


@dataclass
class HeartPlan:
    """The heart of one patient: its slices base to apex and the parameters they were drawn from.

    ``slices[k].centre`` holds only the slice's drift from the first slice until
    :func:`place_heart` moves the heart into the thorax.
    """

    slices: list[HeartSlice]
    insertion: tuple[float, float]
    params: dict

    def levels(self) -> list[str]:
        """Planned AHA level of each slice, by the rule of :func:`engine.anatomy.aha.slice_levels`."""
        with_cavity = [s.has_cavity for s in self.slices]
        idx = [i for i, c in enumerate(with_cavity) if c]
        levels = ["apex"] * len(self.slices)
        for name, part in zip(("basal", "mid", "apical"), np.array_split(np.asarray(idx), 3)):
            for i in part:
                levels[int(i)] = name
        return levels

    def place(self, origin: tuple[float, float]) -> None:
        """Move the heart so the first slice's LV centre sits at ``origin`` (mm)."""
        for s in self.slices:
            s.centre = (origin[0] + s.centre[0], origin[1] + s.centre[1])


def sample_heart(rng: np.random.Generator, n_slices: int, slice_thickness: float, fov_mm: float, pixel_mm: float) -> HeartPlan:
    """Draw a heart of ``n_slices`` short-axis slices, base to apex.

    The LV epicardial diameter at the base is a tenth to a seventh of the field of view, the wall
    6-11 mm thick (thinner toward the apex and not uniform), the cavity shrinks toward the apex and
    the last slice may be past it.
    """
    r_epi_base = float(np.clip(rng.uniform(fov_mm / 20.0, fov_mm / 14.0), 17.0, 34.0))
    wall = rng.uniform(6.0, float(np.clip(r_epi_base - 11.0, 6.5, 11.0)))
    r_endo_base = r_epi_base - wall
    # Long-axis shape: the cavity radius follows a half ellipsoid, sqrt(1 - (a z)^2), z = 0 at the
    # base and 1 at the last slice; a close to 1 leaves a tiny cavity on the last slice.
    taper = rng.uniform(0.82, 0.97)
    apical_cap = bool(rng.random() < 0.35)
    ellipticity = rng.uniform(0.0, 0.07)
    septal_extra = rng.uniform(0.0, 0.12)
    insertion = (120.0 + rng.normal(0.0, 3.0), 240.0 + rng.normal(0.0, 3.0))
    rv_depth_base = r_epi_base * rng.uniform(0.75, 1.3)
    rv_wall_mm = rng.uniform(2.0, 3.5)
    rv_skew = rng.uniform(0.75, 1.3)
    fat_amount = rng.uniform(0.3, 1.0)
    drift_step = rng.uniform(0.5, 2.0) * slice_thickness / 10.0
    drift_dir = rng.uniform(0, 2 * np.pi)
    min_cavity = max(_MIN_CAVITY_MM, _MIN_CAVITY_PX * pixel_mm)

    slices = []
    centre = np.zeros(2)
    for k in range(n_slices):
        z = k / max(n_slices - 1, 1)
        last = k == n_slices - 1
        if k > 0:  # the long axis is oblique to the slices: the LV centre drifts a little per slice
            centre = centre + drift_step * np.array([np.cos(drift_dir), np.sin(drift_dir)]) + rng.normal(0, 0.6, 2)
        # cavity (endocardium): ellipse-ish with a rough, trabeculated border
        scale = np.sqrt(max(1.0 - (taper * z) ** 2, 0.0))
        if last and apical_cap:
            r_endo = np.zeros(N_ANGLES)
        else:
            r0 = max(r_endo_base * (0.95 + 0.05 * (k > 0)) * scale, min_cavity)
            wobble = (
                harmonics(rng, {2: ellipticity, 3: rng.uniform(0, 0.03), 4: rng.uniform(0, 0.02), 5: rng.uniform(0, 0.015)})
                + 0.025 * circular_noise(rng, 6.0)
            )
            r_endo = r0 * (1.0 + wobble)
        # wall thickness: thinner toward the apex, a thicker septum, never uniform
        w = wall * (1.0 - 0.2 * z) * (1.0 + septal_extra * bump(180.0, 40.0))
        w = w * (1.0 + harmonics(rng, {1: rng.uniform(0, 0.08), 2: rng.uniform(0, 0.08), 3: rng.uniform(0, 0.05)}) + 0.04 * circular_noise(rng, 10.0))
        if not r_endo.any():  # apical cap: a disc of myocardium
            w = w * 0.9 + 2.0
        r_epi = r_endo + np.maximum(w, 0.55 * wall)
        # RV: a crescent on the septal side between the insertion points, shrinking to the apex
        span = insertion[1] - insertion[0]
        u = np.clip((ANGLES - insertion[0]) / span, 0.0, 1.0)
        inside = (ANGLES > insertion[0]) & (ANGLES < insertion[1])
        depth = rv_depth_base * (1.0 - 0.75 * z) * (1.0 + rng.normal(0, 0.06))
        rv_cavity = np.where(inside, depth * np.sin(np.pi * u**rv_skew) ** 0.6, 0.0)
        rv_cavity *= 1.0 + 0.08 * circular_noise(rng, 15.0)
        rv_cavity = np.clip(rv_cavity, 0.0, None)
        rv_wall = rv_wall_mm * arc_window(0.5 * (insertion[0] + insertion[1]), span / 2 + 6.0, 0.15)
        rv_wall = rv_wall * (1.0 + 0.1 * circular_noise(rng, 12.0))
        # epicardial fat: patches, the interventricular grooves, the RV free wall, the AV groove at the base
        patches = np.clip(circular_noise(rng, 12.0) - 0.6, 0.0, None) * 2.5
        grooves = 5.0 * (bump(insertion[0] - 4.0, 9.0) + bump(insertion[1] + 4.0, 9.0))
        rv_side = np.where(inside, 1.5 * np.clip(circular_noise(rng, 10.0) + 0.4, 0.0, None), 0.0)
        av_groove = (4.0 if k == 0 else 1.5 if k == 1 else 0.0) * (1.0 + 0.5 * circular_noise(rng, 20.0))
        fat = fat_amount * (patches + grooves + rv_side + np.clip(av_groove, 0.0, None)) * (1.0 - 0.5 * z)
        fat = np.clip(fat, 0.0, 12.0)

        discs = []
        # coronary vessels in the fat: LAD and PDA in the interventricular grooves, LCx and RCA in
        # the AV groove of basal slices, a few small branches elsewhere
        vessels = [(insertion[0] - 4.0, rng.uniform(1.2, 1.8)), (insertion[1] + 4.0, rng.uniform(1.0, 1.6))]
        if k <= 1:
            vessels += [(rng.uniform(10.0, 60.0), rng.uniform(1.2, 1.8)), (rng.uniform(165.0, 200.0), rng.uniform(1.2, 1.8))]
        for _ in range(rng.integers(0, 3)):
            vessels.append((rng.uniform(-60.0, 100.0) % 360.0, rng.uniform(0.7, 1.1)))
        for angle, radius in vessels:
            i = int(round(angle)) % N_ANGLES
            near = np.abs(angular_distance(ANGLES, angle)) < 8.0
            fat = np.where(near, np.maximum(fat, 2 * radius + 1.0), fat)  # a vessel always sits in fat
            r = r_epi[i] + rv_cavity[i] + rv_wall[i] + 0.5 * fat[i]
            a = np.radians(angle)
            discs.append((r * np.cos(a), -r * np.sin(a), radius, CORONARY, rng.uniform(0.8, 1.1)))
        # papillary muscles (basal slices below the valve and mid slices) and small trabeculae
        if r_endo.any() and 0 < k and z < 0.7:
            for angle in (rng.uniform(25.0, 60.0), rng.uniform(290.0, 325.0)):
                i = int(round(angle)) % N_ANGLES
                radius = float(np.clip(rng.uniform(0.16, 0.3) * r_endo[i], 1.8, 5.5))
                r = r_endo[i] - 0.75 * radius
                a = np.radians(angle)
                discs.append((r * np.cos(a), -r * np.sin(a), radius, CAVITY_MUSCLE, rng.uniform(0.0, 0.35)))
        if r_endo.any():
            for _ in range(rng.integers(0, 5)):
                angle = rng.uniform(0.0, 360.0)
                i = int(angle) % N_ANGLES
                radius = rng.uniform(0.7, 1.4)
                r = r_endo[i] - 0.6 * radius
                if r > 2 * radius:
                    a = np.radians(angle)
                    discs.append((r * np.cos(a), -r * np.sin(a), radius, CAVITY_MUSCLE, rng.uniform(0.1, 0.5)))
        slices.append(
            HeartSlice(
                centre=(float(centre[0]), float(centre[1])),
                r_endo=r_endo, r_epi=r_epi, rv_cavity=rv_cavity, rv_wall=rv_wall, fat=fat,
                discs=np.asarray(discs, dtype=np.float64).reshape(-1, 5),
            )
        )
    params = {
        "lv_epicardial_diameter_mm": round(2 * r_epi_base, 2),
        "wall_thickness_mm": round(wall, 2),
        "rv_insertion_deg": [round(insertion[0], 1), round(insertion[1], 1)],
        "apical_cap": apical_cap,
    }
    return HeartPlan(slices=slices, insertion=insertion, params=params)
