"""The thorax around the heart: body outline, subcutaneous fat, chest-wall and back muscle, lungs,
mediastinum, liver, spine and descending aorta.

Coordinates are mm from the image's top-left corner, ``x`` along columns (to the right) and ``y``
along rows (down = posterior). As displayed, the RV lies to the left of the LV, so the patient's
left is the image's right: the LV sits right of the body's midline and anterior (up), the
descending aorta behind the heart left of the spine (image right), the liver below the heart on
the image left in basal slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.phantom.fields import ANGLES, N_ANGLES, bump, circular_noise, harmonics
from engine.phantom.heart import HeartPlan
from engine.phantom.tissue import AORTA, CANAL, LIVER, MARROW, MEDIASTINUM


@dataclass
class ThoraxSlice:
    """Thorax geometry of one slice, as the renderer takes it.

    Attributes:
        body: ``(cx, cy, a, b)`` body ellipse centre and semi-axes, mm (the same on every slice).
        body_profiles: float64 [3, N_ANGLES] about the body centre: relative wobble of the body
            outline, subcutaneous fat thickness (mm), muscle thickness inside the fat (mm).
        ellipses: float64 [m, 5] rows ``(cx, cy, a, b, tissue)`` checked in order inside the
            thoracic cavity (liver, mediastinum); lungs fill the rest of the cavity.
        discs: float64 [p, 4] rows ``(cx, cy, r, tissue)`` checked before the muscle (aorta,
            vertebral body, spinal canal).
        acquired: ``(row0, row1, col0, col1)`` the acquired part of the image; outside it the image
            is zero-padded (exactly 0).
    """

    body: tuple[float, float, float, float]
    body_profiles: np.ndarray
    ellipses: np.ndarray
    discs: np.ndarray
    acquired: tuple[int, int, int, int]


def place_thorax(rng: np.random.Generator, heart: HeartPlan, size: int, pixel_mm: float) -> list[ThoraxSlice]:
    """Draw a thorax, place ``heart`` in it (moves its slice centres), return per-slice geometry."""
    fov = size * pixel_mm
    bcx = fov / 2 + rng.uniform(-0.04, 0.04) * fov
    bcy = fov / 2 + rng.uniform(-0.03, 0.05) * fov
    ba = rng.uniform(0.36, 0.43) * fov
    bb = ba * rng.uniform(0.66, 0.8)
    wobble = harmonics(rng, {2: rng.uniform(0, 0.03), 3: rng.uniform(0, 0.03), 4: rng.uniform(0, 0.015)})
    wobble = wobble - 0.08 * bump(270.0, 25.0) * rng.uniform(0.0, 1.0)  # flatter back
    theta = np.radians(ANGLES)
    sin_up = np.sin(theta)  # +1 anterior (up), -1 posterior
    subcut = rng.uniform(5.0, 18.0) * (1.0 + 0.6 * np.cos(theta) ** 2) * (1.0 + 0.25 * circular_noise(rng, 25.0))
    subcut = subcut * (1.0 - 0.4 * np.clip(-sin_up, 0.0, 1.0))
    muscle = (
        rng.uniform(10.0, 20.0)  # intercostal, serratus and latissimus muscles
        + rng.uniform(6.0, 14.0) * np.clip(sin_up, 0.0, 1.0) ** 2  # pectoral muscles
        + rng.uniform(26.0, 38.0) * np.clip(-sin_up, 0.0, 1.0) ** 3  # paraspinal muscles
    ) * (1.0 + 0.15 * circular_noise(rng, 20.0))
    profiles = np.stack([wobble, subcut, muscle])

    # Posterior structures first: the vertebral body at the back of the thoracic cavity, the
    # descending aorta in front of it and to the image right; then the heart in front of those.
    def inner_radius(angle_deg: float) -> float:
        i = int(round(angle_deg)) % N_ANGLES
        a = np.radians(angle_deg)
        r_ell = ba * bb / np.hypot(bb * np.cos(a), ba * np.sin(a))
        return r_ell * (1 + wobble[i]) - subcut[i] - muscle[i]

    vr = rng.uniform(13.0, 17.0)
    vx = bcx + rng.normal(0.0, 3.0)
    vy = bcy + inner_radius(270.0) + vr * rng.uniform(0.3, 0.7)
    canal = (vx, vy + vr + 7.0, rng.uniform(5.5, 7.5))
    ar = rng.uniform(9.0, 13.0)
    ax = vx + vr * rng.uniform(0.9, 1.4) + 0.3 * ar
    ay = vy - vr * rng.uniform(0.5, 0.9)

    first = heart.slices[0]
    lv_x = bcx + rng.uniform(0.03, 0.1) * fov
    down = max(float(s.outer_radius()[260:300].max()) for s in heart.slices)
    lv_y = bcy - rng.uniform(0.1, 0.35) * bb
    lv_y = min(lv_y, ay - ar - down - rng.uniform(3.0, 10.0))
    heart.place((lv_x - first.centre[0], lv_y - first.centre[1]))

    # mediastinum: an envelope around each slice's heart (pericardial fat and tissue), plus the
    # posterior mediastinum between the heart and the spine around the aorta and oesophagus
    margin = rng.uniform(0.5, 3.0)

    def envelope(s) -> tuple:
        r = s.outer_radius()
        x = s.centre[0] + r * np.cos(theta)
        y = s.centre[1] - r * np.sin(theta)
        return ((x.min() + x.max()) / 2, (y.min() + y.max()) / 2,
                (x.max() - x.min()) / 2 * 1.05 + margin, (y.max() - y.min()) / 2 * 1.05 + margin, MEDIASTINUM)

    top = lv_y + 0.5 * down
    posterior = ((vx + ax) / 2, (top + vy) / 2, 0.5 * (ax - vx) + ar + rng.uniform(1.0, 4.0), (vy - top) / 2, MEDIASTINUM)

    # liver: a dome under the heart filling the lower image-left part of the thoracic cavity
    # (bounded there by the muscle), in the basal slices only
    n_liver = int(rng.integers(1, 4))
    liver = (lv_x - rng.uniform(50.0, 80.0), lv_y + rng.uniform(65.0, 90.0), rng.uniform(70.0, 95.0), rng.uniform(50.0, 65.0))

    # the acquired (non-zero) part of the image: the rest is zero padding
    pads = [int(max(1, round(rng.uniform(0.015, 0.1) * size))) for _ in range(4)]
    acquired = (pads[0], size - pads[1], pads[2], size - pads[3])

    out = []
    for k, s in enumerate(heart.slices):
        ellipses = []
        if k < n_liver:
            shrink = 1.0 - 0.2 * k
            ellipses.append((liver[0], liver[1] + 10.0 * k, liver[2] * shrink, liver[3] * shrink, LIVER))
        ellipses += [envelope(s), posterior]
        discs = [(ax, ay, ar, AORTA), (vx, vy, vr, MARROW), (*canal, CANAL)]
        out.append(
            ThoraxSlice(
                body=(bcx, bcy, ba, bb),
                body_profiles=profiles,
                ellipses=np.asarray(ellipses, dtype=np.float64),
                discs=np.asarray(discs, dtype=np.float64),
                acquired=acquired,
            )
        )
    return out
