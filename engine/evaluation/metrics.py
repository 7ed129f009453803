"""Metrics of the three evaluation gates (DOMAIN.md section 5).

- realism: ``ssim``, ``rmse`` and ``image_quality`` (whole image and cropped around the LV);
- alignment: ``dice``, ``dice_per_sample``, ``dice_tp`` (the paper's Dice-TP) and ``pass_rate``
  (the quality filter keeps a sample when Dice > 0.6, DOMAIN.md section 4);
- utility: patient-level detection and its confusion matrix ``[TN, FP, FN, TP]`` with accuracy,
  balanced accuracy, sensitivity and specificity.

Numpy arrays in, python floats / ints / dicts out. Scar is a small target (often under 1% of the
image), so every overlap metric defines its value on empty masks instead of dividing by zero, and
every ratio whose denominator is zero is NaN, never 0 and never an exception.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from engine.anatomy.geometry import Box, heart_box

DEFAULT_PASS_THRESHOLD = 0.6  # paper: keep a generated sample if Dice(predicted, conditioning mask) > 0.6
_SSIM_DEFAULT_WIN = 7  # skimage.metrics.structural_similarity's default window side


# ---------------------------------------------------------------------------------------------------
# alignment: overlap of scar masks
# ---------------------------------------------------------------------------------------------------


def _as_mask(mask: np.ndarray, name: str) -> np.ndarray:
    """A boolean view of ``mask``; integer or float arrays are accepted only when they hold 0 and 1.

    A label map (values up to 4) passed by mistake raises instead of being read as "anything nonzero".
    """
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if not np.isin(mask, (0, 1)).all():
        raise ValueError(
            f"{name} must be a binary mask (bool, or 0/1 values), got values {np.unique(mask)[:8].tolist()}; "
            "pass e.g. engine.anatomy.scar_region(label)"
        )
    return mask.astype(bool)


def _check_same_shape(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {a.shape} and {b.shape}")


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice overlap ``2 |P & T| / (|P| + |T|)`` of two binary masks of any equal shape.

    Args:
        pred: predicted mask (bool, or 0/1 values), any shape.
        target: reference mask, same shape as ``pred``.

    Returns:
        Dice in [0, 1]: 1.0 when both masks are empty (nothing to find, nothing found), 0.0 when
        exactly one is empty.

    Raises:
        ValueError: shapes differ (the message names both) or a mask is not binary.
    """
    pred, target = _as_mask(pred, "pred"), _as_mask(target, "target")
    _check_same_shape(pred, target, ("pred", "target"))
    total = int(pred.sum()) + int(target.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, target).sum()) / total


def dice_per_sample(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Dice of every sample of a batch, with ``dice``'s empty-mask conventions.

    Args:
        pred: predicted masks ``[N, ...]`` (bool, or 0/1 values), the leading axis is the batch.
        target: reference masks, same shape.

    Returns:
        float64 array ``[N]``.
    """
    pred, target = _as_mask(pred, "pred"), _as_mask(target, "target")
    _check_same_shape(pred, target, ("pred", "target"))
    if pred.ndim < 1:
        raise ValueError(f"dice_per_sample needs a leading batch axis, got a scalar of shape {pred.shape}")
    n = pred.shape[0]
    p = pred.reshape(n, -1)
    t = target.reshape(n, -1)
    inter = np.logical_and(p, t).sum(axis=1).astype(np.float64)
    total = (p.sum(axis=1) + t.sum(axis=1)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.where(total > 0, 2.0 * inter / np.where(total > 0, total, 1.0), 1.0)
    return scores


def dice_tp(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice-TP (the paper's alignment metric): mean Dice over the true-positive samples only.

    A sample is a true positive when its target holds scar *and* its prediction holds scar. False
    negatives (scar missed entirely), false positives and true negatives are left out, so Dice-TP
    measures how well scar is delineated once it is found; detection is measured separately.

    Args:
        pred: predicted masks ``[N, ...]`` (bool, or 0/1 values), the leading axis is the batch.
        target: reference masks, same shape.

    Returns:
        Mean Dice over the true-positive samples, or NaN when there is none (undefined, not 0).
    """
    pred, target = _as_mask(pred, "pred"), _as_mask(target, "target")
    scores = dice_per_sample(pred, target)
    n = pred.shape[0]
    true_positive = pred.reshape(n, -1).any(axis=1) & target.reshape(n, -1).any(axis=1)
    if not true_positive.any():
        return math.nan
    return float(scores[true_positive].mean())


def pass_rate(dice_scores: np.ndarray, threshold: float = DEFAULT_PASS_THRESHOLD) -> float:
    """Share of samples that pass the quality filter: Dice strictly greater than ``threshold``.

    Paper (DOMAIN.md section 4): a generated sample is kept if Dice(predicted scar, conditioning
    mask) > 0.6; a Dice exactly at the threshold fails.

    Args:
        dice_scores: Dice of every sample, any shape (flattened).
        threshold: pass threshold, default 0.6.

    Returns:
        Fraction in [0, 1].

    Raises:
        ValueError: no scores (a rate of nothing is undefined) or a NaN score.
    """
    scores = np.asarray(dice_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("pass_rate needs at least one Dice score, got none")
    if np.isnan(scores).any():
        raise ValueError(f"pass_rate got {int(np.isnan(scores).sum())} NaN Dice score(s)")
    return float(np.mean(scores > threshold))


# ---------------------------------------------------------------------------------------------------
# realism: image similarity, whole image and around the LV
# ---------------------------------------------------------------------------------------------------


def lv_crop_box(label: np.ndarray, margin: int = 8) -> Box:
    """The box around the LV (cavity + myocardium, labels 1-4) grown by ``margin`` pixels.

    Args:
        label: 2D integer label slice (DOMAIN labels).
        margin: pixels added on every side, clipped to the image.

    Returns:
        ``engine.anatomy.geometry.Box`` (half-open rows ``[r0, r1)``, cols ``[c0, c1)``).

    Raises:
        ValueError: the label is not 2D or shows no LV (no label 1-4).
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"lv_crop_box expects a 2D label slice, got shape {label.shape}")
    box = heart_box(label, margin=margin)
    if box is None:
        raise ValueError("lv_crop_box: the label shows no LV (no cavity or myocardium pixel, labels 1-4)")
    return box


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """Root mean squared error ``sqrt(mean((a - b)^2))`` in the images' intensity units."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    _check_same_shape(a, b, ("a", "b"))
    if a.size == 0:
        raise ValueError("rmse of empty images is undefined")
    return float(np.sqrt(np.mean((a - b) ** 2)))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float | None = None) -> float:
    """Mean structural similarity (``skimage.metrics.structural_similarity``, Wang et al. 2004).

    Args:
        a: generated image, 2D (or any single-channel nD array).
        b: reference image, same shape.
        data_range: intensity range of the images; default ``b.max() - b.min()`` (the reference's).

    Returns:
        Mean SSIM, 1.0 for identical images.

    The window is skimage's default 7 pixels a side; an image (e.g. an LV crop) smaller than 7 along
    some axis gets the largest odd window that fits, ``min(shape)`` or ``min(shape) - 1``. Images
    smaller than 3 pixels along an axis raise ValueError (no sample covariance from one pixel), as
    does a zero data range (a constant reference with ``data_range`` not given).
    """
    from skimage.metrics import structural_similarity

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    _check_same_shape(a, b, ("a", "b"))
    if a.ndim < 2 or min(a.shape) < 3:
        raise ValueError(f"ssim needs images at least 3 pixels along each of 2+ axes, got shape {a.shape}")
    if data_range is None:
        data_range = float(b.max() - b.min())
    if not data_range > 0:
        raise ValueError(f"ssim needs a positive data_range, got {data_range} (constant reference image?)")
    side = min(_SSIM_DEFAULT_WIN, min(a.shape))
    win_size = side if side % 2 == 1 else side - 1
    return float(structural_similarity(a, b, data_range=data_range, win_size=win_size))


def region_quality(generated: np.ndarray, reference: np.ndarray, region: np.ndarray, data_range: float) -> dict[str, float]:
    """SSIM and RMSE inside ``region`` only: the mean of skimage's SSIM map over the region's pixels
    (each pixel's SSIM from its 7x7 neighbourhood), and the RMSE over them.

    Returns:
        ``{"ssim_region", "rmse_region"}``; NaN for an empty region.
    """
    from skimage.metrics import structural_similarity

    generated, reference = np.asarray(generated, np.float64), np.asarray(reference, np.float64)
    region = _as_mask(region, "region")
    _check_same_shape(generated, reference, ("generated", "reference"))
    _check_same_shape(reference, region, ("reference", "region"))
    if not region.any():
        return {"ssim_region": float("nan"), "rmse_region": float("nan")}
    _, ssim_map = structural_similarity(generated, reference, data_range=data_range, full=True)
    return {"ssim_region": float(ssim_map[region].mean()),
            "rmse_region": float(np.sqrt(np.mean((generated[region] - reference[region]) ** 2)))}


def scar_intensity_ratios(image: np.ndarray, label: np.ndarray) -> dict[str, np.ndarray]:
    """How scar looks against its surroundings, per slice that holds scar, blood pool and remote
    myocardium: mean scar intensity (labels 3-4) over the mean blood pool (label 1) and over the
    mean remote myocardium (label 2). In LGE both sit around 1 for scar against blood and well
    above 1 against the nulled remote myocardium.

    Args:
        image: ``[N, H, W]`` intensities (any unit: ratios are unitless).
        label: ``[N, H, W]`` DOMAIN labels.

    Returns:
        ``{"scar_blood": [n], "scar_remote": [n]}`` over the ``n`` slices where all three are present.
    """
    image, label = np.asarray(image, np.float64), np.asarray(label)
    _check_same_shape(image, label, ("image", "label"))
    blood, remote = [], []
    for img, lab in zip(image, label):
        scar, pool, myo = lab >= 3, lab == 1, lab == 2
        if scar.any() and pool.any() and myo.any():
            s, b, m = img[scar].mean(), img[pool].mean(), img[myo].mean()
            if b > 0 and m > 0:
                blood.append(s / b)
                remote.append(s / m)
    return {"scar_blood": np.asarray(blood), "scar_remote": np.asarray(remote)}


def image_quality(generated: np.ndarray, reference: np.ndarray, label: np.ndarray, margin: int = 8) -> dict[str, float]:
    """SSIM and RMSE of a generated slice against its reference, whole image and cropped around the LV.

    The realism gate of DOMAIN.md section 5 (paper Table 1: SSIM whole / cropped).

    Args:
        generated: generated 2D image ``[H, W]``.
        reference: reference 2D image ``[H, W]``, the same slice before synthesis.
        label: 2D label slice ``[H, W]`` giving the LV box (``lv_crop_box(label, margin)``).
        margin: pixels around the LV box.

    Returns:
        ``{"ssim_whole", "rmse_whole", "ssim_crop", "rmse_crop"}``. Both SSIMs use the *whole*
        reference's data range, so whole and cropped values are on the same scale.
    """
    generated, reference, label = np.asarray(generated), np.asarray(reference), np.asarray(label)
    _check_same_shape(generated, reference, ("generated", "reference"))
    _check_same_shape(reference, label, ("reference", "label"))
    box = lv_crop_box(label, margin=margin)
    data_range = float(reference.max() - reference.min())
    crop = box.slices()
    return {
        "ssim_whole": ssim(generated, reference, data_range=data_range),
        "rmse_whole": rmse(generated, reference),
        "ssim_crop": ssim(generated[crop], reference[crop], data_range=data_range),
        "rmse_crop": rmse(generated[crop], reference[crop]),
    }


# ---------------------------------------------------------------------------------------------------
# utility: patient-level detection and its confusion matrix
# ---------------------------------------------------------------------------------------------------


def confusion_matrix(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    """Binary confusion matrix ``(TN, FP, FN, TP)`` of per-patient (or per-slice) labels.

    Args:
        truth: true positive / negative status ``[N]`` (bool, or 0/1 values).
        pred: predicted status ``[N]``.

    Returns:
        ``(TN, FP, FN, TP)`` as python ints, the paper's ``[TN, FP, FN, TP]`` order.
    """
    truth, pred = _as_mask(truth, "truth"), _as_mask(pred, "pred")
    _check_same_shape(truth, pred, ("truth", "pred"))
    tn = int(np.sum(~truth & ~pred))
    fp = int(np.sum(~truth & pred))
    fn = int(np.sum(truth & ~pred))
    tp = int(np.sum(truth & pred))
    return tn, fp, fn, tp


def _ratio(num: int, den: int) -> float:
    return num / den if den > 0 else math.nan


def confusion_metrics(tn: int, fp: int, fn: int, tp: int) -> dict[str, float | int]:
    """Detection metrics from a confusion matrix.

    Args:
        tn, fp, fn, tp: non-negative integer counts.

    Returns:
        ``accuracy`` (TP + TN) / n, ``sensitivity`` TP / (TP + FN), ``specificity`` TN / (TN + FP),
        ``balanced_accuracy`` (sensitivity + specificity) / 2, ``precision`` TP / (TP + FP),
        ``f1`` 2 TP / (2 TP + FP + FN), and ``n`` (int). A metric whose denominator is zero is NaN
        (undefined, neither 0 nor an error); balanced accuracy is NaN when either sensitivity or
        specificity is (sklearn's ``balanced_accuracy_score`` would instead average the defined one).

    Raises:
        ValueError: a negative or non-integer count.
    """
    counts = {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    for name, value in counts.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"confusion count {name} must be an integer, got {value!r}")
        if value < 0:
            raise ValueError(f"confusion count {name} must be non-negative, got {value}")
    tn, fp, fn, tp = (int(v) for v in counts.values())
    n = tn + fp + fn + tp
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    return {
        "accuracy": _ratio(tp + tn, n),
        "balanced_accuracy": (sensitivity + specificity) / 2.0,  # NaN propagates
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "n": n,
    }


def largest_scar_component_mm2(scar: np.ndarray, myocardium: np.ndarray, pixel_area_mm2: np.ndarray | float) -> np.ndarray:
    """The patient-level detection's slice score: the area (mm^2) of the largest 8-connected
    component of predicted scar inside the predicted myocardium, per slice.

    Scar lies in the myocardium (DOMAIN.md), so scar predicted outside it is noise, and a patient is
    called on its largest coherent scar, not on a sum that grows with its slice count and with every
    false-positive speck.

    Args:
        scar, myocardium: predicted masks ``[N, H, W]`` (bool, or 0/1 values).
        pixel_area_mm2: the in-plane area of one pixel, per slice ``[N]`` or one value.

    Returns:
        float64 ``[N]``: 0 where no scar is predicted inside the myocardium.
    """
    from scipy import ndimage

    scar, myocardium = _as_mask(scar, "scar"), _as_mask(myocardium, "myocardium")
    _check_same_shape(scar, myocardium, ("scar", "myocardium"))
    if scar.ndim != 3:
        raise ValueError(f"scar and myocardium must be [N, H, W], got shape {scar.shape}")
    area = np.broadcast_to(np.asarray(pixel_area_mm2, np.float64), (len(scar),))
    out = np.zeros(len(scar))
    eight = np.ones((3, 3), bool)
    for i, inside in enumerate(scar & myocardium):
        if inside.any():
            components, count = ndimage.label(inside, structure=eight)
            out[i] = np.bincount(components.ravel(), minlength=count + 1)[1:].max() * area[i]
    return out


def patient_detection(scar_area_by_patient: Mapping[str, float], threshold: float) -> dict[str, bool]:
    """Patient-level scar detection: positive when the predicted scar area exceeds ``threshold``.

    Args:
        scar_area_by_patient: patient id -> the patient's predicted scar score (the engine's: the
            largest scar component in mm^2, :func:`largest_scar_component_mm2`, over its slices);
            ``threshold`` is in the same unit.
        threshold: a patient is positive when its area is strictly greater (area 0 with threshold 0
            is negative).

    Returns:
        patient id -> predicted positive.

    Raises:
        ValueError: a NaN or negative area.
    """
    detected = {}
    for patient, area in scar_area_by_patient.items():
        area = float(area)
        if math.isnan(area) or area < 0:
            raise ValueError(f"patient {patient!r}: scar area must be a non-negative number, got {area}")
        detected[patient] = area > threshold
    return detected


def patient_confusion(truth: Mapping[str, bool], predicted: Mapping[str, bool]) -> tuple[int, int, int, int]:
    """Patient-level confusion matrix ``(TN, FP, FN, TP)`` from per-patient truth and prediction.

    Args:
        truth: patient id -> truly positive (any slice holds scar).
        predicted: patient id -> predicted positive (e.g. from ``patient_detection``).

    Raises:
        ValueError: the two dicts cover different patients; the message names the ids missing from
            each side (no patient is silently dropped).
    """
    missing_pred = sorted(set(truth) - set(predicted))
    missing_truth = sorted(set(predicted) - set(truth))
    if missing_pred or missing_truth:
        raise ValueError(
            f"patient sets differ: without a prediction {missing_pred}, without a truth {missing_truth}"
        )
    patients = sorted(truth)
    return confusion_matrix(
        np.array([bool(truth[p]) for p in patients], dtype=bool),
        np.array([bool(predicted[p]) for p in patients], dtype=bool),
    )
