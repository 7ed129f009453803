"""Cohort validation on real NIfTI files: every bad input is reported with its file and reason;
legitimate quirks of real EMIDEC files validate clean."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.io.validation import (
    CASE_CHECKS,
    COHORT_CHECKS,
    Problem,
    discover_cases,
    validate_cohort,
)
from tests.nifti_factory import (
    ORIGIN,
    ZOOMS,
    affine_for,
    case_paths,
    heart_labels,
    patch_pixdim,
    raw_image,
    read,
    write_case,
    write_cohort,
    write_nifti,
)

CASE = "Case_P001"


def _image(root):
    return case_paths(root, CASE)[0]


def _label(root):
    return case_paths(root, CASE)[1]


def _rewrite(path, data, **kwargs):
    write_nifti(path, data, **kwargs)


def _edit_label(root, edit):
    lab, _ = read(_label(root))
    lab = np.array(lab)
    edit(lab)
    _rewrite(_label(root), lab)
    return _label(root)


# ---- corruptors: each breaks the clean cohort and returns (path the problem must name, phrase) ----


def root_missing(root):
    shutil.rmtree(root)
    return root, "root does not exist"


def root_is_file(root):
    shutil.rmtree(root)
    root.write_text("not a folder")
    return root, "not a directory"


def no_case_folders(root):
    for case in ("Case_N001", CASE):
        shutil.rmtree(root / case)
    (root / "manifest.json").write_text("{}")
    return root, "no case folders"


def missing_image(root):
    path = _image(root)
    path.unlink()
    return path, "missing image file"


def missing_label(root):
    path = _label(root)
    path.unlink()
    return path, "missing label file"


def truncated_image(root):
    path = _image(root)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * 0.8)])
    return path, "unreadable or truncated"


def garbage_label(root):
    path = _label(root)
    path.write_bytes(b"this is not a NIfTI file" * 20)
    return path, "unreadable or truncated"


def truncated_uncompressed_label(root):
    lab, _ = read(_label(root))
    _label(root).unlink()
    path = _label(root).with_name(f"{CASE}.nii")
    write_nifti(path, lab)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path, "unreadable or truncated"


def label_4d(root):
    lab, _ = read(_label(root))
    _rewrite(_label(root), np.stack([lab, lab], axis=-1))
    return _label(root), "not a 3D stack"


def image_2d(root):
    img, _ = read(_image(root))
    _rewrite(_image(root), img[:, :, 0])
    return _image(root), "not a 3D stack"


def shape_mismatch(root):
    lab, _ = read(_label(root))
    _rewrite(_label(root), lab[:, :, :5])
    return _label(root), "shape mismatch"


def spacing_mismatch(root):
    lab, _ = read(_label(root))
    _rewrite(_label(root), lab, zooms=(1.46, 1.46, 8.0))
    return _label(root), "spacing mismatch"


def origin_mismatch(root):
    lab, _ = read(_label(root))
    _rewrite(_label(root), lab, origin=(ORIGIN[0] + 3.0, ORIGIN[1], ORIGIN[2]))
    return _label(root), "label origin"


def direction_mismatch(root):
    lab, _ = read(_label(root))
    flipped = affine_for(ZOOMS, ORIGIN)
    flipped[:3, 0] *= -1  # first voxel axis runs the other way
    _rewrite(_label(root), lab, affine=flipped)
    return _label(root), "label direction"


def zero_spacing(root):
    patch_pixdim(_image(root), (1.46, 0.0, 10.0))
    return _image(root), "invalid spacing"


def negative_spacing(root):
    patch_pixdim(_label(root), (-1.46, 1.46, 10.0))
    return _label(root), "invalid spacing"


def nan_spacing(root):
    patch_pixdim(_image(root), (1.46, 1.46, float("nan")))
    return _image(root), "invalid spacing"


def nan_image(root):
    img, _ = read(_image(root))
    img = np.array(img)
    img[40, 40, 2] = np.nan
    _rewrite(_image(root), img)
    return _image(root), "NaN/Inf image values"


def inf_image(root):
    img, _ = read(_image(root))
    img = np.array(img)
    img[3, 3, 0] = np.inf
    _rewrite(_image(root), img)
    return _image(root), "1 Inf"


def label_out_of_range(root):
    return _edit_label(root, lambda lab: lab.__setitem__((10, 10, 1), 7)), "label values outside 0-4: [7]"


def negative_label(root):
    lab, _ = read(_label(root))
    lab = lab.astype(np.int16)
    lab[10, 10, 1] = -1
    _rewrite(_label(root), lab)
    return _label(root), "outside 0-4: [-1]"


def non_integer_label(root):
    lab, _ = read(_label(root))
    lab = lab.astype(np.float64)
    lab[48, 46, 0] = 1.5
    _rewrite(_label(root), lab)
    return _label(root), "non-integer label values"


def scar_in_background(root):
    def edit(lab):
        lab[15:18, 15:18, 0] = 3  # a blob far from the ring, slice 0 has healthy myocardium

    return _edit_label(root, edit), "scar outside the myocardium: slice k=0"


def scar_in_cavity(root):
    def edit(lab):
        lab[47:49, 45:47, 0] = 3  # an island at the LV centre, all around it blood pool

    return _edit_label(root, edit), "scar inside the LV cavity: slice k=0"


def scar_without_myocardium(root):
    def edit(lab):
        lab[:, :, 4] = 0
        lab[20:24, 20:24, 4] = 3  # scar on a slice with neither myocardium nor cavity

    return _edit_label(root, edit), "scar with no myocardium: slice k=4"


def no_lv(root):
    def edit(lab):
        lab[lab < 3] = 0  # keep only scar: no cavity, no healthy myocardium

    return _edit_label(root, edit), "no LV"


def duplicate_folder_ignoring_case(root):
    write_case(root, "case_p001")
    return root / "case_p001", "duplicate case id"


def file_names_other_case(root):
    path = _image(root)
    other = path.with_name("Case_P002.nii.gz")
    path.rename(other)
    return other, "names case 'Case_P002'"


BAD_INPUTS = [
    root_missing, root_is_file, no_case_folders, missing_image, missing_label, truncated_image,
    garbage_label, truncated_uncompressed_label, label_4d, image_2d, shape_mismatch, spacing_mismatch,
    origin_mismatch, direction_mismatch, zero_spacing, negative_spacing, nan_spacing, nan_image, inf_image,
    label_out_of_range, negative_label, non_integer_label, scar_in_background, scar_in_cavity,
    scar_without_myocardium, no_lv, duplicate_folder_ignoring_case, file_names_other_case,
]


@pytest.fixture
def clean_root(tmp_path):
    return write_cohort(tmp_path / "cohort")


def test_clean_cohort_is_ok(clean_root):
    report = validate_cohort(clean_root)
    assert report.ok, report.lines()
    assert report.checked == 2


@pytest.mark.parametrize("corrupt", BAD_INPUTS, ids=lambda f: f.__name__)
def test_bad_input_is_reported(clean_root, corrupt):
    path, phrase = corrupt(clean_root)
    report = validate_cohort(clean_root)
    assert not report.ok
    hits = [p for p in report.problems if Path(p.path) == Path(path) and phrase in p.reason]
    assert hits, f"expected a problem at {path} containing {phrase!r}, got:\n" + "\n".join(report.lines())
    for problem in report.problems:
        assert str(problem) == f"{problem.path}: {problem.reason}"
        assert "\n" not in str(problem)


def test_one_case_can_have_several_problems_and_others_stay_clean(clean_root):
    nan_image(clean_root)
    label_out_of_range(clean_root)
    report = validate_cohort(clean_root)
    reasons = [p.reason for p in report.problems]
    assert len(reasons) == 2, reasons
    assert {p.case_id for p in report.problems} == {CASE}


def test_trailing_singleton_axis_is_accepted(clean_root):
    lab, _ = read(_label(clean_root))
    img, _ = read(_image(clean_root))
    write_nifti(_label(clean_root), lab[..., None])
    write_nifti(_image(clean_root), img[..., None])
    assert validate_cohort(clean_root).ok


# ---- legitimate quirks of real files: must validate clean ----


def float64_integer_labels(root):
    write_case(root, CASE, label_dtype=np.float64)


def affine_scale_disagrees_with_pixdim(root):
    write_case(root, CASE, affine_scale=(1.0, 1.0, 1.0))


def varied_spacing_across_cases(root):
    write_case(root, CASE, zooms=(1.41, 1.41, 13.0))
    write_case(root, "Case_N002", zooms=(1.43, 1.43, 12.0))


def zero_padded_full_thorax(root):
    label = np.zeros((256, 256, 6), dtype=np.uint8)
    label[80:176, 70:166] = heart_labels()  # a small heart in a big zero-padded field
    image = np.zeros(label.shape, dtype=np.float32)
    image[40:216, 40:216] = raw_image(label[40:216, 40:216], border=0)
    write_case(root, CASE, label=label, image=image)


def extra_files_in_root(root):
    (root / "manifest.json").write_text(json.dumps({"cases": 2}))
    (root / "README").write_text("EMIDEC-layout cohort\n")
    (root / ".cache").mkdir()
    (root / "notes").mkdir()


def uncompressed_nii(root):
    write_case(root, "Case_N002", suffix=".nii")


LEGIT_QUIRKS = [
    float64_integer_labels, affine_scale_disagrees_with_pixdim, varied_spacing_across_cases,
    zero_padded_full_thorax, extra_files_in_root, uncompressed_nii,
]


@pytest.mark.parametrize("quirk", LEGIT_QUIRKS, ids=lambda f: f.__name__)
def test_legitimate_quirk_validates_clean(clean_root, quirk):
    quirk(clean_root)
    report = validate_cohort(clean_root)
    assert report.ok, report.lines()


def test_fully_scarred_ring_is_legitimate(clean_root):
    _edit_label(clean_root, lambda lab: lab.__setitem__((slice(None), slice(None), 1), np.where(lab[:, :, 1] == 2, 3, lab[:, :, 1])))
    assert validate_cohort(clean_root).ok


def test_checks_are_a_registry_of_named_functions():
    names = [name for name, _ in COHORT_CHECKS + CASE_CHECKS]
    assert len(names) == len(set(names))
    assert all(callable(fn) for _, fn in COHORT_CHECKS + CASE_CHECKS)


def test_report_round_trips_to_json(clean_root, tmp_path):
    nan_image(clean_root)
    report = validate_cohort(clean_root)
    out = tmp_path / "report.json"
    report.write_report(out)
    data = json.loads(out.read_text())
    assert data["ok"] is False and data["checked"] == 2
    assert data["problems"][0]["case_id"] == CASE
    assert "NaN/Inf" in data["problems"][0]["reason"]


def test_discovery_ignores_other_entries(clean_root):
    extra_files_in_root(clean_root)
    assert [c.case_id for c in discover_cases(clean_root)] == ["Case_N001", CASE]


def test_problem_is_one_line():
    assert str(Problem("a/b.nii.gz", "shape mismatch: x", "Case_N001")) == "a/b.nii.gz: shape mismatch: x"
