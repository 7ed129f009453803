"""The three gates of DOMAIN.md section 5, each a function of exported models, stores and real slices.

- realism: held-out real positive slices, the scar region masked and refilled by a method with the
  real scar's edge map and caption; SSIM and RMSE against the real image, whole and LV crop.
- alignment: on a method's synthetic candidates (a store), the pass rate at the filter threshold and
  Dice-TP; the reward model's pass rate on real positives is the reference (paper: 35.6%).
- utility: a downstream model trained on real train patients only, or with N filtered synthetic
  samples, tested on real test patients: Dice, Dice-TP, accuracy, balanced accuracy, [TN, FP, FN, TP].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

QUALITY_KEYS = ("ssim_whole", "ssim_crop", "rmse_whole", "rmse_crop", "ssim_region", "rmse_region")
logger = logging.getLogger(__name__)
RATIO_KEYS = ("scar_blood", "scar_remote")


@dataclass
class EvaluationConfig:
    """``lgesynth evaluate``.

    Args:
        methods: synthesis methods compared (:mod:`engine.synthesis.methods`); every report also
            holds the real-only row, and should hold ``paste``, the model-free control.
        realism_split: whose real positive slices the realism gate refills ("test": held out).
        realism_max: at most this many positive slices for the realism gate (0: all).
        seeds: downstream training seeds of the utility gate (mean and spread over them; >= 3
            for a figure anyone should believe).
        n_synthetic: filtered synthetic samples added to the real training slices per method (the
            paper: 300); when a method kept fewer, all it kept are used and the report says so.
        equal_n: every method adds the same number of samples (the fewest any method kept, at
            most ``n_synthetic``), so that utility compares methods and not sample counts.
        candidates: candidates each method's store holds (0: ``synthesis.max_candidates``).
        report_dir: where the report goes (empty: ``<run_dir>/reports``).
        collapse_min_positive: a downstream model that calls fewer test patients positive than
            this, or all of them, is reported as collapsed.
        test_cohort: a cohort in the EMIDEC layout whose patients are the test set (a second site,
            or a phantom made with another seed and ``--first-case``): never used for training,
            validation, calibration, thresholds or model selection; the run's own cohort then
            splits into train and validation only. Empty: the test split of the run's cohort.
        bootstrap_resamples: resamples of the test patients for every interval (>= 1000).
        bootstrap_seed: the resampling's seed (the same resamples for every arm: paired).
    """

    methods: list[str] = field(default_factory=lambda: ["paste", "lgesynthnet"])
    realism_split: str = "test"
    realism_max: int = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_synthetic: int = 300
    equal_n: bool = True
    candidates: int = 0
    report_dir: str = ""
    collapse_min_positive: int = 1
    test_cohort: str = ""
    bootstrap_resamples: int = 2000
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        from engine.synthesis.methods import METHODS

        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct names from {', '.join(METHODS)}, got {self.methods}")
        if self.realism_split not in ("train", "val", "test"):
            raise ValueError(f"realism_split must be 'train', 'val' or 'test', got {self.realism_split!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be distinct non-negative integers, got {self.seeds}")
        if self.bootstrap_resamples < 1000:
            raise ValueError(f"bootstrap_resamples must be >= 1000 (the tails of a 95% interval rest on 25 "
                             f"resamples each), got {self.bootstrap_resamples}")
        for name in ("realism_max", "n_synthetic", "candidates", "collapse_min_positive", "bootstrap_seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def mean_sd(values: list[float]) -> dict[str, float]:
    """``{"mean", "sd", "n"}`` of the finite values (sd with ddof=1; 0 for one value; NaN for none)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if not len(v):
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def realism_items(arrays, data_cfg, max_slices: int = 0) -> dict[str, Any]:
    """The realism gate's inputs: every positive slice of ``arrays`` that holds a blood pool (at most
    ``max_slices``, the first in slice order) with its real scar as the region to refill, its edge
    map and caption.

    A positive slice without a blood pool label (an apical slice, where the cavity has closed) is
    left out for every method alike: the paste control measures its scar level on the blood pool, and
    realism compares the methods on the same slices. ``items["left_out"]`` lists the sources of the
    slices left out (logged; the evaluation records their count)."""
    from engine.anatomy.labels import CAVITY
    from engine.training.data import inpainting_arrays

    items = inpainting_arrays(arrays, data_cfg)
    has_blood = (np.asarray(items["label"]) == CAVITY).reshape(len(items["label"]), -1).any(1)
    left_out = [str(s) for s, keep in zip(items["source"], has_blood, strict=True) if not keep]
    if left_out:
        logger.warning("realism: %d positive slice(s) without a blood pool left out for every method (%s%s)",
                       len(left_out), ", ".join(left_out[:5]), ", ..." if len(left_out) > 5 else "")
    keep = np.flatnonzero(has_blood)
    if max_slices:
        keep = keep[:max_slices]
    items = {k: v[keep] if isinstance(v, np.ndarray) else [v[i] for i in keep] for k, v in items.items()}
    items["source_label"] = items["label"]  # what the paste control measures the blood pool on
    items["left_out"] = left_out
    return items


def realism(actor, items: dict[str, Any], seed: int) -> dict[str, Any]:
    """Refill ``items`` with a method's actor (``generate(inputs, noise_seeds)``) and score the result
    against the real images over the same pixels for every method: each method's output is kept
    inside the inpainting region (the real scar dilated by ``data.mask_dilation``) and the real image
    outside it, since paste rewrites only the scar pixels, LGESynthNet the dilated region and SPADE
    or ControlNet the whole crop; whole-image and LV-crop SSIM and RMSE of that composite, and SSIM
    and RMSE inside the region (:func:`engine.evaluation.metrics.region_quality`). Per-sample
    scores' means and SDs, and the composites in [0, 1] (for the figures)."""
    from engine.evaluation.metrics import image_quality, region_quality

    seeds = [int(seed) * 1_000_003 + i for i in range(len(items["image"]))]
    generated = np.asarray(actor.generate(items, seeds), np.float32)
    real01 = (np.asarray(items["image"], np.float32)[:, 0] + 1.0) / 2.0
    region = np.asarray(items["mask"])[:, 0] > 0
    gen01 = np.where(region, np.clip((generated[:, 0] + 1.0) / 2.0, 0.0, 1.0), real01)
    scores = [{**image_quality(g, r, lab), **region_quality(g, r, m, float(r.max() - r.min()))}
              for g, r, lab, m in zip(gen01, real01, items["label"], region, strict=True)]
    out: dict[str, Any] = {"slices": len(scores), "seed": int(seed),
                           "left_out_no_blood_pool": len(items.get("left_out", []))}
    for key in QUALITY_KEYS:
        out[key] = mean_sd([s[key] for s in scores])
    out["images"] = gen01
    return out


def ratio_distance(ratios: dict[str, np.ndarray], real: dict[str, np.ndarray]) -> dict[str, Any]:
    """How a method's scar intensities sit against real scar's: per ratio (scar / blood pool, scar /
    remote myocardium), the median and interquartile range of each, and the 1-Wasserstein distance
    between the two distributions (``scipy.stats.wasserstein_distance``; 0: the same)."""
    from scipy.stats import wasserstein_distance

    out: dict[str, Any] = {}
    for key in RATIO_KEYS:
        mine, theirs = np.asarray(ratios[key]), np.asarray(real[key])
        entry: dict[str, Any] = {"n": int(len(mine))}
        if len(mine):
            entry["median"], entry["iqr"] = float(np.median(mine)), [float(q) for q in np.percentile(mine, [25, 75])]
        if len(mine) and len(theirs):
            entry["wasserstein_to_real"] = float(wasserstein_distance(mine, theirs))
        out[key] = entry
    return out


def store_ratios(url: str, storage_options: dict | None = None, limit: int = 500) -> dict[str, np.ndarray]:
    """Scar intensity ratios (:func:`engine.evaluation.metrics.scar_intensity_ratios`) of a store's
    kept samples (at most ``limit``, evenly spread), their labels being the reward model's scar."""
    from engine.evaluation.metrics import scar_intensity_ratios
    from engine.synthesis.store import read_synthetic_arrays, synthetic_rows

    rows = synthetic_rows(url, storage_options=storage_options)
    if not len(rows):
        return {key: np.zeros(0) for key in RATIO_KEYS}
    rows = rows[np.unique(np.linspace(0, len(rows) - 1, min(limit, len(rows))).round().astype(int))]
    kept = read_synthetic_arrays(url, storage_options=storage_options, rows=rows)
    return scar_intensity_ratios(np.asarray(kept["image"])[:, 0], np.asarray(kept["label"]))


def real_positive_reference(reward_folder: str | Path, arrays, threshold: float) -> dict[str, float]:
    """The alignment gate's reference: the frozen reward model on real positive slices (pass rate at
    ``threshold``, Dice, Dice-TP). The paper's reward model passes 35.6% of real positives."""
    from engine.synthesis.actors import load_reward
    from engine.training.segmentation import scar_validation

    model = load_reward(reward_folder)
    positive = (arrays.label >= 3).reshape(len(arrays), -1).any(1)
    metrics = scar_validation(model, arrays.image[positive], arrays.label[positive], "-1,1", "cpu", threshold)
    return {"slices": int(positive.sum()), "pass_rate": metrics.get("val_pass_rate", float("nan")),
            "dice": metrics.get("val_scar_dice", float("nan")), "dice_tp": metrics.get("val_scar_dice_tp", float("nan"))}


def store_alignment(url: str, threshold: float, storage_options: dict | None = None) -> dict[str, Any]:
    """Alignment of a method's candidates from its store: pass rate over the candidates made (Dice >
    ``threshold``) and Dice-TP, the mean Dice over candidates whose scar the reward model found at
    all (Dice > 0: the conditioning scar always holds scar, so these are its true positives; a
    prediction that misses the scar entirely counts as not found). Also the Dice values (histograms)."""
    from engine.synthesis.store import open_store, read_arrays, store_attrs

    group = open_store(url, "r", storage_options)
    rows = read_arrays(group, ("dice", "skip_reason", "passed"))
    dice = np.asarray(rows["dice"], np.float64)
    made = np.asarray([not str(r) for r in rows["skip_reason"]], bool)
    # the filter's own decision, not the stored float32 Dice compared again (a Dice of exactly the
    # threshold, e.g. 0.6 = 2*3/10, reads back as 0.6000000238 > 0.6)
    passed = np.asarray(rows["passed"], bool)[made]
    stored = store_attrs(group).get("config", {}).get("threshold")
    if stored is not None and abs(float(stored) - threshold) > 1e-9:
        raise ValueError(f"{url}: the store was filtered at Dice > {stored}, the evaluation asks for {threshold}")
    dice = dice[made]
    found = dice > 0
    return {"candidates": int(made.size), "made": int(made.sum()), "kept": int(passed.sum()),
            "pass_rate": float(passed.mean()) if dice.size else float("nan"),
            "dice_tp": float(dice[found].mean()) if found.any() else float("nan"),
            "found_rate": float(found.mean()) if dice.size else float("nan"), "dice": dice}


def calibrate_detection(scores: dict[str, float], truth: dict[str, bool], fallback: float) -> float:
    """The patient-level score threshold (positive: score > threshold) with the best balanced
    accuracy on ``scores`` of patients with known ``truth`` (the validation patients); among equally
    good thresholds the median one. ``fallback`` when the patients are all of one class."""
    from engine.evaluation.metrics import confusion_metrics, patient_confusion, patient_detection

    if len(set(truth.values())) < 2:
        return float(fallback)
    values = sorted(set(float(a) for a in scores.values()))
    candidates = [-1.0, *values]  # -1: everyone positive; each observed score: those above it
    balanced = [confusion_metrics(*patient_confusion(truth, patient_detection(scores, t)))["balanced_accuracy"]
                for t in candidates]
    best = max(balanced)
    tied = [t for t, score in zip(candidates, balanced, strict=True) if score == best]
    return float(max(0.0, tied[len(tied) // 2]))


def score_downstream(folder: str | Path, arrays, val_arrays=None, collapse_min_positive: int = 1) -> dict[str, Any]:
    """An exported downstream model (``<folder>/downstream.*``) on real slices (the test patients).

    A patient's score is its largest component of predicted scar inside the predicted myocardium
    (mm^2, :func:`engine.evaluation.metrics.largest_scar_component_mm2`); the threshold that calls
    it positive is calibrated on ``val_arrays`` (the validation patients: best balanced accuracy),
    never on the test patients; without them, or when they are all of one class, the model's
    ``detection_min_mm2``. AUROC needs no threshold.

    Returns:
        ``dice`` (scar, mean over positive slices), ``dice_tp``, ``myocardium_dice``, ``auroc``,
        ``accuracy``, ``balanced_accuracy``, ``confusion`` [TN, FP, FN, TP], ``patients``,
        ``detection_min_mm2`` (the threshold used), ``detection_calibrated_on_val``, ``collapsed``
        (fewer than ``collapse_min_positive`` patients called positive, or all), and
        ``patient_records`` (patient id -> the record :mod:`engine.evaluation.stats` resamples).
    """
    import torch

    from engine.evaluation.stats import PatientScores, confusion, metric_values
    from engine.training.data import patients_in
    from engine.training.downstream import load_downstream, patient_records, patient_scores, predict_masks

    model, record = load_downstream(folder)
    device = torch.device("cpu")
    threshold = float(record.get("detection_min_mm2", 10.0))
    calibrated = val_arrays is not None and len(val_arrays)
    if calibrated:
        threshold = calibrate_detection(patient_scores(predict_masks(model, val_arrays, device), val_arrays),
                                        patients_in(val_arrays), threshold)
    records = patient_records(predict_masks(model, arrays, device), arrays, threshold)
    scores = PatientScores.from_runs([{"seed": 0, "patients": records}])
    metrics = {m: float(metric_values(scores, m)[0, 0])
               for m in ("dice", "dice_tp", "myocardium_dice", "auroc", "accuracy", "balanced_accuracy")}
    tn, fp, fn, tp = confusion(scores)
    return {**metrics, "confusion": [tn, fp, fn, tp], "patients": len(records), "detection_min_mm2": threshold,
            "detection_calibrated_on_val": bool(calibrated),
            "collapsed": bool(fp + tp < collapse_min_positive or fp + tp == len(records)),
            "patient_records": records}
