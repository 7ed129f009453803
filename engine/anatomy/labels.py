"""Label vocabulary shared by every stage (EMIDEC convention, DOMAIN.md section 1).

Per-pixel labels: 0 background, 1 LV cavity (blood pool), 2 healthy myocardium, 3 scar (infarct),
4 MVO / no-reflow. The myocardium as a region is {2, 3, 4}; scar as a target is {3, 4}.
"""

from __future__ import annotations

import numpy as np

BACKGROUND = 0
CAVITY = 1
MYOCARDIUM = 2
SCAR = 3
MVO = 4
VALID_LABELS = (BACKGROUND, CAVITY, MYOCARDIUM, SCAR, MVO)


def myocardium_region(label: np.ndarray) -> np.ndarray:
    """Boolean mask of the myocardium as a region (healthy, scar and MVO: labels 2, 3, 4)."""
    return np.asarray(label) >= MYOCARDIUM


def scar_region(label: np.ndarray) -> np.ndarray:
    """Boolean mask of scar as a target (scar and MVO: labels 3, 4)."""
    return np.asarray(label) >= SCAR


def cavity_region(label: np.ndarray) -> np.ndarray:
    """Boolean mask of the LV cavity (label 1)."""
    return np.asarray(label) == CAVITY


def is_positive(label: np.ndarray) -> bool:
    """A slice (or volume) is positive when it holds any scar pixel (labels 3 or 4)."""
    return bool(np.any(scar_region(label)))
