"""Anatomy-aware captions (DOMAIN.md section 3), deterministic for a given label slice.

Example: ``"LGE short-axis, mid slice. Enhancement in mid inferior and mid inferolateral segments,
subendocardial, 26-50% transmural."``; a negative slice: ``"LGE short-axis, mid slice. No
enhancement."``. ``mode="constant"`` gives the constant caption of the paper's ablation.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from engine.anatomy.aha import SEGMENT_NAMES
from engine.anatomy.transmurality import ScarAnatomy, describe_scar

CONSTANT_CAPTION = "LGE short-axis slice of the left ventricle."
CaptionMode = Literal["descriptive", "constant"]


def _join(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def caption_from_anatomy(anatomy: ScarAnatomy, level: str) -> str:
    """Caption text from an already computed :class:`ScarAnatomy`."""
    head = f"LGE short-axis, {level} slice." if level != "apex" else "LGE short-axis, apical cap."
    if not anatomy.segments:
        return f"{head} No enhancement."
    names = [SEGMENT_NAMES[s] for s in anatomy.segments]
    where = f"{_join(names)} segment" + ("s" if len(names) > 1 else "")
    if anatomy.layer == "transmural":
        depth = f"{anatomy.transmurality_class} transmural"
    else:
        depth = f"{anatomy.layer}, {anatomy.transmurality_class} transmural"
    mvo = ", with microvascular obstruction" if anatomy.mvo else ""
    return f"{head} Enhancement in {where}, {depth}{mvo}."


def caption(label: np.ndarray, level: str, reference_angle: float = 120.0, mode: CaptionMode = "descriptive") -> str:
    """Caption of a 2D label slice (scar = labels 3/4) at a slice level.

    Args:
        label: 2D label slice (DOMAIN labels), engine orientation.
        level: "basal", "mid", "apical" or "apex".
        reference_angle: anterior RV insertion angle in degrees.
        mode: "descriptive" (anatomy-aware) or "constant" (the ablation's fixed caption).
    """
    if mode == "constant":
        return CONSTANT_CAPTION
    if mode != "descriptive":
        raise ValueError(f"unknown caption mode {mode!r}; expected 'descriptive' or 'constant'")
    return caption_from_anatomy(describe_scar(label, level, reference_angle), level)
