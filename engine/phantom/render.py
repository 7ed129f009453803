"""Image formation of a phantom slice: supersampled tissue rendering (numba), partial volume, a
coil bias field, blur, and Rician noise in raw scanner units.

The kernel walks the pixels of a slice; a pixel that may straddle a tissue border is cut into
``n x n`` sub-samples (``n`` the heart's supersampling near the heart, the thorax's elsewhere; every
pixel of the LV wall, where scar borders run, is supersampled), a pixel inside one tissue takes a
single sample. Each sub-sample gets a tissue and an intensity; the pixel's intensity is their mean
(partial volume at every border) and its label their majority: first the region (background,
cavity or myocardium {2, 3, 4}), then, inside the myocardium, healthy, scar or MVO. The region vote
ignores scar, so adding scar never moves the myocardium's outline.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit
from scipy import ndimage

from engine.phantom.fields import N_ANGLES, texture
from engine.phantom.heart import CAVITY_MUSCLE as DISC_CAVITY_MUSCLE, CORONARY as DISC_CORONARY, HeartSlice
from engine.phantom.thorax import ThoraxSlice
from engine.phantom.tissue import (
    AIR, AORTA, CAVITY_MUSCLE, EPI_FAT, LABEL_OF, LIVER, LUNG, LV_BLOOD, MARROW, MEDIASTINUM, MUSCLE, MVO, MYO,
    RV_BLOOD, RV_WALL, SCAR, SUBCUT_FAT, VESSEL, Contrast,
)

MAX_RAW = 4095.0  # 12-bit scanner magnitudes
WALL_TEXTURE_DEPTHS = 8  # depth bins of the polar wall textures

# Rows of the per-slice heart table handed to the kernel.
_R_ENDO, _R_EPI, _RV_CAVITY, _RV_WALL, _FAT, _LO, _HI, _MVO_LO, _MVO_HI = range(9)


@njit(cache=True, fastmath=True, error_model="numpy")
def _interp(table, theta):
    """Linear interpolation of a per-degree circular profile at ``theta`` degrees in [0, 360)."""
    n = table.shape[0]
    x = theta * (n / 360.0)
    i0 = int(x)
    f = x - i0
    if i0 >= n:
        i0 -= n
    i1 = i0 + 1
    if i1 >= n:
        i1 = 0
    return table[i0] * (1.0 - f) + table[i1] * f


@njit(cache=True, fastmath=True, error_model="numpy")
def _heart_sample(dx, dy, tables, discs, myo_tex, scar_tex, levels, scar_het, grey_mm, grey_floor, tc, tf):
    """Tissue code and intensity of a sub-sample at ``(dx, dy)`` mm from the LV centre; code -1
    when it lies outside every heart structure."""
    r = math.sqrt(dx * dx + dy * dy)
    theta = math.degrees(math.atan2(-dy, dx))
    if theta < 0.0:
        theta += 360.0
    r_endo = _interp(tables[_R_ENDO], theta)
    r_epi = _interp(tables[_R_EPI], theta)
    nd = myo_tex.shape[1]
    ti = int(theta) % myo_tex.shape[0]
    if r < r_endo:
        for k in range(discs.shape[0]):
            if discs[k, 3] == DISC_CAVITY_MUSCLE:
                ex = dx - discs[k, 0]
                ey = dy - discs[k, 1]
                if ex * ex + ey * ey < discs[k, 2] * discs[k, 2]:
                    m = levels[CAVITY_MUSCLE]
                    return CAVITY_MUSCLE, (m + discs[k, 4] * (levels[LV_BLOOD] - m)) * (1.0 + 0.1 * tf)
        return LV_BLOOD, levels[LV_BLOOD] * (1.0 + 0.05 * tc)
    if r < r_epi:
        d = (r - r_endo) / max(r_epi - r_endo, 1e-6)
        di = min(int(d * nd), nd - 1)
        healthy = levels[MYO] * (1.0 + 0.25 * myo_tex[ti, di])
        lo = _interp(tables[_LO], theta)
        hi = _interp(tables[_HI], theta)
        if hi > lo and d >= lo and d <= hi:
            m_lo = _interp(tables[_MVO_LO], theta)
            m_hi = _interp(tables[_MVO_HI], theta)
            if m_hi > m_lo and d >= m_lo and d <= m_hi:
                return MVO, levels[MVO] * (1.0 + 0.2 * myo_tex[ti, di])
            # grey zone: a ramp from healthy toward scar intensity at borders with healthy wall
            wall = r_epi - r_endo
            dist = 1e9
            if lo > 0.01:
                dist = (d - lo) * wall
            if hi < 0.99:
                dist = min(dist, (hi - d) * wall)
            g = 1.0
            if grey_mm > 0.0 and dist < grey_mm:
                x = dist / grey_mm
                g = grey_floor + (1.0 - grey_floor) * x * x * (3.0 - 2.0 * x)
            bright = levels[SCAR] * (1.0 + scar_het * scar_tex[ti, di])
            return SCAR, healthy + (bright - healthy) * g
        return MYO, healthy
    q = r - r_epi
    rv = _interp(tables[_RV_CAVITY], theta)
    rw = _interp(tables[_RV_WALL], theta)
    code = -1
    value = 0.0
    if q < rv:
        return RV_BLOOD, levels[RV_BLOOD] * (1.0 + 0.06 * tc)
    if q < rv + rw:
        return RV_WALL, levels[RV_WALL] * (1.0 + 0.2 * tf)
    if q < rv + rw + _interp(tables[_FAT], theta):
        code = EPI_FAT
        value = levels[EPI_FAT] * (1.0 + 0.12 * tf)
    for k in range(discs.shape[0]):
        if discs[k, 3] == DISC_CORONARY:
            ex = dx - discs[k, 0]
            ey = dy - discs[k, 1]
            if ex * ex + ey * ey < discs[k, 2] * discs[k, 2]:
                return VESSEL, levels[VESSEL] * discs[k, 4]
    return code, value


@njit(cache=True, fastmath=True, error_model="numpy")
def _tissue_value(code, levels, tc, tf):
    """Intensity of a thorax tissue with its texture (tc coarse, tf fine, unit-std fields)."""
    v = levels[code]
    if code == LUNG:
        # dark parenchyma with small vessels where the fine texture peaks
        return v * (1.0 + 0.3 * tf) + (0.18 * min(tf - 1.7, 1.0) if tf > 1.7 else 0.0)
    if code == MEDIASTINUM:
        # soft tissue with streaks of fat where the coarse texture peaks
        fat = min(max((tc - 0.6) * 1.5, 0.0), 1.0)
        return (v + (levels[EPI_FAT] - v) * fat) * (1.0 + 0.12 * tf)
    if code == SUBCUT_FAT or code == EPI_FAT:
        return v * (1.0 + 0.1 * tf + 0.05 * tc)
    if code == MUSCLE:
        return v * (1.0 + 0.2 * tf + 0.1 * tc)
    if code == LIVER:
        # parenchyma with bright portal and hepatic vessels where the fine texture peaks
        return v * (1.0 + 0.08 * tc + 0.05 * tf) + (0.25 * min(tf - 1.8, 1.0) if tf > 1.8 else 0.0)
    if code == AORTA:
        return v * (1.0 + 0.06 * tc + 0.04 * tf)
    if code == MARROW:
        return v * (1.0 + 0.2 * tf)
    return v * (1.0 + 0.1 * tf)


@njit(cache=True, fastmath=True, error_model="numpy")
def body_radii_map(size, pixel_mm, body, profiles):
    """float64 [3, size, size]: along the direction of each pixel centre from the body centre, the
    radius (mm) of the body outline, of the inner border of the subcutaneous fat and of the inner
    border of the muscle. The body is the same on every slice of a patient, so this is computed
    once per patient; inside a pixel the direction barely changes."""
    out = np.empty((3, size, size))
    for i in range(size):
        for j in range(size):
            dx = (j + 0.5) * pixel_mm - body[0]
            dy = (i + 0.5) * pixel_mm - body[1]
            rho = math.sqrt(dx * dx + dy * dy) + 1e-9
            phi = math.degrees(math.atan2(-dy, dx))
            if phi < 0.0:
                phi += 360.0
            ca = body[3] * dx / rho
            sa = body[2] * dy / rho
            r_body = body[2] * body[3] / math.sqrt(ca * ca + sa * sa) * (1.0 + _interp(profiles[0], phi))
            inner = r_body - _interp(profiles[1], phi)
            out[0, i, j] = r_body
            out[1, i, j] = inner
            out[2, i, j] = inner - _interp(profiles[2], phi)
    return out


@njit(cache=True, fastmath=True, error_model="numpy")
def _thorax_sample(x, y, body, r_body, r_fat, r_muscle, ellipses, discs, levels, tc, tf):
    """Tissue code and intensity of a sub-sample at ``(x, y)`` mm outside the heart, given the
    body's radii along its direction (:func:`body_radii_map`)."""
    dx = x - body[0]
    dy = y - body[1]
    rho = math.sqrt(dx * dx + dy * dy)
    if rho > r_body:
        return AIR, 0.0
    if rho > r_fat:
        return SUBCUT_FAT, _tissue_value(SUBCUT_FAT, levels, tc, tf)
    for k in range(discs.shape[0]):
        ex = x - discs[k, 0]
        ey = y - discs[k, 1]
        rr = discs[k, 2]
        if ex * ex + ey * ey < rr * rr:
            code = int(discs[k, 3])
            if code == MARROW and ex * ex + ey * ey > (0.85 * rr) ** 2:
                return code, 0.15 * levels[code]  # cortical bone rim
            return code, _tissue_value(code, levels, tc, tf)
    if rho > r_muscle:
        return MUSCLE, _tissue_value(MUSCLE, levels, tc, tf)
    for k in range(ellipses.shape[0]):
        ex = (x - ellipses[k, 0]) / ellipses[k, 2]
        ey = (y - ellipses[k, 1]) / ellipses[k, 3]
        if ex * ex + ey * ey < 1.0:
            code = int(ellipses[k, 4])
            return code, _tissue_value(code, levels, tc, tf)
    return LUNG, _tissue_value(LUNG, levels, tc, tf)


@njit(cache=True, fastmath=True, error_model="numpy")
def _near_thorax_edge(x, y, rho, r_body, r_fat, r_muscle, ellipses, discs, tol):
    """Whether a pixel centred at ``(x, y)`` may straddle a thorax border (then it is supersampled;
    inside one tissue a single sample gives the same mean)."""
    if abs(rho - r_body) < tol or abs(rho - r_fat) < tol or abs(rho - r_muscle) < tol:
        return True
    for k in range(discs.shape[0]):
        d = math.sqrt((x - discs[k, 0]) ** 2 + (y - discs[k, 1]) ** 2)
        if abs(d - discs[k, 2]) < tol or (int(discs[k, 3]) == MARROW and abs(d - 0.85 * discs[k, 2]) < tol):
            return True
    for k in range(ellipses.shape[0]):
        ex = (x - ellipses[k, 0]) / ellipses[k, 2]
        ey = (y - ellipses[k, 1]) / ellipses[k, 3]
        # |q - 1| * min(a, b) never exceeds the distance to the ellipse, so no border is missed
        if abs(math.sqrt(ex * ex + ey * ey) - 1.0) * min(ellipses[k, 2], ellipses[k, 3]) < tol:
            return True
    return False


@njit(cache=True, fastmath=True, error_model="numpy")
def _heart_pixel_kind(dx, dy, tables, discs, tol):
    """How a pixel centred ``(dx, dy)`` mm from the LV centre needs sampling: 2 when it may
    straddle a heart border (or lies in the LV wall, where scar borders run), 1 when it lies inside
    one heart tissue, 0 when it lies clear of the heart (then the thorax decides)."""
    r = math.sqrt(dx * dx + dy * dy)
    theta = math.degrees(math.atan2(-dy, dx))
    if theta < 0.0:
        theta += 360.0
    for k in range(discs.shape[0]):
        ex = dx - discs[k, 0]
        ey = dy - discs[k, 1]
        if math.sqrt(ex * ex + ey * ey) < discs[k, 2] + tol:
            return 2
    r_endo = _interp(tables[_R_ENDO], theta)
    r_epi = _interp(tables[_R_EPI], theta)
    if r > r_endo - tol and r < r_epi + tol:
        return 2
    b = r_epi
    for row in (_RV_CAVITY, _RV_WALL, _FAT):
        w = _interp(tables[row], theta)
        if w > 0.0:
            b += w
            if abs(r - b) < tol:
                return 2
    return 0 if r > b else 1


@njit(cache=True, fastmath=True, error_model="numpy")
def render_kernel(
    pixel_mm, ss_heart, ss_body, hx, hy, bound, tables, discs, myo_tex, scar_tex, levels,
    scar_het, grey_mm, grey_floor, body, radii, ellipses, thorax_discs, tex_fine, tex_coarse,
    label_of, window, out_img, out_lab,
):
    """Render one slice into ``out_img`` (float64, relative to blood) and ``out_lab`` (uint8).

    Distances in mm; ``(hx, hy)`` the LV centre; ``bound`` the radius about it that holds the heart;
    ``radii`` from :func:`body_radii_map`; only pixels in ``window`` (row0, row1, col0, col1) are
    rendered, the rest stay as they are.
    """
    counts = np.zeros(5, np.int64)
    reach = (bound + 1.5 * pixel_mm) ** 2
    for i in range(window[0], window[1]):
        for j in range(window[2], window[3]):
            xc = (j + 0.5) * pixel_mm
            yc = (i + 0.5) * pixel_mm
            near = (xc - hx) ** 2 + (yc - hy) ** 2 < reach
            tf = tex_fine[i, j]
            tc = tex_coarse[i, j]
            r_body = radii[0, i, j]
            r_fat = radii[1, i, j]
            r_muscle = radii[2, i, j]
            rho = math.sqrt((xc - body[0]) ** 2 + (yc - body[1]) ** 2)
            if not near and rho > r_body + pixel_mm:  # air, all of it
                out_img[i, j] = 0.0
                out_lab[i, j] = 0
                continue
            n = 1
            if near:
                # the profiles vary slowly along the angle, so a radial margin of a pixel diagonal
                # (times 1.5) is enough to tell pixels that straddle a border
                kind = _heart_pixel_kind(xc - hx, yc - hy, tables, discs, 2.2 * pixel_mm)
                if kind == 2:
                    n = ss_heart
                elif kind == 0:
                    near = False
            if not near and ss_body > 1 and _near_thorax_edge(xc, yc, rho, r_body, r_fat, r_muscle, ellipses, thorax_discs, pixel_mm):
                n = ss_body
            for c in range(5):
                counts[c] = 0
            acc = 0.0
            for a in range(n):
                y = (i + (a + 0.5) / n) * pixel_mm
                for b in range(n):
                    x = (j + (b + 0.5) / n) * pixel_mm
                    code = -1
                    value = 0.0
                    if near:
                        code, value = _heart_sample(
                            x - hx, y - hy, tables, discs, myo_tex, scar_tex, levels, scar_het, grey_mm, grey_floor, tc, tf
                        )
                    if code < 0:
                        code, value = _thorax_sample(
                            x, y, body, r_body, r_fat, r_muscle, ellipses, thorax_discs, levels, tc, tf
                        )
                    acc += value
                    counts[label_of[code]] += 1
            out_img[i, j] = acc / (n * n)
            myo = counts[2] + counts[3] + counts[4]
            if myo > 0 and myo >= counts[1] and myo >= counts[0]:
                lab = 2
                best = counts[2]
                if counts[3] > best:
                    lab = 3
                    best = counts[3]
                if counts[4] > best:
                    lab = 4
            elif counts[1] > 0 and counts[1] >= counts[0]:
                lab = 1
            else:
                lab = 0
            out_lab[i, j] = lab


def heart_table(heart: HeartSlice, lo: np.ndarray, hi: np.ndarray, mvo_lo: np.ndarray, mvo_hi: np.ndarray) -> np.ndarray:
    """Stack a slice's heart profiles and scar bands into the kernel's [9, N_ANGLES] table."""
    return np.ascontiguousarray(
        np.stack([heart.r_endo, heart.r_epi, heart.rv_cavity, heart.rv_wall, heart.fat, lo, hi, mvo_lo, mvo_hi]),
        dtype=np.float64,
    )


class PatientTextures:
    """Texture fields of one patient; each slice sees them shifted, so slices differ a little."""

    def __init__(self, rng: np.random.Generator, size: int):
        self.fine = texture(rng, (size, size), 0.8)
        self.coarse = texture(rng, (size, size), 4.0)
        self.rng = rng

    def for_slice(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(fine, coarse) image textures and (myocardium, scar) polar wall textures for a slice."""
        shift = tuple(int(s) for s in self.rng.integers(-40, 41, 2))
        fine = np.roll(self.fine, shift, axis=(0, 1))
        coarse = np.roll(self.coarse, shift[::-1], axis=(0, 1))
        myo_tex = texture(self.rng, (N_ANGLES, WALL_TEXTURE_DEPTHS), (6.0, 1.0), wrap_axis0=True)
        scar_tex = texture(self.rng, (N_ANGLES, WALL_TEXTURE_DEPTHS), (4.0, 0.8), wrap_axis0=True)
        return fine, coarse, myo_tex, scar_tex


def bias_coefficients(rng: np.random.Generator, strength: float) -> np.ndarray:
    """Coefficients of a patient's log bias field over the terms (u, v, u^2, v^2, u v), u and v in [-1, 1]."""
    c = rng.normal(0.0, 1.0, 5) * np.array([1.0, 1.0, 0.6, 0.6, 0.5])
    c[1] -= 0.8  # surface coils: brighter toward the anterior chest wall (top, v = -1)
    return c * strength * rng.uniform(0.3, 1.0) / np.abs(c).sum() * 2.0


def bias_field(coefficients: np.ndarray, size: int, centre_px: tuple[float, float]) -> np.ndarray:
    """Smooth multiplicative coil bias ``exp(poly(u, v))``, equal to 1 at ``centre_px`` (row, col)."""
    g = np.linspace(-1.0, 1.0, size)
    v, u = np.meshgrid(g, g, indexing="ij")
    terms = np.stack([u, v, u * u, v * v, u * v])
    log_field = np.tensordot(coefficients, terms, axes=1)
    r, c = (int(np.clip(round(x), 0, size - 1)) for x in centre_px)
    return np.exp(log_field - log_field[r, c])


def render_slice(
    heart: HeartSlice,
    scar_band: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    thorax: ThoraxSlice,
    contrast: Contrast,
    textures: PatientTextures,
    bias: np.ndarray,
    radii: np.ndarray,
    noise_rng: np.random.Generator,
    size: int,
    pixel_mm: float,
    supersampling: int,
    thorax_supersampling: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one slice: ``(image float32 [size, size] raw units, label uint8 [size, size])``.

    ``radii`` is the patient's :func:`body_radii_map`; ``bias`` its :func:`bias_coefficients`.
    """
    fine, coarse, myo_tex, scar_tex = textures.for_slice()
    r0, r1, c0, c1 = thorax.acquired
    margin = 3  # render a little beyond the acquired window so the blur sees real tissue there
    img = np.zeros((size, size), dtype=np.float64)
    lab = np.zeros((size, size), dtype=np.uint8)
    render_kernel(
        float(pixel_mm), int(supersampling), int(thorax_supersampling),
        float(heart.centre[0]), float(heart.centre[1]), float(heart.bound()),
        heart_table(heart, *scar_band), np.ascontiguousarray(heart.discs, dtype=np.float64), myo_tex, scar_tex,
        np.ascontiguousarray(contrast.levels, dtype=np.float64),
        float(contrast.scar_heterogeneity), float(contrast.grey_zone_mm), float(contrast.grey_floor),
        np.asarray(thorax.body, dtype=np.float64), radii,
        np.ascontiguousarray(thorax.ellipses, dtype=np.float64), np.ascontiguousarray(thorax.discs, dtype=np.float64),
        fine, coarse, LABEL_OF,
        np.array([max(r0 - margin, 0), min(r1 + margin, size), max(c0 - margin, 0), min(c1 + margin, size)], dtype=np.int64),
        img, lab,
    )
    if contrast.blur_sigma > 0:
        img = ndimage.gaussian_filter(img, contrast.blur_sigma, mode="constant")
    # the slice's own gain, coil bias, raw scale; then Rician noise: |signal + complex Gaussian|
    centre_px = (heart.centre[1] / pixel_mm, heart.centre[0] / pixel_mm)
    coefficients = bias + noise_rng.normal(0.0, 0.05, bias.shape) * np.abs(bias).max()
    gain = contrast.blood_intensity * (1.0 + noise_rng.normal(0.0, 0.03))
    signal = img * bias_field(coefficients, size, centre_px) * gain
    sigma = contrast.noise * contrast.blood_intensity * noise_rng.uniform(0.9, 1.1)
    shape = (r1 - r0, c1 - c0)
    real = signal[r0:r1, c0:c1].astype(np.float32) + sigma * noise_rng.standard_normal(shape, dtype=np.float32)
    imag = sigma * noise_rng.standard_normal(shape, dtype=np.float32)
    out = np.zeros((size, size), dtype=np.float32)
    out[r0:r1, c0:c1] = np.clip(np.rint(np.hypot(real, imag)), 0.0, MAX_RAW)
    lab[:r0] = 0  # no label in the zero padding
    lab[r1:] = 0
    lab[:, :c0] = 0
    lab[:, c1:] = 0
    return out, lab
