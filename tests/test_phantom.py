"""engine.phantom: the embedded phantom LGE cohort, written in the EMIDEC layout and read back the
way real data is read; its anatomy and orientation; and that it is hard in the ways real LGE is."""

from __future__ import annotations

import csv
import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from engine.anatomy.aha import TERRITORIES
from engine.anatomy.geometry import heart_box, lv_centre
from engine.anatomy.labels import scar_region
from engine.io.orientation import spacing_to_slices, volume_to_slices
from engine.io.validation import validate_cohort
from engine.phantom import PhantomConfig, generate_patient, preview_patient, render_preview, write_phantom_cohort
from engine.phantom.patient import plan_patient, render_patient
from engine.phantom.scar import ScarPlan

SMALL = PhantomConfig(image_size=128)
N_COHORT = 30


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A 30-patient cohort at 128 x 128 on disk, and its manifest."""
    root = tmp_path_factory.mktemp("phantom")
    manifest = write_phantom_cohort(root, N_COHORT, seed=0, cfg=SMALL)
    return root, manifest


@pytest.fixture(scope="module")
def full_size():
    """20 patients at the default 256 x 256, in memory (the hardness figures are measured here)."""
    return [generate_patient(i, seed=0) for i in range(20)]


def _read(root, entry):
    image = nib.load(str(root / entry["image"]))
    label = nib.load(str(root / entry["label"]))
    return image, label


# ---------------------------------------------------------------------------------------------------
# layout and manifest


def test_layout_files_and_headers(cohort):
    root, manifest = cohort
    assert len(manifest) == N_COHORT
    scale = 256 / SMALL.image_size  # the field of view stays a full thorax at any image size
    for entry in manifest:
        pid = entry["patient_id"]
        assert entry["image"] == f"{pid}/Images/{pid}.nii.gz" and entry["label"] == f"{pid}/Contours/{pid}.nii.gz"
        image, label = _read(root, entry)
        assert image.shape == label.shape == (SMALL.image_size, SMALL.image_size, entry["n_slices"])
        assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
        di, dj, dk = image.header.get_zooms()
        assert 1.41 * scale - 1e-3 <= di <= 1.46 * scale + 1e-3 and di == pytest.approx(dj)
        assert 10.0 <= dk <= 13.0
        assert label.header.get_zooms() == image.header.get_zooms()
        assert np.allclose(np.abs(np.diag(image.affine)[:3]), (di, dj, dk), rtol=1e-5)
        assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
        assert entry["spacing"] == pytest.approx(list(spacing_to_slices((di, dj, dk))), abs=1e-3)
        assert SMALL.min_slices <= entry["n_slices"] <= SMALL.max_slices


def test_labels_flags_and_prefixes(cohort):
    root, manifest = cohort
    for entry in manifest:
        image, label = (np.asarray(x.dataobj) for x in _read(root, entry))
        assert set(np.unique(label)) <= {0, 1, 2, 3, 4}
        assert image.min() >= 0 and image.max() <= 4095 and np.all(image == np.round(image))
        positive = bool(np.isin(label, (3, 4)).any())
        assert entry["positive"] == positive
        assert entry["patient_id"] == f"Case_{'P' if positive else 'N'}{entry['index'] + 1:03d}"
        assert entry["mvo"] == bool((label == 4).any())
        assert (entry["pattern"] == "none") == (not positive) and bool(entry["scar_segments"]) == positive
    negatives = np.mean([not e["positive"] for e in manifest])
    assert 0.15 <= negatives <= 0.5


def test_manifest_files_agree(cohort):
    root, manifest = cohort
    assert json.loads((root / "manifest.json").read_text()) == manifest
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["patient_id"] for r in rows] == [e["patient_id"] for e in manifest]
    for row, entry in zip(rows, manifest):
        assert row["scar_segments"] == ";".join(str(s) for s in entry["scar_segments"])
        assert float(row["spacing_slice"]) == entry["spacing"][0]
        if entry["transmurality"] is not None:  # classes of the segments that hold scar
            assert sorted(int(s) for s in entry["transmurality"]) == entry["scar_segments"]
            assert set(entry["transmurality"].values()) <= {"1-25%", "26-50%", "51-75%", "76-100%"}


def test_cohort_passes_validation_and_reads_back_unchanged(cohort):
    root, manifest = cohort
    report = validate_cohort(root)
    assert report.ok, report.lines()
    for entry in manifest[:4]:  # the engine's read path gives back exactly what was generated
        patient = generate_patient(entry["index"], seed=0, cfg=SMALL)
        image, label = (np.asarray(x.dataobj) for x in _read(root, entry))
        np.testing.assert_array_equal(volume_to_slices(image), patient.image)
        np.testing.assert_array_equal(volume_to_slices(label), patient.label)


def test_rewrite_replaces_own_cases_and_refuses_foreign_ones(tmp_path):
    write_phantom_cohort(tmp_path / "a", 3, seed=1, cfg=SMALL)
    second = write_phantom_cohort(tmp_path / "a", 2, seed=2, cfg=SMALL)
    assert sorted(p.name for p in (tmp_path / "a").glob("Case_*")) == sorted(e["patient_id"] for e in second)
    (tmp_path / "b" / "Case_X001").mkdir(parents=True)
    with pytest.raises(ValueError, match="did not make"):
        write_phantom_cohort(tmp_path / "b", 1, cfg=SMALL)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 32},
        {"pixel_spacing_range": (1.46, 1.41)},
        {"min_slices": 8, "max_slices": 6},
        {"negative_fraction": 1.5},
        {"pattern_weights": {"ischemic-XYZ": 1.0}},
        {"supersampling": 0},
        {"scar_blood_ratio": (2.0, 1.0)},
        {"nulling_range": (0.0, 0.5)},
        {"bias_strength": 1.0},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        PhantomConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------
# determinism


def test_patient_depends_only_on_seed_and_index(tmp_path):
    a = generate_patient(4, seed=7, cfg=SMALL)
    b = generate_patient(4, seed=7, cfg=SMALL)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.meta == b.meta and a.spacing == b.spacing
    c = generate_patient(4, seed=8, cfg=SMALL)
    assert c.image.shape != a.image.shape or not np.array_equal(c.image, a.image)

    small = write_phantom_cohort(tmp_path / "small", 2, seed=7, cfg=SMALL)
    large = write_phantom_cohort(tmp_path / "large", 5, seed=7, cfg=SMALL)
    assert large[:2] == small
    for entry in small:
        for part in ("image", "label"):
            x = np.asarray(nib.load(str(tmp_path / "small" / entry[part])).dataobj)
            y = np.asarray(nib.load(str(tmp_path / "large" / entry[part])).dataobj)
            np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------------
# orientation and anatomy


def test_rv_is_bright_and_left_of_the_lv(full_size):
    for patient in full_size:
        k = len(patient.label) // 2  # a mid slice
        label, image = patient.label[k], patient.image[k]
        r, c = (int(round(v)) for v in lv_centre(label))
        row = label[r]
        left_edge = int(np.flatnonzero(row >= 1)[0])  # the septum's outer border on the centre row
        rv = image[r - 1 : r + 2, max(left_edge - 5, 0) : left_edge - 1]
        blood = np.median(image[label == 1])
        assert np.median(rv) > 0.5 * blood, patient.patient_id


def test_ischemic_scar_stays_in_its_territory(cohort):
    _, manifest = cohort
    ischemic = [e for e in manifest if e["pattern"].startswith("ischemic-")]
    assert {e["territory"] for e in ischemic} == {"LAD", "RCA", "LCx"}
    for entry in ischemic:
        assert entry["pattern"] == f"ischemic-{entry['territory']}"
        assert set(entry["scar_segments"]) <= set(TERRITORIES[entry["territory"]]), entry


def test_scar_only_replaces_myocardium():
    """Rendering the same plan without its scar leaves the myocardium's outline unchanged."""
    for index in range(8):
        plan = plan_patient(index, 0, SMALL)
        if plan.scar.pattern == "none":
            continue
        _, with_scar = render_patient(plan, SMALL)
        _, without = render_patient(dataclasses.replace(plan, scar=ScarPlan.none(len(with_scar))), SMALL)
        assert not scar_region(without).any()
        np.testing.assert_array_equal(with_scar >= 2, without >= 2)
        np.testing.assert_array_equal(with_scar == 1, without == 1)
        assert scar_region(with_scar).any()


def test_cavity_shrinks_toward_apex_and_heart_is_small(full_size):
    size = full_size[0].image.shape[-1]
    for patient in full_size:
        area = (patient.label == 1).sum(axis=(1, 2))
        k = np.arange(len(area))
        assert area[-1] < 0.6 * area[:3].max()
        assert np.corrcoef(k, area)[0, 1] < -0.8
        for label in patient.label:
            box = heart_box(label, margin=0)
            assert box is not None and max(box.r1 - box.r0, box.c1 - box.c0) < size / 4
        # LV epicardial diameter at the base: a tenth to a seventh of the field of view
        assert size / 11 <= patient.meta["heart"]["lv_epicardial_diameter_mm"] / patient.spacing[1] <= size / 6.5


def test_zero_padded_borders(full_size):
    for patient in full_size:
        img = patient.image
        assert not img[:, 0, :].any() and not img[:, -1, :].any()
        assert not img[:, :, 0].any() and not img[:, :, -1].any()
        assert (img > 0).mean() > 0.5  # the padding is a border, not the image


# ---------------------------------------------------------------------------------------------------
# hardness: measured on the default 256 x 256 phantom, asserted with margin


def _noise_sigma(image: np.ndarray) -> float:
    """Rician noise sigma from air in a corner of the acquired window (Rayleigh: mean = sigma sqrt(pi/2))."""
    rows = np.flatnonzero(image.any(axis=(0, 2)))
    cols = np.flatnonzero(image.any(axis=(0, 1)))
    corner = image[:, rows[0] : rows[0] + 6, cols[0] : cols[0] + 6]
    return float(corner.mean() / np.sqrt(np.pi / 2))


def _best_threshold_dice(image: np.ndarray, label: np.ndarray) -> float:
    """Dice of the best single intensity threshold for scar inside the LV crop of one slice."""
    crop = heart_box(label, margin=2).slices()
    values, target = image[crop], label[crop] >= 3
    best = 0.0
    for t in np.unique(np.percentile(values, np.linspace(40, 100, 121))):
        pred = values >= t
        best = max(best, 2.0 * (pred & target).sum() / (pred.sum() + target.sum()))
    return best


def test_hardness(full_size):
    positives = [p for p in full_size if p.positive]
    assert len(positives) >= 8
    overlap, dices = [], []
    for p in positives:
        blood = p.image[p.label == 1]
        scar = p.image[p.label >= 3]
        overlap.append(np.median(scar) < np.percentile(blood, 90))
        dices += [_best_threshold_dice(p.image[k], p.label[k]) for k in range(len(p.label)) if scar_region(p.label[k]).any()]
    # scar often no brighter than the blood pool next to it (measured: 0.64 of these positives,
    # 0.62 over 100 patients)
    assert np.mean(overlap) >= 0.35
    # no single threshold segments it (measured mean best-threshold Dice 0.51 here, 0.48 over 100
    # patients), yet the scar is there to be found
    assert 0.3 < np.mean(dices) < 0.6

    nulling = [p.image[p.label == 2].mean() / p.image[p.label == 1].mean() for p in full_size]
    assert min(nulling) < 0.2 and max(nulling) > 0.35  # well nulled and grey myocardium both occur

    noise = [_noise_sigma(p.image) / np.median(p.image[p.label == 1]) for p in full_size]
    assert max(noise) / min(noise) > 2.0

    # scar is textured, not a flat fill: its spread exceeds what noise alone would give
    spread = [np.std(p.image[p.label == 3]) / _noise_sigma(p.image) for p in positives if (p.label == 3).sum() > 100]
    assert np.median(spread) > 1.5


# ---------------------------------------------------------------------------------------------------
# preview


def test_preview_writes_png(tmp_path, full_size):
    path = preview_patient(full_size[1], tmp_path / "one.png", max_slices=4)
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    a, b = full_size[0], full_size[1]
    items = [(a.image[0], a.label[0], "basal", f"{a.patient_id} 0"), (b.image[3], b.label[3], "mid", f"{b.patient_id} 3")]
    path = render_preview(items, tmp_path / "two" / "many.png")
    assert open(path, "rb").read()[:4] == b"\x89PNG"
    with pytest.raises(ValueError):
        render_preview([], tmp_path / "none.png")
