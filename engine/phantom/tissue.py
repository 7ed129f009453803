"""Tissue classes of the phantom and their LGE contrast.

After an inversion time that nulls healthy myocardium (DOMAIN.md section 1): healthy myocardium
is dark (grey when the nulling is imperfect), blood mid-bright, scar bright (often, not always,
brighter than blood), MVO a dark core, fat bright, lungs dark. Levels are relative to the LV blood
pool; the renderer multiplies by the patient's raw blood intensity.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from engine.anatomy.labels import BACKGROUND, CAVITY, MVO as MVO_LABEL, MYOCARDIUM, SCAR as SCAR_LABEL

# Tissue codes of the renderer (not labels: see LABEL_OF).
AIR = 0
LV_BLOOD = 1
MYO = 2
SCAR = 3
MVO = 4
CAVITY_MUSCLE = 5  # papillary muscles and trabeculae
RV_BLOOD = 6
RV_WALL = 7
EPI_FAT = 8
VESSEL = 9
MEDIASTINUM = 10
LUNG = 11
SUBCUT_FAT = 12
MUSCLE = 13
LIVER = 14
MARROW = 15
CANAL = 16
AORTA = 17
N_TISSUES = 18

# Label (EMIDEC convention) of each tissue: papillary muscles belong to the blood pool label.
LABEL_OF = np.full(N_TISSUES, BACKGROUND, dtype=np.int64)
LABEL_OF[[LV_BLOOD, CAVITY_MUSCLE]] = CAVITY
LABEL_OF[MYO] = MYOCARDIUM
LABEL_OF[SCAR] = SCAR_LABEL
LABEL_OF[MVO] = MVO_LABEL


@dataclass
class Contrast:
    """Per-patient image contrast.

    Attributes:
        levels: float64 [N_TISSUES] intensity of each tissue relative to the LV blood pool.
        scar_heterogeneity: relative amplitude of the scar's internal texture.
        grey_zone_mm: width of the ramp from healthy to full scar intensity at the scar border.
        grey_floor: intensity share (0-1, healthy to scar) at the very border of the scar.
        blood_intensity: raw scanner value of the blood pool.
        noise: Rician sigma relative to the blood pool.
        blur_sigma: point-spread blur, pixels.
    """

    levels: np.ndarray
    scar_heterogeneity: float
    grey_zone_mm: float
    grey_floor: float
    blood_intensity: float
    noise: float
    blur_sigma: float

    def summary(self) -> dict:
        """JSON-friendly figures of the contrast (for the patient's meta)."""
        d = {k: round(float(v), 4) for k, v in asdict(self).items() if k != "levels"}
        d.update(
            scar_blood_ratio=round(float(self.levels[SCAR]), 4),
            myocardium_blood_ratio=round(float(self.levels[MYO]), 4),
        )
        return d


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def sample_contrast(rng: np.random.Generator, cfg) -> Contrast:
    """Draw a patient's contrast from the difficulty ranges of a :class:`PhantomConfig`."""
    lv = np.zeros(N_TISSUES)
    lv[LV_BLOOD] = 1.0
    myo = _log_uniform(rng, *cfg.nulling_range)
    lv[MYO] = myo
    lv[SCAR] = rng.uniform(*cfg.scar_blood_ratio)
    lv[MVO] = min(myo, 0.2) * rng.uniform(0.5, 1.2) + 0.03
    lv[CAVITY_MUSCLE] = myo  # disc-specific blend toward blood in the renderer
    lv[RV_BLOOD] = rng.uniform(0.85, 1.0)
    lv[RV_WALL] = myo * rng.uniform(1.0, 1.4) + 0.03
    fat = rng.uniform(0.55, 1.05)
    lv[EPI_FAT] = fat * rng.uniform(0.85, 1.1)
    lv[VESSEL] = rng.uniform(0.8, 1.1)
    lv[MEDIASTINUM] = rng.uniform(0.12, 0.3)  # soft tissue; fat streaks added by the renderer
    lv[LUNG] = rng.uniform(0.015, 0.05)
    lv[SUBCUT_FAT] = fat * rng.uniform(0.9, 1.2)
    lv[MUSCLE] = max(myo, 0.1) * rng.uniform(1.3, 2.5)
    lv[LIVER] = rng.uniform(0.3, 0.6)
    lv[MARROW] = rng.uniform(0.35, 0.65)
    lv[CANAL] = rng.uniform(0.15, 0.35)
    lv[AORTA] = rng.uniform(0.85, 1.15)
    return Contrast(
        levels=lv,
        scar_heterogeneity=rng.uniform(*cfg.scar_heterogeneity),
        grey_zone_mm=rng.uniform(*cfg.grey_zone_mm),
        grey_floor=rng.uniform(0.35, 0.6),
        blood_intensity=rng.uniform(*cfg.blood_intensity),
        noise=_log_uniform(rng, *cfg.noise_range),
        blur_sigma=rng.uniform(*cfg.blur_sigma),
    )
