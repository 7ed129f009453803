"""Patient-level bootstrap intervals and paired differences for the utility gate.

The unit that was sampled is the patient: a test cohort is a draw of patients, and its slices are
not independent (one patient's slices share anatomy, scanner and scar). So every interval here comes
from resampling test patients with replacement (a percentile bootstrap, Efron & Tibshirani 1993),
never slices. Within each resample every metric is computed for each downstream training seed on
the resampled patients and then averaged over the seeds.

Averaging a fixed set of seeds alone would hide how training went: the interval would be that of
those trained models, which can be far narrower than their spread over seeds (benchmarks/RESULTS.md,
the phantom study). So by default the seeds are resampled too (a two-level bootstrap: in each resample the
seeds are drawn with replacement, as many as there are, and the patients as above; the metric is
the mean over the drawn seeds), and the interval holds both sources of variation: which patients
were tested and how training went. With few seeds that second part is coarse (three seeds make ten
distinct draws), and more seeds narrow it; ``resample_seeds=False`` gives the interval of the seeds
at hand.

By default the resampling is stratified by the patient's truth (positive patients are drawn from
the positive ones, negative from the negative ones, each as many as there are), as pROC does for
AUROC intervals: every resample then has both classes, so balanced accuracy and AUROC are always
defined, and the share of positives stays that of the test cohort.

Two arms tested on the same patients are compared by a paired bootstrap: one resample of patients
(and of seeds, when both arms ran the same seeds: seed s of every arm draws the same real slices)
serves both arms, and the interval is that of the difference of their seed-averaged metrics. Arms
differ only in their synthetic data (same seeds, same real draws, same test patients), so the
difference is what the synthetic data changed.

Per-patient inputs (:class:`PatientScores`), one record per patient and seed:

* ``positive``: the patient holds scar (truth);
* ``score``: the patient-level scar score, higher for more scar (AUROC is computed from it);
* ``called``: the calibrated decision (balanced accuracy, accuracy, sensitivity, specificity);
* ``scar_dice_sum`` / ``scar_slices``: the summed Dice over the patient's positive slices and their
  number (slice Dice pooled over the resampled patients' positive slices);
* ``scar_tp_dice_sum`` / ``scar_tp_slices``: the same over the positive slices where scar was found
  (Dice-TP);
* ``myocardium_dice_sum`` / ``myocardium_slices``: the same for the myocardium, over slices holding it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

METRICS = ("balanced_accuracy", "auroc", "accuracy", "sensitivity", "specificity", "dice", "dice_tp",
           "myocardium_dice")
RECORD_KEYS = ("positive", "score", "called", "scar_dice_sum", "scar_slices", "scar_tp_dice_sum", "scar_tp_slices",
               "myocardium_dice_sum", "myocardium_slices")
N_RESAMPLES = 2000


@dataclass
class PatientScores:
    """One arm's per-patient results over its seeds, on one set of test patients.

    Args:
        patients: patient ids ``[P]``.
        seeds: the training seeds ``[S]``.
        positive: bool ``[P]``, the truth.
        score: float ``[S, P]``; called: bool ``[S, P]``.
        scar_dice_sum, scar_tp_dice_sum, scar_tp_slices, myocardium_dice_sum, myocardium_slices:
            ``[S, P]``; scar_slices: ``[S, P]`` too (the same for every seed).
    """

    patients: list[str]
    seeds: list[int]
    positive: np.ndarray
    score: np.ndarray
    called: np.ndarray
    scar_dice_sum: np.ndarray
    scar_slices: np.ndarray
    scar_tp_dice_sum: np.ndarray
    scar_tp_slices: np.ndarray
    myocardium_dice_sum: np.ndarray
    myocardium_slices: np.ndarray

    @classmethod
    def from_runs(cls, runs: Sequence[Mapping[str, Any]]) -> PatientScores:
        """From one run per seed: ``{"seed": s, "patients": {patient id: record}}`` (records as in
        the module docstring). Every run must hold the same patients with the same truth.

        Raises:
            ValueError: no run, or runs over other patients or truths (named).
        """
        if not runs:
            raise ValueError("no downstream run to summarize")
        patients = sorted(runs[0]["patients"])
        for run in runs:
            if sorted(run["patients"]) != patients:
                other = sorted(set(run["patients"]) ^ set(patients))
                raise ValueError(f"seed {run['seed']}: scored on other patients than seed {runs[0]['seed']} "
                                 f"(differing: {other[:5]})")
            missing = [k for k in RECORD_KEYS if any(k not in run["patients"][p] for p in patients)]
            if missing:
                raise ValueError(f"seed {run['seed']}: patient records without {missing}")
        arrays = {k: np.asarray([[run["patients"][p][k] for p in patients] for run in runs]) for k in RECORD_KEYS}
        positive = arrays.pop("positive").astype(bool)
        if (positive != positive[0]).any():
            raise ValueError("the seeds' runs disagree on which patients are positive")
        return cls(patients=patients, seeds=[int(run["seed"]) for run in runs], positive=positive[0],
                   score=arrays["score"].astype(np.float64), called=arrays["called"].astype(bool),
                   **{k: arrays[k].astype(np.float64) for k in RECORD_KEYS[3:]})

    def check_paired(self, other: PatientScores, what: str = "") -> None:
        """Both arms tested on the same patients with the same truth (a paired comparison)."""
        if self.patients != other.patients or not np.array_equal(self.positive, other.positive):
            differing = sorted(set(self.patients) ^ set(other.patients))
            raise ValueError(f"{what or 'the two arms'}: not tested on the same patients (differing: {differing[:5]}), "
                             "so they cannot be compared patient by patient")


# ----------------------------------------------------------------------------------- weighted metrics
# Each takes the per-patient arrays of one arm and patient weights W [B, P] (how often each patient
# is in each resample; ones for the cohort itself) and returns the metric [B, S] per resample and seed.
def _rate(hits: np.ndarray, total: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hits / np.where(total > 0, total, 1), np.nan)


def _class_counts(s: PatientScores, w: np.ndarray) -> tuple[np.ndarray, ...]:
    pos, called = s.positive.astype(np.float64), s.called.astype(np.float64)
    tp = w @ (called * pos).T
    tn = w @ ((1 - called) * (1 - pos)).T
    n_pos, n_neg = (w @ pos)[:, None], (w @ (1 - pos))[:, None]
    return tp, tn, n_pos, n_neg


def _sensitivity(s: PatientScores, w: np.ndarray) -> np.ndarray:
    tp, _, n_pos, _ = _class_counts(s, w)
    return _rate(tp, np.broadcast_to(n_pos, tp.shape))


def _specificity(s: PatientScores, w: np.ndarray) -> np.ndarray:
    _, tn, _, n_neg = _class_counts(s, w)
    return _rate(tn, np.broadcast_to(n_neg, tn.shape))


def _balanced_accuracy(s: PatientScores, w: np.ndarray) -> np.ndarray:
    return (_sensitivity(s, w) + _specificity(s, w)) / 2


def _accuracy(s: PatientScores, w: np.ndarray) -> np.ndarray:
    tp, tn, n_pos, n_neg = _class_counts(s, w)
    return _rate(tp + tn, np.broadcast_to(n_pos + n_neg, tp.shape))


def _auroc(s: PatientScores, w: np.ndarray) -> np.ndarray:
    """The Mann-Whitney AUROC with patient weights: the weighted share of (positive, negative)
    pairs the score orders right, ties counting one half (sklearn's ``roc_auc_score``)."""
    pos, neg = np.flatnonzero(s.positive), np.flatnonzero(~s.positive)
    out = np.full((len(w), len(s.seeds)), np.nan)
    if not len(pos) or not len(neg):
        return out
    w_pos, w_neg = w[:, pos], w[:, neg]
    pairs = w_pos.sum(1) * w_neg.sum(1)
    for k in range(len(s.seeds)):
        sp, sn = s.score[k, pos][:, None], s.score[k, neg][None, :]
        right = (sp > sn) + 0.5 * (sp == sn)
        out[:, k] = _rate(np.einsum("bi,ij,bj->b", w_pos, right, w_neg), pairs)
    return out


def _pooled(total: str, count: str) -> Callable[[PatientScores, np.ndarray], np.ndarray]:
    def metric(s: PatientScores, w: np.ndarray) -> np.ndarray:
        return _rate(w @ getattr(s, total).T, w @ getattr(s, count).T)

    return metric


_METRIC_FNS: dict[str, Callable[[PatientScores, np.ndarray], np.ndarray]] = {
    "balanced_accuracy": _balanced_accuracy, "auroc": _auroc, "accuracy": _accuracy,
    "sensitivity": _sensitivity, "specificity": _specificity,
    "dice": _pooled("scar_dice_sum", "scar_slices"), "dice_tp": _pooled("scar_tp_dice_sum", "scar_tp_slices"),
    "myocardium_dice": _pooled("myocardium_dice_sum", "myocardium_slices"),
}


def confusion(scores: PatientScores, seed_index: int = 0) -> tuple[int, int, int, int]:
    """``(TN, FP, FN, TP)`` of one seed's calls on the whole cohort."""
    positive, called = scores.positive, scores.called[seed_index]
    return (int((~positive & ~called).sum()), int((~positive & called).sum()),
            int((positive & ~called).sum()), int((positive & called).sum()))


def metric_values(scores: PatientScores, metric: str, weights: np.ndarray | None = None) -> np.ndarray:
    """``metric`` ``[B, S]`` for patient weights ``[B, P]`` (default: the cohort once, ``[1, S]``)."""
    if metric not in _METRIC_FNS:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
    w = np.ones((1, len(scores.patients))) if weights is None else np.asarray(weights, np.float64)
    return _METRIC_FNS[metric](scores, w)


def _seed_mean(values: np.ndarray, seed_weights: np.ndarray | None = None) -> np.ndarray:
    """The mean over seeds of each resample ``[B, S]`` -> ``[B]``, each seed counted as often as
    ``seed_weights`` ``[B, S]`` draws it (default: once); NaN where no drawn seed has a value."""
    finite = np.isfinite(values)
    w = np.ones_like(values) if seed_weights is None else np.asarray(seed_weights, np.float64)
    w = np.where(finite, w, 0.0)
    count = w.sum(1)
    total = (np.where(finite, values, 0.0) * w).sum(1)
    return np.where(count > 0, total / np.where(count > 0, count, 1.0), np.nan)


def seed_resample_weights(n_seeds: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """How often each training seed is drawn in each resample: int ``[B, S]``, rows summing to S
    (a second generator, so the patients' draws stay those of :func:`resample_weights`)."""
    rng = np.random.default_rng([seed, 1])
    return rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_resamples)


# ---------------------------------------------------------------------------------------- resampling
def resample_weights(positive: np.ndarray, n_resamples: int, seed: int = 0, stratified: bool = True) -> np.ndarray:
    """How often each patient is drawn in each of ``n_resamples`` bootstrap resamples: int ``[B, P]``,
    each row summing to P (stratified: the positives' columns to the positives' count, the same for
    the negatives)."""
    rng = np.random.default_rng(seed)
    positive = np.asarray(positive, bool)
    n = len(positive)
    weights = np.zeros((n_resamples, n), np.int64)
    groups = [np.flatnonzero(positive), np.flatnonzero(~positive)] if stratified else [np.arange(n)]
    for members in groups:
        if len(members):
            weights[:, members] = rng.multinomial(len(members), np.full(len(members), 1.0 / len(members)),
                                                  size=n_resamples)
    return weights


def _interval(samples: np.ndarray) -> list[float | None]:
    finite = samples[np.isfinite(samples)]
    if not len(finite):
        return [None, None]
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return [float(lo), float(hi)]


def _number(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def summary(scores: PatientScores, metrics: Sequence[str] = METRICS, n_resamples: int = N_RESAMPLES, seed: int = 0,
            stratified: bool = True, resample_seeds: bool = True) -> dict[str, dict[str, Any]]:
    """Per metric: ``mean`` (over seeds, on the whole cohort), ``sd`` (over seeds), ``n`` (seeds
    with a value), ``ci95`` (the bootstrap interval of the seed mean: patients, and seeds unless
    ``resample_seeds`` is false) and ``resamples`` (those where the metric was defined)."""
    weights = resample_weights(scores.positive, n_resamples, seed, stratified)
    seed_w = seed_resample_weights(len(scores.seeds), n_resamples, seed) if resample_seeds else None
    out = {}
    for metric in metrics:
        per_seed = metric_values(scores, metric)[0]
        finite = per_seed[np.isfinite(per_seed)]
        boot = _seed_mean(metric_values(scores, metric, weights), seed_w)
        out[metric] = {"mean": _number(finite.mean()) if len(finite) else None,
                       "sd": _number(finite.std(ddof=1)) if len(finite) > 1 else (0.0 if len(finite) else None),
                       "n": int(len(finite)), "ci95": _interval(boot), "resamples": int(np.isfinite(boot).sum())}
    return out


def paired_difference(arm: PatientScores, reference: PatientScores, metrics: Sequence[str] = METRICS,
                      n_resamples: int = N_RESAMPLES, seed: int = 0, stratified: bool = True,
                      what: str = "", resample_seeds: bool = True) -> dict[str, dict[str, Any]]:
    """Per metric: ``diff`` (arm minus reference, seed means on the whole cohort) and ``ci95`` (the
    paired bootstrap interval of that difference: one resample of patients for both, and of seeds
    unless ``resample_seeds`` is false: the same draw for both when they ran the same seeds, else
    one for each).

    Raises:
        ValueError: the arms were not tested on the same patients.
    """
    arm.check_paired(reference, what)
    weights = resample_weights(arm.positive, n_resamples, seed, stratified)
    arm_w = ref_w = None
    if resample_seeds:
        arm_w = seed_resample_weights(len(arm.seeds), n_resamples, seed)
        ref_w = arm_w if arm.seeds == reference.seeds else seed_resample_weights(len(reference.seeds), n_resamples,
                                                                                 seed + 1)
    out = {}
    for metric in metrics:
        point = _seed_mean(metric_values(arm, metric)) - _seed_mean(metric_values(reference, metric))
        boot = (_seed_mean(metric_values(arm, metric, weights), arm_w)
                - _seed_mean(metric_values(reference, metric, weights), ref_w))
        out[metric] = {"diff": _number(point[0]), "ci95": _interval(boot), "resamples": int(np.isfinite(boot).sum())}
    return out


def excludes_zero(entry: Mapping[str, Any] | None) -> int:
    """+1 when a difference's interval lies above zero, -1 below, 0 when it holds zero (or is missing)."""
    lo, hi = (entry or {}).get("ci95") or [None, None]
    if lo is None or hi is None:
        return 0
    return 1 if lo > 0 else -1 if hi < 0 else 0


__all__ = ["METRICS", "N_RESAMPLES", "PatientScores", "confusion", "excludes_zero", "metric_values", "paired_difference",
           "resample_weights", "seed_resample_weights", "summary"]
