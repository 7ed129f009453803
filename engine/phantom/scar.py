"""Scar patterns of phantom patients, as depth bands in the LV wall's polar frame.

For each slice and angle a scar occupies normalized wall depths ``lo <= d <= hi`` (``d = 0`` at the
endocardium, 1 at the epicardium; no scar where ``hi <= lo``), so it is confined to the myocardium
by construction and its border is a random, smooth profile along the angle, not an ellipse:

- ischemic (one coronary territory, DOMAIN.md section 2): grows from the subendocardium
  (``lo = 0``) outward to a transmural extent that varies along the angle, nearly transmural in
  some patients and thin in others, over several consecutive slices; large, nearly transmural
  scars may hold a microvascular-obstruction core (``mvo_lo <= d <= mvo_hi``, label 4);
- mid-wall: a broken stripe around ``d = 0.5``, mostly septal (non-ischemic cardiomyopathy);
- subepicardial: patches from ``d = 1`` inward, mostly inferolateral (myocarditis).

Arcs of ischemic scar stay a few degrees inside the territory's AHA segments of each slice's level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.anatomy.aha import LEVEL_SEGMENTS, TERRITORIES, segment_centre_angle, segment_half_width
from engine.phantom.fields import N_ANGLES, arc_window, circular_noise

# Degrees an ischemic arc keeps from its territory's segment borders (the LV centre of the labels
# differs from the geometric one by a fraction of a pixel).
TERRITORY_MARGIN_DEG = 6.0
# Extents this close to the epicardium are drawn fully transmural.
TRANSMURAL_SNAP = 0.92


@dataclass
class ScarPlan:
    """Scar of one patient: per-slice depth bands, float64 [n_slices, N_ANGLES] each.

    Attributes:
        pattern: "none", "ischemic-LAD", "ischemic-RCA", "ischemic-LCx", "midwall" or "subepicardial".
        territory: coronary territory of an ischemic scar ("LAD", "RCA", "LCx"), else None.
        tiny: whether the scar was drawn tiny (a few pixels).
        lo, hi: scar depth band (none where ``hi <= lo``).
        mvo_lo, mvo_hi: MVO depth band inside the scar (none where ``mvo_hi <= mvo_lo``).
    """

    pattern: str
    territory: str | None
    tiny: bool
    lo: np.ndarray
    hi: np.ndarray
    mvo_lo: np.ndarray
    mvo_hi: np.ndarray

    @classmethod
    def none(cls, n_slices: int) -> "ScarPlan":
        z = np.zeros((n_slices, N_ANGLES))
        return cls("none", None, False, z, z.copy(), z.copy(), z.copy())

    @property
    def planned_mvo(self) -> bool:
        return bool((self.mvo_hi > self.mvo_lo).any())


def territory_arc(territory: str, level: str) -> tuple[float, float] | None:
    """Centre and half-width (degrees) of the arc a territory covers at a slice level, or None when
    the territory has no segment there. The apex (segment 17, LAD) is the whole circle."""
    segments = [s for s in LEVEL_SEGMENTS[level] if s in TERRITORIES[territory]]
    if not segments:
        return None
    if level == "apex":
        return 0.0, 180.0
    centres = np.radians([segment_centre_angle(s) for s in segments])
    centre = float(np.degrees(np.arctan2(np.sin(centres).mean(), np.cos(centres).mean())) % 360.0)
    return centre, sum(segment_half_width(s) for s in segments)


def _span(rng: np.random.Generator, candidates: list[int], length: int, prefer_apical: bool) -> list[int]:
    """A run of ``length`` consecutive candidate slices, biased toward the base or the apex."""
    length = max(1, min(length, len(candidates)))
    starts = np.arange(len(candidates) - length + 1)
    w = np.linspace(1.0, 2.5, len(starts))
    w = w if prefer_apical else w[::-1]
    start = int(rng.choice(starts, p=w / w.sum()))
    return candidates[start : start + length]


def _irregular(rng: np.random.Generator, amount: float) -> np.ndarray:
    """Multiplicative irregularity of a scar border along the angle."""
    return 1.0 + amount * circular_noise(rng, rng.uniform(5.0, 14.0))


def _ischemic(rng, territory: str, levels: list[str], tiny: bool, mvo_probability: float, plan: ScarPlan) -> None:
    candidates = [k for k, lv in enumerate(levels) if territory_arc(territory, lv) is not None]
    length = 1 if tiny else int(rng.integers(2, 6))
    span = _span(rng, candidates, length, prefer_apical=territory == "LAD")
    position = rng.uniform(0.2, 0.8)  # where in the territory the infarct sits
    width = rng.uniform(0.75, 1.0)  # share of the territory it covers
    if tiny:
        extent = rng.uniform(0.3, 0.6)
    elif rng.random() < 0.4:
        extent = rng.uniform(0.4, 0.75)  # subendocardial
    else:
        extent = rng.uniform(0.8, 1.15)  # nearly transmural
    arcs = []
    for j, k in enumerate(span):
        centre0, available = territory_arc(territory, levels[k])
        available -= TERRITORY_MARGIN_DEG
        edge = len(span) > 2 and j in (0, len(span) - 1)
        taper = 0.8 if edge else 1.0
        if tiny:
            half = rng.uniform(7.0, 12.0)
        else:
            half = float(np.clip(width * available * taper * rng.uniform(0.85, 1.1), 9.0, available))
        slack = available - half
        centre = centre0 + float(np.clip((position - 0.5) * 2 * slack + rng.normal(0, 3.0), -slack, slack))
        t = float(np.clip(extent * (0.85 if edge else 1.0) * (1.0 + rng.normal(0, 0.1)), 0.15, 1.0))
        window = arc_window(centre, half, rng.uniform(0.15, 0.35))
        hi = np.clip(t * window * _irregular(rng, 0.25), 0.0, 1.0)
        hi = np.where(hi >= TRANSMURAL_SNAP, 1.0, hi)
        plan.hi[k] = np.where(window > 0, hi, 0.0)
        plan.lo[k] = 0.0
        arcs.append((k, centre, half, t))
    big = np.mean([a[2] for a in arcs]) >= 18.0 and extent >= 0.7
    if not tiny and big and rng.random() < mvo_probability:
        # dark core in the one or two slices where the infarct is most transmural
        order = sorted(arcs, key=lambda a: -a[3])[: int(rng.integers(1, 3))]
        for k, centre, half, _ in order:
            core = arc_window(centre, half * rng.uniform(0.4, 0.65), 0.5)
            m_lo = rng.uniform(0.03, 0.12)
            m_hi = m_lo + (plan.hi[k] - rng.uniform(0.15, 0.3) - m_lo) * core
            keep = (core > 0) & (m_hi - m_lo > 0.08)
            plan.mvo_lo[k] = np.where(keep, m_lo, 0.0)
            plan.mvo_hi[k] = np.where(keep, m_hi, 0.0)


def _non_ischemic(rng, pattern: str, levels: list[str], tiny: bool, plan: ScarPlan) -> None:
    candidates = [k for k, lv in enumerate(levels) if lv in ("basal", "mid", "apical")]
    span = _span(rng, candidates, 1 if tiny else int(rng.integers(1, 5)), prefer_apical=False)
    if pattern == "midwall":
        sites = [180.0 + rng.normal(0.0, 10.0)] if rng.random() < 0.8 else [rng.uniform(295.0, 335.0)]
    else:
        sites = [rng.uniform(295.0, 345.0)] if rng.random() < 0.7 else [rng.uniform(0.0, 40.0)]
        if not tiny and rng.random() < 0.4:
            sites.append((sites[0] + rng.choice([-1, 1]) * rng.uniform(40.0, 70.0)) % 360.0)
    half0 = rng.uniform(7.0, 12.0) if tiny else rng.uniform(22.0, 65.0)
    thickness = rng.uniform(0.12, 0.2) if (tiny and pattern == "midwall") else rng.uniform(0.3, 0.5) if tiny else None
    for k in span:
        lo = np.ones(N_ANGLES)
        hi = np.zeros(N_ANGLES)
        for site in sites:
            half = half0 * rng.uniform(0.8, 1.1)
            centre = site + rng.normal(0.0, 4.0)
            window = arc_window(centre, half, rng.uniform(0.4, 0.8))
            if pattern == "midwall":
                w = (thickness or rng.uniform(0.1, 0.25)) * window * _irregular(rng, 0.35)
                mid = 0.5 + 0.06 * circular_noise(rng, 15.0)
                band = w > 0.04  # the stripe breaks up where it thins out
                lo = np.where(band, np.minimum(lo, np.clip(mid - w, 0.12, 1.0)), lo)
                hi = np.where(band, np.maximum(hi, np.clip(mid + w, 0.0, 0.88)), hi)
            else:
                w = (thickness or rng.uniform(0.25, 0.6)) * window * _irregular(rng, 0.35)
                band = w > 0.05
                lo = np.where(band, np.minimum(lo, np.clip(1.0 - w, 0.0, 1.0)), lo)
                hi = np.where(band, 1.0, hi)
        none = hi <= lo
        plan.lo[k] = np.where(none, 0.0, lo)
        plan.hi[k] = np.where(none, 0.0, hi)


def sample_scar(rng: np.random.Generator, pattern: str, levels: list[str], tiny: bool, mvo_probability: float) -> ScarPlan:
    """Draw a scar of ``pattern`` for a heart whose slices have the planned AHA ``levels``."""
    plan = ScarPlan.none(len(levels))
    plan.pattern, plan.tiny = pattern, tiny
    if pattern == "none":
        plan.tiny = False
        return plan
    if pattern.startswith("ischemic-"):
        plan.territory = pattern.split("-", 1)[1]
        _ischemic(rng, plan.territory, levels, tiny, mvo_probability, plan)
    elif pattern in ("midwall", "subepicardial"):
        _non_ischemic(rng, pattern, levels, tiny, plan)
    else:
        raise ValueError(f"unknown scar pattern {pattern!r}")
    return plan
