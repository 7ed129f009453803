"""Metrics of the three gates, checked against the paper's figures, sklearn, MONAI and skimage."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.evaluation.metrics import (
    confusion_matrix,
    confusion_metrics,
    dice,
    dice_per_sample,
    dice_tp,
    image_quality,
    lv_crop_box,
    pass_rate,
    patient_confusion,
    patient_detection,
    rmse,
    ssim,
)

# DOMAIN.md section 5: [TN, FP, FN, TP] -> accuracy, balanced accuracy (real test set, 53 patients).
PAPER_CONFUSIONS = [
    ("real only", [11, 11, 1, 30], 0.77, 0.73),
    ("+ SPADE-LC", [20, 2, 6, 25], 0.85, 0.86),
    ("+ SPADE-FC", [21, 1, 16, 15], 0.68, 0.72),
    ("+ LGESynthNet (300)", [21, 1, 5, 26], 0.89, 0.90),
    ("+ LGESynthNet (500)", [21, 1, 4, 27], 0.91, 0.91),
    ("+ LGESynthNet (1000)", [21, 1, 3, 28], 0.92, 0.93),
    ("+ LGESynthNet (1500)", [20, 2, 3, 28], 0.91, 0.91),
]


@pytest.mark.parametrize("training, counts, accuracy, balanced", PAPER_CONFUSIONS, ids=[r[0] for r in PAPER_CONFUSIONS])
def test_paper_confusion_matrices(training, counts, accuracy, balanced):
    m = confusion_metrics(*counts)
    assert m["n"] == 53
    assert round(m["accuracy"], 2) == accuracy
    assert round(m["balanced_accuracy"], 2) == balanced


@pytest.mark.parametrize("seed, n", [(0, 10), (1, 53), (2, 200)])
def test_confusion_against_sklearn(seed, n):
    from sklearn import metrics as skm

    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.6
    pred = rng.random(n) < 0.5
    truth[:2], pred[:2] = [True, False], [True, False]  # both classes present on both sides
    tn, fp, fn, tp = confusion_matrix(truth, pred)
    assert (tn, fp, fn, tp) == tuple(skm.confusion_matrix(truth, pred, labels=[False, True]).ravel())
    m = confusion_metrics(tn, fp, fn, tp)
    assert m["n"] == n
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(truth, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(truth, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(truth, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(truth, pred, pos_label=False))
    assert m["precision"] == pytest.approx(skm.precision_score(truth, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(truth, pred))


@pytest.mark.parametrize(
    "counts, nan_keys",
    [
        ([5, 0, 0, 0], {"sensitivity", "balanced_accuracy", "precision", "f1"}),  # no positives, none predicted
        ([5, 3, 0, 0], {"sensitivity", "balanced_accuracy"}),  # precision 0/3 is defined: 0
        ([0, 0, 2, 4], {"specificity", "balanced_accuracy"}),  # no true negatives in the truth
        ([0, 0, 0, 0], {"accuracy", "sensitivity", "specificity", "balanced_accuracy", "precision", "f1"}),
    ],
)
def test_confusion_metrics_zero_denominator_is_nan(counts, nan_keys):
    m = confusion_metrics(*counts)
    for key in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1"):
        assert math.isnan(m[key]) == (key in nan_keys), key


@pytest.mark.parametrize("counts", [[-1, 0, 0, 0], [0, 0, -3, 1], [1.5, 0, 0, 1]])
def test_confusion_metrics_rejects_bad_counts(counts):
    with pytest.raises(ValueError):
        confusion_metrics(*counts)


@pytest.mark.parametrize("seed, shape", [(0, (4, 16, 16)), (1, (3, 32, 24)), (2, (2, 8, 8, 8))])
def test_dice_against_monai(seed, shape):
    import torch
    from monai.metrics import compute_dice

    rng = np.random.default_rng(seed)
    pred = rng.random(shape) < 0.3
    target = rng.random(shape) < 0.3
    # MONAI wants [B, C, ...] tensors.
    expected = compute_dice(torch.from_numpy(pred[:, None]).float(), torch.from_numpy(target[:, None]).float()).numpy()[:, 0]
    np.testing.assert_allclose(dice_per_sample(pred, target), expected, rtol=1e-6)
    for i in range(shape[0]):
        assert dice(pred[i], target[i]) == pytest.approx(float(expected[i]))


@pytest.mark.parametrize(
    "pred_pixels, target_pixels, expected",
    [
        ([], [], 1.0),  # nothing to find, nothing found
        ([(1, 1)], [], 0.0),
        ([], [(1, 1)], 0.0),
        ([(1, 1), (1, 2)], [(1, 2), (2, 2)], 0.5),
    ],
)
def test_dice_empty_masks(pred_pixels, target_pixels, expected):
    pred = np.zeros((4, 4), dtype=bool)
    target = np.zeros((4, 4), dtype=bool)
    for r, c in pred_pixels:
        pred[r, c] = True
    for r, c in target_pixels:
        target[r, c] = True
    assert dice(pred, target) == expected
    assert dice_per_sample(pred[None], target[None])[0] == expected


@pytest.mark.parametrize(
    "pred, target",
    [
        (np.zeros((4, 4), bool), np.zeros((4, 5), bool)),
        (np.zeros((2, 4, 4), bool), np.zeros((4, 4), bool)),
    ],
)
def test_dice_shape_mismatch_names_both_shapes(pred, target):
    with pytest.raises(ValueError, match=rf"{pred.shape}.*{target.shape}".replace("(", r"\(").replace(")", r"\)")):
        dice(pred, target)
    with pytest.raises(ValueError):
        dice_per_sample(pred, target)


def test_dice_rejects_label_maps():
    with pytest.raises(ValueError, match="binary"):
        dice(np.array([[0, 3], [4, 0]]), np.zeros((2, 2), bool))


def _batch(*samples):
    """Stack 1D toy masks given as strings of 0/1 into a [N, L] batch."""
    return np.array([[c == "1" for c in s] for s in samples])


@pytest.mark.parametrize(
    "pred, target, expected",
    [
        # TP (Dice 0.5), FN (missed), TN, FP: only the TP sample counts.
        (_batch("1100", "0000", "0000", "0011"), _batch("0110", "1100", "0000", "0000"), 0.5),
        # two TPs: Dice 1.0 and 0.5 -> 0.75; the FN sample would drag a plain mean down.
        (_batch("1000", "1100", "0000"), _batch("1000", "0110", "0011"), 0.75),
        # no TP at all: undefined.
        (_batch("0000", "1100"), _batch("1100", "0000"), math.nan),
    ],
)
def test_dice_tp_counts_true_positive_samples_only(pred, target, expected):
    result = dice_tp(pred, target)
    if math.isnan(expected):
        assert math.isnan(result)
    else:
        assert result == pytest.approx(expected)


@pytest.mark.parametrize(
    "scores, threshold, expected",
    [
        ([0.6, 0.6000001, 0.59, 0.9], 0.6, 0.5),  # exactly at the threshold fails (Dice > 0.6)
        ([0.6], 0.6, 0.0),
        ([0.0, 1.0], 0.6, 0.5),
        ([0.5, 0.5, 0.5], 0.4, 1.0),
    ],
)
def test_pass_rate_is_strict(scores, threshold, expected):
    assert pass_rate(np.array(scores), threshold=threshold) == pytest.approx(expected)


@pytest.mark.parametrize("scores", [[], [0.7, math.nan]])
def test_pass_rate_rejects_empty_and_nan(scores):
    with pytest.raises(ValueError):
        pass_rate(scores)


def _heart_slice(size=64):
    """A toy slice: a ring of myocardium (2) around a cavity (1) in the centre, scar (3) in the wall."""
    rows, cols = np.mgrid[:size, :size]
    r = np.hypot(rows - size / 2, cols - size / 2)
    label = np.zeros((size, size), dtype=np.uint8)
    label[r < 10] = 2
    label[r < 6] = 1
    label[(r >= 6) & (r < 10) & (cols > size / 2 + 4)] = 3
    rng = np.random.default_rng(0)
    image = 100.0 + 10.0 * rng.standard_normal((size, size))
    image[label == 1] = 300.0
    image[label == 3] = 500.0
    return label, image


@pytest.mark.parametrize("margin", [0, 4, 8, 40])
def test_lv_crop_box_matches_heart_extent(margin):
    label, _ = _heart_slice()
    rows, cols = np.nonzero(label)
    box = lv_crop_box(label, margin=margin)
    assert box.r0 == max(rows.min() - margin, 0) and box.r1 == min(rows.max() + 1 + margin, 64)
    assert box.c0 == max(cols.min() - margin, 0) and box.c1 == min(cols.max() + 1 + margin, 64)


def test_lv_crop_box_without_lv_raises():
    with pytest.raises(ValueError, match="no LV"):
        lv_crop_box(np.zeros((16, 16), dtype=np.uint8))


@pytest.mark.parametrize("seed, data_range", [(0, None), (1, 255.0)])
def test_ssim_and_rmse_against_references(seed, data_range):
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(seed)
    reference = rng.random((32, 40)) * 255.0
    generated = reference + rng.normal(0.0, 20.0, reference.shape)
    expected_range = np.ptp(reference) if data_range is None else data_range
    assert ssim(generated, reference, data_range=data_range) == pytest.approx(
        structural_similarity(generated, reference, data_range=expected_range)
    )
    assert rmse(generated, reference) == pytest.approx(math.sqrt(np.mean((generated - reference) ** 2)))
    assert ssim(reference, reference) == pytest.approx(1.0)
    assert rmse(reference, reference) == 0.0


@pytest.mark.parametrize("shape, win_size", [((5, 9), 5), ((6, 6), 5), ((3, 12), 3)])
def test_ssim_shrinks_window_for_small_crops(shape, win_size):
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    reference = rng.random(shape)
    generated = reference + rng.normal(0.0, 0.1, shape)
    assert ssim(generated, reference) == pytest.approx(
        structural_similarity(generated, reference, data_range=np.ptp(reference), win_size=win_size)
    )


@pytest.mark.parametrize("a, b", [(np.zeros((8, 8)), np.zeros((8, 9))), (np.zeros((2, 8)), np.zeros((2, 8)))])
def test_ssim_rejects_bad_shapes(a, b):
    with pytest.raises(ValueError):
        ssim(a, b, data_range=1.0)


def test_image_quality_crop_ignores_changes_outside_the_heart():
    label, reference = _heart_slice()
    box = lv_crop_box(label, margin=8)
    generated = reference.copy()
    outside = np.ones(label.shape, dtype=bool)
    outside[box.slices()] = False
    generated[outside] += np.random.default_rng(1).normal(0.0, 30.0, int(outside.sum()))
    q = image_quality(generated, reference, label, margin=8)
    assert set(q) == {"ssim_whole", "rmse_whole", "ssim_crop", "rmse_crop"}
    assert q["ssim_crop"] == pytest.approx(1.0) and q["rmse_crop"] == 0.0
    assert q["ssim_whole"] < 0.9 and q["rmse_whole"] > 0.0


def test_image_quality_crop_sees_changes_inside_the_heart():
    label, reference = _heart_slice()
    generated = reference.copy()
    generated[label == 3] = 100.0  # scar erased
    q = image_quality(generated, reference, label)
    assert q["ssim_crop"] < q["ssim_whole"] < 1.0
    assert q["rmse_crop"] > q["rmse_whole"] > 0.0


def test_image_quality_shape_mismatch():
    label, reference = _heart_slice()
    with pytest.raises(ValueError, match="label"):
        image_quality(reference, reference, label[:, :-1])


@pytest.mark.parametrize(
    "areas, threshold, expected",
    [
        ({"P001": 0.0, "P002": 12.0, "N003": 5.0}, 5.0, {"P001": False, "P002": True, "N003": False}),
        ({"P001": 0.0, "P002": 0.5}, 0.0, {"P001": False, "P002": True}),
    ],
)
def test_patient_detection_is_strictly_above_threshold(areas, threshold, expected):
    assert patient_detection(areas, threshold) == expected


def test_patient_detection_rejects_nan_area():
    with pytest.raises(ValueError, match="P001"):
        patient_detection({"P001": math.nan}, 1.0)


def test_patient_confusion_counts_each_patient():
    truth = {"N001": False, "N002": False, "P001": True, "P002": True, "P003": True}
    predicted = {"P003": False, "N001": True, "P001": True, "N002": False, "P002": True}
    assert patient_confusion(truth, predicted) == (1, 1, 1, 2)


@pytest.mark.parametrize(
    "truth, predicted, named",
    [
        ({"P001": True, "N001": False}, {"P001": True}, "N001"),
        ({"P001": True}, {"P001": True, "P009": False}, "P009"),
    ],
)
def test_patient_confusion_mismatched_patients_raise(truth, predicted, named):
    with pytest.raises(ValueError, match=named):
        patient_confusion(truth, predicted)


def test_largest_scar_component_counts_scar_inside_the_myocardium_only_in_mm2():
    """Slice 0: a 3x3 scar blob and a diagonal pair (8-connected: one component of 2) inside the
    myocardium, and a large blob outside it; slice 1: nothing inside; pixel areas differ per slice."""
    from engine.evaluation.metrics import largest_scar_component_mm2

    scar = np.zeros((2, 12, 12), bool)
    myo = np.zeros((2, 12, 12), bool)
    myo[:, :6, :] = True
    scar[0, 1:4, 1:4] = True  # 9 px inside
    scar[0, 1, 8] = scar[0, 2, 9] = True  # diagonal neighbours: one component of 2 px
    scar[0, 7:12, 0:6] = True  # 30 px outside the myocardium
    scar[1, 8:12, 8:12] = True  # outside only
    got = largest_scar_component_mm2(scar, myo, np.array([0.5, 2.0]))
    np.testing.assert_allclose(got, [4.5, 0.0])
    # against scikit-image's labelling
    from skimage.measure import label

    inside = scar[0] & myo[0]
    sizes = np.bincount(label(inside, connectivity=2).ravel())[1:]
    assert got[0] == sizes.max() * 0.5
    with pytest.raises(ValueError, match="must be \\[N, H, W\\]"):
        largest_scar_component_mm2(scar[0], myo[0], 1.0)


def test_patient_records_score_call_and_dice_sums():
    """Two patients: a's scar slice found exactly, b negative with a false speck outside the
    myocardium (score 0); the records hold what the bootstrap resamples."""
    from engine.training.data import SliceArrays
    from engine.training.downstream import patient_records

    label = np.zeros((3, 8, 8), np.uint8)
    label[:, 2:6, 2:6] = 2
    label[0, 2:4, 2:4] = 3
    masks = {"scar": label >= 3, "myocardium": label >= 2}
    masks["scar"][2, 0, 0] = True  # outside the myocardium
    arrays = SliceArrays(image=np.zeros((3, 1, 8, 8), np.float32), label=label, level=["mid"] * 3,
                         source=["a/0", "a/1", "b/0"], patient_id=["a", "a", "b"], caption=[""] * 3,
                         positive=np.array([True, False, False]), pixel_area_mm2=np.full(3, 2.0, np.float32))
    records = patient_records(masks, arrays, threshold_mm2=5.0)
    assert records["a"] == {"positive": True, "score": 8.0, "called": True, "scar_dice_sum": 1.0, "scar_slices": 1,
                            "scar_tp_dice_sum": 1.0, "scar_tp_slices": 1, "myocardium_dice_sum": 2.0,
                            "myocardium_slices": 2}
    assert records["b"]["score"] == 0.0 and not records["b"]["called"] and records["b"]["scar_slices"] == 0
