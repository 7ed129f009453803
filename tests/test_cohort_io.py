"""Loading EMIDEC-layout cohorts into slice records, and LV-centred crops, on real NIfTI files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.anatomy.geometry import lv_centre
from engine.io.cohort import (
    CohortConfig,
    CohortError,
    SliceRecord,
    discover_cases,
    load_case,
    load_cohort,
)
from engine.io.crop import CropBox, LVCentredCrop, LVCentredCropd
from tests.nifti_factory import (
    SHAPE,
    case_paths,
    heart_labels,
    raw_image,
    read,
    write_case,
    write_cohort,
    write_nifti,
)

MARK = (70, 20, 0)  # NIfTI (i, j, k): column 70, row 20 (upper right as displayed), first slice
MARK_VALUE = 4000.0


@pytest.fixture
def marked_root(tmp_path):
    """One case whose first stored slice has a bright voxel at an asymmetric spot."""
    label = heart_labels()
    image = raw_image(label)
    image[MARK] = MARK_VALUE
    write_case(tmp_path / "cohort", "Case_N001", label=label, image=image)
    return tmp_path / "cohort"


@pytest.mark.parametrize(
    "mirrored, apex_first, expected_slice, expected_row, expected_col",
    [
        (False, False, 0, 20, 70),
        (True, False, 0, 20, SHAPE[0] - 1 - 70),
        (False, True, SHAPE[2] - 1, 20, 70),
        (True, True, SHAPE[2] - 1, 20, SHAPE[0] - 1 - 70),
    ],
)
def test_records_follow_the_orientation_convention(marked_root, mirrored, apex_first, expected_slice, expected_row, expected_col):
    cohort = load_cohort(CohortConfig(root=str(marked_root), mirrored=mirrored, apex_first=apex_first))
    hits = [(r.slice_index, *map(int, np.argwhere(r.image == MARK_VALUE)[0])) for r in cohort.records if (r.image == MARK_VALUE).any()]
    assert hits == [(expected_slice, expected_row, expected_col)]
    record = cohort.records[0]
    assert record.image.shape == (SHAPE[1], SHAPE[0])  # [row = j, col = i]
    assert record.image.dtype == np.float32 and record.label.dtype == np.uint8


def test_levels_run_base_to_apex_and_no_lv_slices_are_counted(tmp_path):
    label = heart_labels(shape=(96, 96, 7))
    label[:, :, 6] = 0  # a slice past the heart
    write_case(tmp_path, "Case_P001", label=label)
    for apex_first in (False, True):
        cohort = load_cohort(CohortConfig(root=str(tmp_path), apex_first=apex_first))
        levels = [r.level for r in cohort.records]
        assert levels == ["basal", "basal", "mid", "mid", "apical", "apical"]
        assert cohort.report.slices_without_lv == {"Case_P001": 1}
        # stored apex-first, the stored base is the stack's first slice only after the flip
        empty_index = 0 if apex_first else 6
        assert empty_index not in [r.slice_index for r in cohort.records]


def test_spacing_comes_from_header_zooms_not_the_affine(tmp_path):
    write_case(tmp_path, "Case_N001", zooms=(1.41, 1.43, 13.0), affine_scale=(1.0, 1.0, 1.0))
    _, img = read(case_paths(tmp_path, "Case_N001")[0])
    assert np.allclose(np.diag(img.affine)[:3], 1.0)  # the quirk is really on disk
    record = load_cohort(CohortConfig(root=str(tmp_path))).records[0]
    assert record.spacing == (1.43, 1.41)  # (row_mm, col_mm) = (dj, di)
    assert record.slice_thickness == 13.0


def test_float64_labels_arrive_as_uint8(tmp_path):
    write_case(tmp_path, "Case_P001", label_dtype=np.float64)
    _, label_path = case_paths(tmp_path, "Case_P001")
    assert read(label_path)[0].dtype == np.float64
    cohort = load_cohort(CohortConfig(root=str(tmp_path)))
    stack = np.stack([r.label for r in cohort.records])
    assert stack.dtype == np.uint8
    assert set(np.unique(stack).tolist()) == {0, 1, 2, 3, 4}
    expected = np.transpose(heart_labels(), (2, 1, 0))
    assert np.array_equal(stack, expected)


def test_records_and_patients(tmp_path):
    write_cohort(tmp_path, case_ids=("Case_N001", "Case_N002", "Case_P001"))
    cohort = load_cohort(CohortConfig(root=str(tmp_path)))
    assert cohort.patients == {"Case_N001": False, "Case_N002": False, "Case_P001": True}
    assert len(cohort.records) == 3 * SHAPE[2]
    record = cohort.patient_records("Case_P001")[2]
    assert isinstance(record, SliceRecord)
    assert record.source == "Case_P001/2" and record.positive
    assert not cohort.patient_records("Case_P001")[0].positive
    with pytest.raises(AttributeError):
        record.level = "mid"  # frozen


def _break_two_cases(root):
    write_cohort(root, case_ids=("Case_N001", "Case_P001", "Case_P002"))
    image_path, _ = case_paths(root, "Case_P001")
    img, _ = read(image_path)
    img = np.array(img)
    img[1, 1, 1] = np.nan
    write_nifti(image_path, img)
    case_paths(root, "Case_P002")[1].unlink()
    return image_path, case_paths(root, "Case_P002")[1]


def test_fail_raises_listing_every_problem(tmp_path):
    nan_path, missing_path = _break_two_cases(tmp_path)
    with pytest.raises(CohortError) as info:
        load_cohort(CohortConfig(root=str(tmp_path)))
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert f"{nan_path}: NaN/Inf image values" in message
    assert f"{missing_path}: missing label file" in message
    assert len(info.value.problems) == 2


def test_quarantine_keeps_clean_cases_and_lists_the_bad_ones(tmp_path):
    nan_path, missing_path = _break_two_cases(tmp_path)
    cohort = load_cohort(CohortConfig(root=str(tmp_path), on_invalid="quarantine"))
    assert set(cohort.patients) == {"Case_N001"}
    assert {r.patient_id for r in cohort.records} == {"Case_N001"}
    assert set(cohort.report.quarantined) == {"Case_P001", "Case_P002"}
    assert any("NaN/Inf" in line for line in cohort.report.quarantined["Case_P001"])
    assert any(str(missing_path) in line for line in cohort.report.quarantined["Case_P002"])
    out = tmp_path / "report.json"
    cohort.report.write_report(out)
    data = json.loads(out.read_text())
    assert data["ok"] is False and set(data["quarantined"]) == {"Case_P001", "Case_P002"}


def test_quarantine_still_fails_on_an_empty_cohort(tmp_path):
    with pytest.raises(CohortError, match="empty cohort"):
        load_cohort(CohortConfig(root=str(tmp_path / "nowhere"), on_invalid="quarantine"))


def test_load_case_raises_on_a_bad_case(tmp_path):
    _break_two_cases(tmp_path)
    cases = {c.case_id: c for c in discover_cases(tmp_path)}
    assert len(load_case(cases["Case_N001"], CohortConfig(root=str(tmp_path)))) == SHAPE[2]
    with pytest.raises(CohortError, match="missing label file"):
        load_case(cases["Case_P002"], CohortConfig(root=str(tmp_path)))


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({"root": ""}, "root"),
        ({"root": "x", "on_invalid": "drop"}, "on_invalid"),
        ({"root": "x", "crop_size": 8}, "crop_size"),
        ({"root": "x", "crop_size": 64.0}, "crop_size"),
        ({"root": "x", "mirrored": "yes"}, "mirrored"),
        ({"root": "x", "reference_angle": float("nan")}, "reference_angle"),
    ],
)
def test_cohort_config_is_validated(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        CohortConfig(**kwargs)


# ---- LV-centred crops ----


def _label_slice(shape=(96, 96), centre=(46, 48)):
    """An engine-orientation label slice [row, col] with the LV centred at ``centre`` (row, col)."""
    vol = heart_labels(shape=(shape[1], shape[0], 1), centre=(centre[1], centre[0]), scar_slices=())
    return vol[:, :, 0].T


@pytest.mark.parametrize("size, centre", [(32, (46, 48)), (48, (46, 48)), ((40, 24), (30, 60))])
def test_crop_is_centred_on_the_lv(size, centre):
    label = _label_slice(centre=centre)
    image = raw_image(label[..., None])[..., 0]
    crop, box = LVCentredCrop(size)(image, label)
    lab_crop, lab_box = LVCentredCrop(size)(label)
    assert lab_box == box
    rows, cols = (size, size) if isinstance(size, int) else size
    assert crop.shape == (rows, cols) and crop.dtype == image.dtype
    assert box.shape == (rows, cols)
    centre_in_crop = lv_centre(lab_crop)
    assert abs(centre_in_crop[0] - rows // 2) <= 0.5 and abs(centre_in_crop[1] - cols // 2) <= 0.5
    assert np.array_equal(crop, image[box.r0 : box.r1, box.c0 : box.c1])


def test_crop_pads_with_zeros_at_the_border_and_pastes_back():
    label = _label_slice(centre=(10, 85))  # LV near the top-right corner
    image = raw_image(label[..., None], border=0)[..., 0] + 1.0  # no zeros inside the image
    crop, box = LVCentredCrop(48)(image, label)
    assert box.r0 < 0 and box.c1 > 96
    assert crop.shape == (48, 48)
    assert np.all(crop[: -box.r0] == 0) and np.all(crop[:, 96 - box.c1 :] == 0)
    inside = crop[-box.r0 :, : 96 - box.c1]
    assert np.array_equal(inside, image[0 : box.r1, box.c0 : 96])
    assert np.all(inside > 0)
    pasted = box.paste(crop, np.zeros_like(image))
    window = np.zeros_like(image, dtype=bool)
    window[0 : box.r1, box.c0 :] = True
    assert np.array_equal(pasted[window], image[window]) and np.all(pasted[~window] == 0)


def test_crop_channels_and_torch_input():
    label = _label_slice()
    stack = torch.arange(2 * 96 * 96, dtype=torch.float32).reshape(2, 96, 96)
    crop, box = LVCentredCrop(32)(stack, label)
    assert isinstance(crop, torch.Tensor) and tuple(crop.shape) == (2, 32, 32)
    assert torch.equal(crop, stack[:, box.r0 : box.r1, box.c0 : box.c1])


def test_dictionary_crop_uses_the_label_for_every_key(tmp_path):
    write_case(tmp_path, "Case_P001")
    record = load_cohort(CohortConfig(root=str(tmp_path))).records[2]
    out = LVCentredCropd(keys=("image", "label"), size=32)({"image": record.image, "label": record.label, "id": record.source})
    box = out["crop_box"]
    assert isinstance(box, CropBox)
    assert out["image"].shape == out["label"].shape == (32, 32)
    assert out["label"].dtype == np.uint8 and out["id"] == record.source
    assert np.array_equal(out["label"], record.label[box.r0 : box.r1, box.c0 : box.c1])
    assert (out["label"] == 3).sum() == (record.label == 3).sum()  # the whole heart fits


def test_crop_without_lv_raises():
    with pytest.raises(ValueError, match="no LV"):
        LVCentredCrop(32)(np.zeros((64, 64), np.float32), np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="crop size"):
        LVCentredCrop(0)
