"""Load an EMIDEC-layout NIfTI cohort into 2D short-axis slice records.

Each case is read once (:func:`engine.io.validation.read_case`), checked with the same checks as
``lgesynth validate`` and, when clean, cut into :class:`SliceRecord` s in the engine's one 2D
orientation (:mod:`engine.io.orientation`). Bad cases either stop the load (``on_invalid="fail"``)
or are quarantined and listed in the report (``"quarantine"``); none is dropped silently.

Example::

    cohort = load_cohort(CohortConfig(root="data/emidec", on_invalid="quarantine"))
    cohort.report.write_report("run/reports/cohort.json")
    positives = [r for r in cohort.records if r.positive]
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from engine.anatomy.aha import slice_levels
from engine.anatomy.labels import is_positive
from engine.io.orientation import spacing_to_slices, volume_to_slices
from engine.io.validation import (
    CaseData,
    CaseFiles,
    Problem,
    ValidationReport,
    cohort_problems,
    discover_cases,
    read_case,
    validate_case,
)

__all__ = [
    "CaseFiles", "Cohort", "CohortConfig", "CohortError", "SliceRecord",
    "discover_cases", "load_case", "load_cohort",
]

ON_INVALID = ("fail", "quarantine")


class CohortError(ValueError):
    """A cohort that cannot be loaded as configured. The message lists every problem, one a line."""

    def __init__(self, problems: list[Problem], header: str = "invalid cohort"):
        self.problems = list(problems)
        lines = [f"{header}: {len(self.problems)} problem(s)", *(str(p) for p in self.problems)]
        super().__init__("\n".join(lines))


@dataclass
class CohortConfig:
    """Where a cohort lives and how its stacks map to the engine's orientation.

    Args:
        root: the cohort root folder (EMIDEC layout, see :mod:`engine.io.validation`).
        reference_angle: AHA reference, the anterior RV insertion angle in degrees (DOMAIN.md section 2).
        mirrored: the stacks are stored as a mirror image (see :mod:`engine.io.orientation`).
        apex_first: the slice axis runs apex to base instead of base to apex.
        on_invalid: ``"fail"`` raises :class:`CohortError` on any problem; ``"quarantine"`` loads the
            clean cases and lists the bad ones in ``cohort.report.quarantined``.
        crop_size: side in pixels of the LV-centred crop later stages take (>= 16).

    Example::

        CohortConfig(root="phantom", apex_first=True, on_invalid="quarantine")
    """

    root: str
    reference_angle: float = 120.0
    mirrored: bool = False
    apex_first: bool = False
    on_invalid: Literal["fail", "quarantine"] = "fail"
    crop_size: int = 128

    def __post_init__(self) -> None:
        if isinstance(self.root, os.PathLike):
            self.root = os.fspath(self.root)
        if not isinstance(self.root, str) or not self.root:
            raise ValueError(f"CohortConfig.root must be a non-empty path, got {self.root!r}")
        if isinstance(self.reference_angle, bool) or not isinstance(self.reference_angle, (int, float)) or not math.isfinite(self.reference_angle):
            raise ValueError(f"CohortConfig.reference_angle must be a finite number of degrees, got {self.reference_angle!r}")
        self.reference_angle = float(self.reference_angle)
        for name in ("mirrored", "apex_first"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CohortConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.on_invalid not in ON_INVALID:
            raise ValueError(f"CohortConfig.on_invalid must be one of {ON_INVALID}, got {self.on_invalid!r}")
        if isinstance(self.crop_size, bool) or not isinstance(self.crop_size, int) or self.crop_size < 16:
            raise ValueError(f"CohortConfig.crop_size must be an integer >= 16 pixels, got {self.crop_size!r}")


@dataclass(frozen=True, eq=False)  # arrays inside: identity equality and hashing
class SliceRecord:
    """One 2D short-axis slice of a patient, in the engine orientation.

    Args:
        patient_id: the case id (case folder name).
        slice_index: position in the base-to-apex engine stack (after ``apex_first`` is undone); the
            NIfTI slice is ``k = slice_index``, or ``n_slices - 1 - slice_index`` when ``apex_first``.
        level: "basal", "mid", "apical" or "apex" (:func:`engine.anatomy.aha.slice_levels`).
        image: float32 [H, W], raw intensities, row 0 at the top.
        label: uint8 [H, W], DOMAIN labels 0-4.
        spacing: (row_mm, col_mm) from the header zooms (never from the affine).
        slice_thickness: mm, the header zoom of the slice axis.
    """

    patient_id: str
    slice_index: int
    level: str
    image: np.ndarray = field(repr=False)
    label: np.ndarray = field(repr=False)
    spacing: tuple[float, float]
    slice_thickness: float

    @property
    def positive(self) -> bool:
        """Holds any scar (labels 3 or 4)."""
        return is_positive(self.label)

    @property
    def source(self) -> str:
        return f"{self.patient_id}/{self.slice_index}"


@dataclass
class Cohort:
    """A loaded cohort.

    Attributes:
        records: every slice with an LV, patients in sorted order, base to apex.
        patients: patient id -> positive (any slice holds scar).
        report: the validation report, with quarantined cases and slices kept out for having no LV.
    """

    records: list[SliceRecord]
    patients: dict[str, bool]
    report: ValidationReport

    def patient_records(self, patient_id: str) -> list[SliceRecord]:
        return [r for r in self.records if r.patient_id == patient_id]


def _records(case: CaseData, cfg: CohortConfig) -> tuple[list[SliceRecord], int]:
    """A clean case -> (records of slices with an LV, number of slices without one)."""
    images = volume_to_slices(case.image, cfg.mirrored, cfg.apex_first).astype(np.float32, copy=False)
    labels = volume_to_slices(np.rint(case.label) if np.issubdtype(case.label.dtype, np.floating) else case.label,
                              cfg.mirrored, cfg.apex_first).astype(np.uint8)
    thickness, row_mm, col_mm = spacing_to_slices(case.image_zooms)
    records, without_lv = [], 0
    for index, level in enumerate(slice_levels(labels)):
        if level is None:
            without_lv += 1
            continue
        records.append(
            SliceRecord(
                patient_id=case.case_id,
                slice_index=index,
                level=level,
                image=images[index],
                label=labels[index],
                spacing=(row_mm, col_mm),
                slice_thickness=thickness,
            )
        )
    return records, without_lv


def load_case(case_files: CaseFiles, cfg: CohortConfig) -> list[SliceRecord]:
    """Read, check and cut one case into slice records (slices without an LV are left out).

    Raises:
        CohortError: the case has problems (listed in the message).
    """
    case = read_case(case_files)
    problems = validate_case(case)
    if problems:
        raise CohortError(problems, header=f"invalid case {case_files.case_id}")
    return _records(case, cfg)[0]


def load_cohort(cfg: CohortConfig) -> Cohort:
    """Load every case of ``cfg.root``, running the same checks as :func:`validate_cohort`.

    Raises:
        CohortError: with ``on_invalid="fail"``, when there is any problem; with ``"quarantine"``, when
            a problem concerns the cohort as a whole (e.g. an empty root) or no clean case is left.
    """
    cases = discover_cases(cfg.root)
    report = ValidationReport(root=cfg.root, checked=len(cases))
    report.problems.extend(cohort_problems(cfg.root, cases))
    bad_ids = {p.case_id for p in report.problems}
    records: list[SliceRecord] = []
    for files in cases:
        case = read_case(files)
        problems = validate_case(case)
        report.problems.extend(problems)
        if problems or files.case_id in bad_ids or (cfg.on_invalid == "fail" and report.problems):
            continue  # under "fail", once anything is wrong the remaining cases are only checked
        case_records, without_lv = _records(case, cfg)
        records.extend(case_records)
        if without_lv:
            report.slices_without_lv[files.case_id] = without_lv
    if report.problems and (cfg.on_invalid == "fail" or any(p.case_id is None for p in report.problems)):
        raise CohortError(report.problems, header=f"invalid cohort {cfg.root}")
    for p in report.problems:
        report.quarantined.setdefault(p.case_id, []).append(str(p))
    if not records:
        raise CohortError(report.problems, header=f"no clean case left in cohort {cfg.root}")
    patients: dict[str, bool] = {}
    for r in records:
        patients[r.patient_id] = patients.get(r.patient_id, False) or r.positive
    return Cohort(records=records, patients=patients, report=report)
