"""Driver-side preparation shared by every training stage: the validated cohort, the run's
patient-level split (fixed once per run), and the stacked slice arrays of each split.

The split is written to ``<run_dir>/splits.json`` by the first stage that needs it and read back by
every later one, so the reward model, generator and downstream model never see different splits;
a cohort whose patients no longer match the stored split is an error, not a silent re-split.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine.io.cohort import load_cohort
from engine.training.data import SliceArrays, build_slice_arrays, split_arrays

SPLITS_FILE = "splits.json"
COHORT_REPORT = "reports/cohort_validation.json"


def run_splits(run_dir: str, patients: dict[str, bool], split_cfg) -> dict[str, list[str]]:
    """The run's patient split: read from ``<run_dir>/splits.json``, or made and written there."""
    path = Path(run_dir) / SPLITS_FILE
    if path.is_file():
        stored = json.loads(path.read_text())
        splits = {k: list(v) for k, v in stored["splits"].items()}
        known = sorted(p for part in splits.values() for p in part)
        if known != sorted(patients):
            missing = sorted(set(patients) - set(known))
            extra = sorted(set(known) - set(patients))
            raise ValueError(
                f"{path}: the run's split does not match the cohort (not in the split: {missing[:5]}, "
                f"no longer in the cohort: {extra[:5]}); use a new run_dir for a different cohort"
            )
        return splits
    splits = split_cfg.split(patients)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"seed": split_cfg.seed, "fractions": list(split_cfg.fractions), "splits": splits}, indent=1) + "\n")
    os.replace(tmp, path)
    return splits


def prepare_arrays(cfg) -> tuple[dict[str, SliceArrays], dict[str, list[str]]]:
    """Load and check the cohort (``cfg.cohort``; bad cases fail or are quarantined into
    ``<run_dir>/reports/cohort_validation.json``), fix the split, and build each split's slice arrays.

    Returns:
        ``({"train", "val", "test"} -> SliceArrays, splits)``.
    """
    cohort = load_cohort(cfg.cohort)
    report_path = Path(cfg.run_dir) / COHORT_REPORT
    report_path.parent.mkdir(parents=True, exist_ok=True)
    cohort.report.write_report(report_path)
    splits = run_splits(cfg.run_dir, cohort.patients, cfg.split)
    arrays = build_slice_arrays(cohort.records, cfg.data, reference_angle=cfg.cohort.reference_angle)
    return split_arrays(arrays, splits), splits
