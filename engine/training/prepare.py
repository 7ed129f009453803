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
from engine.io.splits import split_patients
from engine.training.data import SliceArrays, build_slice_arrays, split_arrays

SPLITS_FILE = "splits.json"
COHORT_REPORT = "reports/cohort_validation.json"


def run_splits(run_dir: str, patients: dict[str, bool], split_cfg, test_patients: dict[str, bool] | None = None,
               test_cohort: str = "") -> dict[str, list[str]]:
    """The run's patient split: read from ``<run_dir>/splits.json``, or made and written there.

    With ``test_patients`` (an external test cohort's, ``evaluation.test_cohort``) they are the test
    split, and ``patients`` split into train and validation only, in the proportions of the
    configured train and validation fractions.
    """
    path = Path(run_dir) / SPLITS_FILE
    everyone = {**patients, **(test_patients or {})}
    if path.is_file():
        stored = json.loads(path.read_text())
        splits = {k: list(v) for k, v in stored["splits"].items()}
        known = sorted(p for part in splits.values() for p in part)
        # the ids decide (the test cohort's path may be written relative or absolute, or have moved)
        if known != sorted(everyone) or bool(stored.get("test_cohort")) != bool(test_cohort):
            missing = sorted(set(everyone) - set(known))
            extra = sorted(set(known) - set(everyone))
            raise ValueError(
                f"{path}: the run's split does not match the cohort (not in the split: {missing[:5]}, "
                f"no longer in the cohort: {extra[:5]}; external test cohort {stored.get('test_cohort') or 'none'} "
                f"then, {test_cohort or 'none'} now); use a new run_dir for a different cohort"
            )
        return splits
    if test_patients:
        train, val = split_cfg.fractions[:2]
        splits = split_patients(patients, (train / (train + val), val / (train + val)), split_cfg.seed, ("train", "val"))
        splits["test"] = sorted(test_patients)
    else:
        splits = split_cfg.split(patients)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    record = {"seed": split_cfg.seed, "fractions": list(split_cfg.fractions), "splits": splits}
    if test_cohort:
        record["test_cohort"] = test_cohort
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return splits


def load_test_cohort(cfg, own_patients: dict[str, bool]):
    """The external test cohort of ``evaluation.test_cohort``, loaded with the run's cohort settings
    (orientation, crop) and checked strictly: any invalid case refuses it (a test set is what the
    user named, never a quarantined part of it), and so do patient ids the run's own cohort holds.

    Raises:
        ValueError (CohortError included): naming the folder and the reason.
    """
    import dataclasses

    from engine.io.cohort import CohortError

    root = cfg.evaluation.test_cohort
    if not Path(root).is_dir():
        raise ValueError(f"evaluation.test_cohort {root}: no such folder")
    try:
        cohort = load_cohort(dataclasses.replace(cfg.cohort, root=root, on_invalid="fail"))
    except CohortError as err:
        raise CohortError(err.problems, header=f"evaluation.test_cohort {root} is refused: it does not validate") from None
    shared = sorted(set(cohort.patients) & set(own_patients))
    if shared:
        raise ValueError(
            f"evaluation.test_cohort {root}: {len(shared)} patient id(s) are also in the run's cohort "
            f"{cfg.cohort.root} ({', '.join(shared[:5])}{', ...' if len(shared) > 5 else ''}); an external test set "
            "must hold other patients (a phantom: `lgesynth phantom OUT --first-case 1001` numbers its cases apart)")
    return cohort


def prepare_arrays(cfg) -> tuple[dict[str, SliceArrays], dict[str, list[str]]]:
    """Load and check the cohort (``cfg.cohort``; bad cases fail or are quarantined into
    ``<run_dir>/reports/cohort_validation.json``), fix the split, and build each split's slice arrays.
    With ``evaluation.test_cohort`` the test patients are that cohort's (:func:`load_test_cohort`)
    and the run's cohort splits into train and validation only.

    Returns:
        ``({"train", "val", "test"} -> SliceArrays, splits)``.
    """
    cohort = load_cohort(cfg.cohort)
    report_path = Path(cfg.run_dir) / COHORT_REPORT
    report_path.parent.mkdir(parents=True, exist_ok=True)
    cohort.report.write_report(report_path)
    external = cfg.evaluation.test_cohort
    test = load_test_cohort(cfg, cohort.patients) if external else None
    splits = run_splits(cfg.run_dir, cohort.patients, cfg.split, test.patients if test else None, external)
    arrays = build_slice_arrays(cohort.records, cfg.data, reference_angle=cfg.cohort.reference_angle)
    if test is None:
        return split_arrays(arrays, splits), splits
    parts = split_arrays(arrays, {k: v for k, v in splits.items() if k != "test"})
    parts["test"] = build_slice_arrays(test.records, cfg.data, reference_angle=cfg.cohort.reference_angle)
    return parts, splits
