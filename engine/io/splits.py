"""Patient-level train/val/test splits, stratified by positive (scar) vs negative patients.

Splits are always by patient (DOMAIN.md section 1): no patient has slices on both sides.

Allocation, per stratum (positive patients, then negative ones) of ``n`` patients:

1. sort the ids, then shuffle them with a generator seeded by ``(seed, stratum)`` so the result
   depends only on the seed and the set of ids, never on dict order;
2. give split ``s`` ``floor(n * f_s)`` patients, then hand the remaining ones out by largest
   remainder ``n * f_s - floor(n * f_s)`` (ties to the earlier split: train, val, test);
3. if ``n >= 3``, every split still empty takes one patient from the largest split, so each split
   gets at least one patient of every stratum that has three or more.

Each split is therefore non-empty whenever some stratum has at least three patients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def _check_fractions(fractions: Sequence[float], names: Sequence[str] = SPLITS) -> tuple[float, ...]:
    values = tuple(fractions)
    if len(values) != len(names):
        count = {2: "two", 3: "three"}.get(len(names), str(len(names)))
        raise ValueError(f"split fractions must be {count} numbers {tuple(names)}, got {fractions!r}")
    if any(isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0 for f in values):
        raise ValueError(f"split fractions must all be > 0, got {fractions!r}")
    if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must sum to 1, got {fractions!r} (sum {sum(values):.6g})")
    return tuple(float(f) for f in values)  # type: ignore[return-value]


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Patients per split for a stratum of ``n`` (largest remainder, then no empty split if n >= 3)."""
    quotas = [n * f for f in fractions]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda s: (-(quotas[s] - counts[s]), s))
    for s in order[: n - sum(counts)]:
        counts[s] += 1
    if n >= len(counts):
        for s in range(len(counts)):
            if counts[s] == 0:
                donor = max(range(len(counts)), key=lambda t: (counts[t], -t))
                counts[donor] -= 1
                counts[s] += 1
    return counts


def split_patients(patients: dict[str, bool], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0,
                   names: Sequence[str] = SPLITS) -> dict[str, list[str]]:
    """Split patients into train/val/test, stratified by their positive flag (see module docstring).

    Args:
        patients: patient id -> positive (any slice holds scar).
        fractions: shares of the splits; each > 0, summing to 1.
        seed: the shuffle seed.
        names: the splits (default train, val, test; train and val alone where the test patients
            come from another cohort).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each list sorted; every patient in exactly one.
    """
    fractions = _check_fractions(fractions, names)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"split seed must be a non-negative integer, got {seed!r}")
    out: dict[str, list[str]] = {name: [] for name in names}
    for stratum in (True, False):
        ids = sorted(pid for pid, positive in patients.items() if bool(positive) is stratum)
        rng = np.random.default_rng([int(seed), int(stratum)])
        shuffled = [ids[i] for i in rng.permutation(len(ids))]
        start = 0
        for name, count in zip(names, _allocate(len(ids), fractions)):
            out[name].extend(shuffled[start : start + count])
            start += count
    return {name: sorted(ids) for name, ids in out.items()}


def split_records(records: Iterable, splits: dict[str, list[str]]) -> dict[str, list]:
    """Group slice records (anything with ``patient_id``) by the split their patient is in.

    Raises:
        ValueError: a patient is in several splits, or a record's patient is in none (nothing is
            dropped silently).
    """
    where: dict[str, str] = {}
    for name, ids in splits.items():
        for pid in ids:
            if pid in where and where[pid] != name:
                raise ValueError(f"patient {pid!r} is in both the {where[pid]!r} and {name!r} splits")
            where[pid] = name
    out: dict[str, list] = {name: [] for name in splits}
    for record in records:
        if record.patient_id not in where:
            raise ValueError(f"record {getattr(record, 'source', record.patient_id)!r}: patient {record.patient_id!r} is in no split")
        out[where[record.patient_id]].append(record)
    return out


@dataclass
class SplitConfig:
    """How patients are split.

    Args:
        fractions: shares of train, val, test; each > 0, summing to 1.
        seed: the shuffle seed (same seed and same patients -> same split).

    Example::

        SplitConfig(fractions=(0.7, 0.15, 0.15), seed=3).split(cohort.patients)
    """

    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    seed: int = 0

    def __post_init__(self) -> None:
        self.fractions = _check_fractions(self.fractions)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"SplitConfig.seed must be a non-negative integer, got {self.seed!r}")
        self.seed = int(self.seed)

    def split(self, patients: dict[str, bool]) -> dict[str, list[str]]:
        return split_patients(patients, self.fractions, self.seed)
