"""Smooth random fields the phantom is built from: profiles around the LV (one value per degree)
and textures on the image grid."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Angular samples of every polar profile: one per degree, angle 0 at +x, counter-clockwise.
N_ANGLES = 360
ANGLES = np.arange(N_ANGLES, dtype=np.float64) * (360.0 / N_ANGLES)


def circular_noise(rng: np.random.Generator, sigma_deg: float) -> np.ndarray:
    """Zero-mean, unit-std random profile around the circle, smooth over ``sigma_deg`` degrees."""
    raw = rng.standard_normal(N_ANGLES)
    field = ndimage.gaussian_filter1d(raw, sigma_deg * N_ANGLES / 360.0, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def harmonics(rng: np.random.Generator, amplitudes: dict[int, float]) -> np.ndarray:
    """Sum of ``a_k cos(k (theta - phase_k))`` with random phases: a smooth, closed contour wobble."""
    theta = np.radians(ANGLES)
    out = np.zeros(N_ANGLES)
    for k, a in amplitudes.items():
        out += a * np.cos(k * theta - rng.uniform(0, 2 * np.pi))
    return out


def angular_distance(angles: np.ndarray, centre: float) -> np.ndarray:
    """Signed angular difference ``angles - centre`` wrapped to [-180, 180) degrees."""
    return (np.asarray(angles) - centre + 180.0) % 360.0 - 180.0


def arc_window(centre: float, half_width: float, power: float = 0.5) -> np.ndarray:
    """Profile that is 1 at ``centre``, falls to 0 at ``centre +- half_width`` and is 0 beyond.

    ``power < 1`` gives blunt arcs with steep ends (scar borders), ``power > 1`` pointed ones.
    """
    u = angular_distance(ANGLES, centre) / max(half_width, 1e-6)
    return np.clip(1.0 - u * u, 0.0, 1.0) ** power


def bump(centre: float, sigma: float) -> np.ndarray:
    """Gaussian bump around the circle (peak 1)."""
    u = angular_distance(ANGLES, centre) / sigma
    return np.exp(-0.5 * u * u)


def texture(rng: np.random.Generator, shape: tuple[int, ...], sigma: float | tuple[float, ...], wrap_axis0: bool = False) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-smoothed noise of ``shape`` (``sigma`` in samples)."""
    raw = rng.standard_normal(shape)
    mode = ["wrap" if (i == 0 and wrap_axis0) else "reflect" for i in range(len(shape))]
    field = ndimage.gaussian_filter(raw, sigma, mode=mode)
    return (field - field.mean()) / (field.std() + 1e-12)
