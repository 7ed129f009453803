"""engine.training.data: slice arrays from a real (phantom, NIfTI on disk) cohort, the numpy inputs of
each stage, and the augmented MONAI datasets."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from monai.transforms import RandAffined
from scipy import ndimage

from engine.anatomy.captions import CONSTANT_CAPTION, caption
from engine.anatomy.geometry import lv_centre
from engine.anatomy.labels import MYOCARDIUM, scar_region
from engine.anatomy.masks import ScarSamplerConfig, apply_scar, edge_map
from engine.io.cohort import CohortConfig, load_cohort
from engine.io.splits import split_patients
from engine.phantom import PhantomConfig, write_phantom_cohort
from engine.training.data import (
    DownstreamData,
    SliceArrays,
    SliceDataConfig,
    build_slice_arrays,
    concat,
    derive_seed,
    inpainting_arrays,
    mix_real_and_synthetic,
    patients_in,
    positive_weighted_sampler_weights,
    select,
    split_arrays,
    synthesis_candidates,
)
from engine.training.datasets import EdgeMap, EdgeMapd, InpaintingDataset, SegmentationDataset, collate

S = 96


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """6 phantom patients at 128 x 128, written as EMIDEC NIfTI and read back."""
    root = tmp_path_factory.mktemp("phantom6")
    write_phantom_cohort(root, 6, seed=0, cfg=PhantomConfig(image_size=128))
    return load_cohort(CohortConfig(root=str(root)))


@pytest.fixture(scope="module")
def arrays(cohort):
    return build_slice_arrays(cohort.records, SliceDataConfig(crop_size=S), reference_angle=120.0)


def ring_arrays(label: np.ndarray, level: str = "mid") -> SliceArrays:
    """One-slice SliceArrays around a hand-made label."""
    return SliceArrays(
        image=np.full((1, 1, *label.shape), 0.5, np.float32), label=label[None], level=[level],
        source=["Ring/0"], patient_id=["Ring"], caption=[""], positive=[bool(scar_region(label).any())],
        pixel_area_mm2=[1.0],
    )


def ring(size=S, r_in=14.0, r_out=22.0):
    rows, cols = np.mgrid[:size, :size]
    c = size // 2
    r = np.hypot(rows - c, cols - c)
    label = np.zeros((size, size), np.uint8)
    label[r <= r_out] = 2
    label[r < r_in] = 1
    angle = np.degrees(np.arctan2(-(rows - c), cols - c)) % 360
    return label, angle


# ---------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"crop_size": 8}, "crop_size"),
        ({"crop_size": True}, "crop_size"),
        ({"percentile": 0.0}, "percentile"),
        ({"percentile": 101}, "percentile"),
        ({"intensity": "zscore"}, "intensity"),
        ({"edge_width": 0}, "edge_width"),
        ({"mask_dilation": -1}, "mask_dilation"),
        ({"condition": "scribble"}, "condition"),
        ({"caption_mode": "none"}, "caption_mode"),
        ({"augment": "yes"}, "augment"),
        ({"rotate_degrees": 45.0}, "rotate_degrees"),  # would move scars across AHA segments
        ({"scale_range": 0.6}, "scale_range"),
        ({"intensity_jitter": -0.1}, "intensity_jitter"),
        ({"noise_std": float("nan")}, "noise_std"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SliceDataConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------
# slice arrays


def test_slice_arrays_shapes_ranges_and_metadata(cohort, arrays):
    n = len(cohort.records)
    assert len(arrays) == n and arrays.crop_size == S
    assert arrays.image.shape == (n, 1, S, S) and arrays.image.dtype == np.float32
    assert arrays.image.min() >= 0.0 and arrays.image.max() <= 1.0
    assert arrays.label.shape == (n, S, S) and arrays.label.dtype == np.uint8
    assert set(np.unique(arrays.label)) <= {0, 1, 2, 3, 4}
    assert arrays.source == [r.source for r in cohort.records]
    assert arrays.patient_id == [r.patient_id for r in cohort.records]
    assert arrays.level == [r.level for r in cohort.records]
    assert "apex" in arrays.level  # apex slices are kept, flagged by their level
    assert arrays.positive.tolist() == [r.positive for r in cohort.records]
    assert 0 < arrays.positive.sum() < n
    np.testing.assert_allclose(arrays.pixel_area_mm2, [r.spacing[0] * r.spacing[1] for r in cohort.records], rtol=1e-6)
    # the crop keeps every labelled pixel of the slice
    assert [int(np.count_nonzero(lab)) for lab in arrays.label] == [int(np.count_nonzero(r.label)) for r in cohort.records]
    # per-slice normalization: each slice reaches 1 at its own percentile
    assert np.all((arrays.image >= 1.0).mean(axis=(1, 2, 3)) >= 0.004)


def test_crop_is_centred_on_the_lv(arrays):
    for lab in arrays.label:
        row, col = lv_centre(lab)
        assert abs(row - S // 2) <= 0.5 and abs(col - S // 2) <= 0.5
    with_cavity = [lab for lab in arrays.label if (lab == 1).any()]
    assert with_cavity and all((lab[S // 2 - 8 : S // 2 + 8, S // 2 - 8 : S // 2 + 8] == 1).any() for lab in with_cavity)


def test_captions_are_those_of_the_cropped_labels(cohort, arrays):
    assert arrays.caption == [caption(lab, lev, 120.0) for lab, lev in zip(arrays.label, arrays.level)]
    positives = [c for c, p in zip(arrays.caption, arrays.positive) if p]
    assert positives and all("Enhancement in" in c for c in positives)
    rotated = build_slice_arrays(cohort.records, SliceDataConfig(crop_size=S), reference_angle=100.0)
    assert rotated.caption == [caption(lab, lev, 100.0) for lab, lev in zip(arrays.label, arrays.level)]
    constant = build_slice_arrays(cohort.records[:3], SliceDataConfig(crop_size=S, caption_mode="constant"))
    assert constant.caption == [CONSTANT_CAPTION] * 3


def test_failed_crops_raise_naming_the_slice(cohort):
    record = cohort.records[4]
    no_lv = dataclasses.replace(record, label=np.zeros_like(record.label))
    with pytest.raises(ValueError, match=f"slice {record.source}: .*no LV"):
        build_slice_arrays([cohort.records[0], no_lv], SliceDataConfig(crop_size=S))
    with pytest.raises(ValueError, match=f"slice {cohort.records[0].source}: .*cuts .* raise crop_size"):
        build_slice_arrays([cohort.records[0]], SliceDataConfig(crop_size=16))
    blank = dataclasses.replace(record, image=np.zeros_like(record.image))
    with pytest.raises(ValueError, match=f"slice {record.source}: .*no intensity scale"):
        build_slice_arrays([blank], SliceDataConfig(crop_size=S))
    with pytest.raises(ValueError, match="no slice records"):
        build_slice_arrays([], SliceDataConfig(crop_size=S))


def test_select_concat_patients_and_splits(cohort, arrays):
    assert patients_in(arrays) == dict(sorted(cohort.patients.items()))
    idx = [5, 0, 3]
    sub = select(arrays, idx)
    assert sub.source == [arrays.source[i] for i in idx]
    np.testing.assert_array_equal(sub.image, arrays.image[idx])
    pos = select(arrays, arrays.positive)
    assert len(pos) == arrays.positive.sum() and pos.positive.all()
    both = concat([pos, select(arrays, ~arrays.positive)])
    assert len(both) == len(arrays) and sorted(both.source) == sorted(arrays.source)
    assert len(select(arrays, [])) == 0
    splits = split_patients(patients_in(arrays), seed=0)
    parts = split_arrays(arrays, splits)
    for name, part in parts.items():
        assert set(part.patient_id) == set(splits[name])
    assert sum(len(p) for p in parts.values()) == len(arrays)
    with pytest.raises(ValueError, match="in no split"):
        split_arrays(arrays, {"train": splits["train"]})
    with pytest.raises(ValueError, match="shape"):
        select(arrays, np.ones(3, bool))


# ---------------------------------------------------------------------------------------------------
# inpainting inputs


@pytest.mark.parametrize("condition", ["edges", "mask"])
def test_inpainting_arrays(arrays, condition):
    cfg = SliceDataConfig(crop_size=S, condition=condition, mask_dilation=2)
    inp = inpainting_arrays(arrays, cfg)
    p = int(arrays.positive.sum())
    for key in ("image", "scar", "mask", "condition", "masked_image"):
        assert inp[key].shape == (p, 1, S, S), key
    assert inp["source"] == [s for s, pos in zip(arrays.source, arrays.positive) if pos]
    assert inp["image"].min() >= -1.0 and inp["image"].max() <= 1.0 and inp["image"].min() == -1.0
    scar, mask, cond = (inp[k][:, 0].astype(bool) for k in ("scar", "mask", "condition"))
    np.testing.assert_array_equal(scar, scar_region(inp["label"]))
    assert scar.any(axis=(1, 2)).all()
    assert np.all(mask >= scar) and mask.sum() > scar.sum()  # the region the model fills holds the scar and more
    grown = ndimage.binary_dilation(scar, structure=np.ones((1, 3, 3), bool), iterations=2)
    np.testing.assert_array_equal(mask, grown)
    assert (mask & ~(inp["label"] >= MYOCARDIUM)).any()  # dilation may leave the myocardium (documented)
    if condition == "edges":
        assert np.all(cond <= scar)
        np.testing.assert_array_equal(cond, np.stack([edge_map(m, 1) for m in scar]))
    else:
        np.testing.assert_array_equal(cond, scar)
    np.testing.assert_array_equal(inp["masked_image"][inp["mask"] == 1], 0.0)
    np.testing.assert_array_equal(inp["masked_image"][inp["mask"] == 0], inp["image"][inp["mask"] == 0])
    with pytest.raises(ValueError, match="none of the .* slices is positive"):
        inpainting_arrays(select(arrays, ~arrays.positive), cfg)


# ---------------------------------------------------------------------------------------------------
# synthesis candidates

K = 3


@pytest.fixture(scope="module")
def candidates(arrays):
    return synthesis_candidates(arrays, ScarSamplerConfig(), k=K, seed=7, reference_angle=120.0)


def test_synthesis_candidates_cover_every_negative_slice(arrays, candidates):
    c = candidates
    negatives = [s for s, p in zip(arrays.source, arrays.positive) if not p]
    m = len(c["sample_id"])
    assert m + len(c["skipped"]) == K * len(negatives)
    assert len(set(c["sample_id"])) == m and len(set(c["seed"].tolist())) == m
    requested = {f"{s}#{d}@7" for s in negatives for d in range(K)}
    assert set(c["sample_id"]) | {s["sample_id"] for s in c["skipped"]} == requested
    for sid, src in zip(c["sample_id"], c["source"]):
        assert sid.rsplit("#", 1)[0] == src
    counts = {s: c["source"].count(s) for s in set(c["source"])}
    assert set(counts.values()) == {K}
    assert all(lev in ("basal", "mid", "apical") for lev in c["level"])
    # apex negatives are reported, never silently dropped
    apex = {s for s, p, lev in zip(arrays.source, arrays.positive, arrays.level) if not p and lev == "apex"}
    assert apex and {s["source"] for s in c["skipped"]} == apex
    assert all("apex slice" in s["reason"] for s in c["skipped"])


def test_synthesis_candidates_masks_labels_conditions_and_captions(arrays, candidates):
    c = candidates
    m = len(c["sample_id"])
    for key in ("image", "scar", "mask", "condition", "masked_image"):
        assert c[key].shape == (m, 1, S, S), key
    where = {s: i for i, s in enumerate(arrays.source)}
    rows = [where[s] for s in c["source"]]
    original = arrays.label[rows]
    scar = c["scar"][:, 0].astype(bool)
    assert scar.any(axis=(1, 2)).all()
    assert np.all(~scar | (original == MYOCARDIUM))  # inside the myocardium
    np.testing.assert_array_equal(c["label"], np.stack([apply_scar(lab, s) for lab, s in zip(original, scar)]))
    np.testing.assert_array_equal(scar_region(c["label"]), scar)
    np.testing.assert_array_equal(c["condition"][:, 0].astype(bool), np.stack([edge_map(s, 1) for s in scar]))
    assert np.all(c["mask"][:, 0].astype(bool) >= scar)
    np.testing.assert_array_equal(c["image"], arrays.image[rows] * 2 - 1)
    assert c["caption"] == [caption(lab, lev, 120.0) for lab, lev in zip(c["label"], c["level"])]
    assert all("Enhancement in" in t for t in c["caption"])
    assert c["seed"][0] == derive_seed(7, c["source"][0], int(c["sample_id"][0].rsplit("#", 1)[1].split("@")[0]))


def test_synthesis_candidates_are_deterministic_and_order_independent(arrays, candidates):
    again = synthesis_candidates(arrays, ScarSamplerConfig(), k=K, seed=7)
    shuffled = select(arrays, np.random.default_rng(3).permutation(len(arrays)))
    for other in (again, synthesis_candidates(shuffled, ScarSamplerConfig(), k=K, seed=7)):
        for key, value in candidates.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(other[key], value, err_msg=key)
            else:
                assert other[key] == value, key
    fewer = synthesis_candidates(select(arrays, np.arange(len(arrays)) % 2 == 0), ScarSamplerConfig(), k=K, seed=7)
    pos = {sid: i for i, sid in enumerate(candidates["sample_id"])}
    for j, sid in enumerate(fewer["sample_id"]):  # a candidate does not depend on the other slices
        np.testing.assert_array_equal(fewer["scar"][j], candidates["scar"][pos[sid]])
    other_seed = synthesis_candidates(arrays, ScarSamplerConfig(), k=K, seed=8)
    assert not np.array_equal(other_seed["scar"], candidates["scar"])


def test_derive_seed_is_a_fixed_function_of_its_parts():
    # hashlib, so the same in every process (Python's hash() of a str is salted per process)
    assert derive_seed(0, "Case_N001/3", 1) == 585317913925329212
    assert derive_seed(7, "a", 0) == 3794914176312476449
    assert 0 <= derive_seed("x") < 2**63


def test_slices_where_no_scar_fits_are_reported():
    label, angle = ring()
    label[(label == MYOCARDIUM) & ~(angle < 30)] = 0  # myocardium only in the anterolateral wall
    rca_only = ScarSamplerConfig(pattern_weights={"ischemic": 1.0}, territory_weights={"RCA": 1.0}, max_tries=3)
    out = synthesis_candidates(ring_arrays(label), rca_only, k=2, seed=0)
    assert out["sample_id"] == [] and out["image"].shape == (0, 1, S, S)
    assert [s["sample_id"] for s in out["skipped"]] == ["Ring/0#0@0", "Ring/0#1@0"]
    assert all("no scar fits" in s["reason"] for s in out["skipped"])
    with pytest.raises(ValueError, match="k must be"):
        synthesis_candidates(ring_arrays(label), rca_only, k=0)


# ---------------------------------------------------------------------------------------------------
# datasets and augmentation


def test_segmentation_dataset_items_augmentation_and_determinism(arrays):
    cfg = SliceDataConfig(crop_size=S)
    plain = SegmentationDataset(arrays, cfg, train=False)
    item = plain[2]
    assert item["image"].shape == (1, S, S) and item["image"].dtype == torch.float32
    assert item["label"].shape == (S, S) and item["label"].dtype == torch.int64
    np.testing.assert_array_equal(item["image"].numpy(), arrays.image[2])
    np.testing.assert_array_equal(item["label"].numpy(), arrays.label[2])

    train = SegmentationDataset(arrays, cfg, train=True, seed=1)
    pos = int(np.flatnonzero(arrays.positive)[0])
    a, b = train[pos], train[pos]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], item["image"] if pos == 2 else plain[pos]["image"])
    assert set(torch.unique(a["label"]).tolist()) <= set(np.unique(arrays.label[pos]).tolist())
    assert (a["label"] >= 3).any()
    assert not torch.equal(SegmentationDataset(arrays, cfg, train=True, seed=2)[pos]["image"], a["image"])
    train.set_epoch(1)
    assert not torch.equal(train[pos]["image"], a["image"])
    train.set_epoch(0)
    assert torch.equal(train[pos]["image"], a["image"])
    no_aug = SegmentationDataset(arrays, dataclasses.replace(cfg, augment=False), train=True, seed=1)
    np.testing.assert_array_equal(no_aug[pos]["image"].numpy(), arrays.image[pos])
    for i in range(0, len(train), 7):
        assert set(torch.unique(train[i]["label"]).tolist()) <= {0, 1, 2, 3, 4}
    with pytest.raises(IndexError):
        train[len(train)]


def _rand_affine(dataset) -> RandAffined:
    return next(t for t in dataset.transform.transforms if isinstance(t, RandAffined))


def test_augmentation_stays_within_the_configured_rotation_and_scale(arrays):
    cfg = SliceDataConfig(crop_size=S, rotate_degrees=10.0, scale_range=0.1)
    ds = SegmentationDataset(arrays, cfg, train=True, seed=0)
    grid = _rand_affine(ds).rand_affine.rand_affine_grid
    assert grid.rotate_range == (math.radians(10.0),)
    angles, scales = [], []
    for i in range(24):
        ds[i % len(ds)]
        angles.append(float(np.asarray(grid.rotate_params).ravel()[0]))
        scales.extend(np.asarray(grid.scale_params, float).ravel().tolist())
    assert max(abs(a) for a in angles) <= math.radians(10.0) and max(abs(a) for a in angles) > math.radians(2.0)
    assert all(0.9 <= s <= 1.1 for s in scales)
    # a rotated ring's scar moves by no more than the limit: its angular centroid shifts <= 10 degrees
    label, angle = ring()
    label[(label == MYOCARDIUM) & (angle > 80) & (angle < 100)] = 3
    one = SegmentationDataset({"image": np.zeros((1, 1, S, S), np.float32), "label": label[None]},
                              dataclasses.replace(cfg, scale_range=0.0), train=True, seed=0)
    for epoch in range(6):
        one.set_epoch(epoch)
        moved = one[0]["label"].numpy() == 3
        rows, cols = np.nonzero(moved)
        centre = math.degrees(math.atan2(-(rows.mean() - S // 2), cols.mean() - S // 2))
        assert abs(centre - 90.0) <= 10.0 + 1.0


@pytest.mark.parametrize("condition", ["edges", "mask"])
def test_inpainting_dataset_keeps_the_condition_consistent(arrays, condition):
    cfg = SliceDataConfig(crop_size=S, condition=condition, edge_width=1)
    ds = InpaintingDataset(arrays, cfg, train=True, seed=3)
    inp = inpainting_arrays(arrays, cfg)
    assert len(ds) == len(inp["image"])
    for i in range(len(ds)):
        item = ds[i]
        for key in ("image", "mask", "condition", "scar", "masked_image"):
            assert item[key].shape == (1, S, S) and item[key].dtype == torch.float32, key
        assert item["caption"] == inp["caption"][i] and item["source"] == inp["source"][i]
        assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
        scar, mask, cond = (item[k].numpy() for k in ("scar", "mask", "condition"))
        assert set(np.unique(scar)) <= {0.0, 1.0} and set(np.unique(mask)) <= {0.0, 1.0}
        assert scar.any() and np.all(mask >= scar)
        expected = edge_map(scar[0] > 0.5, 1) if condition == "edges" else scar[0] > 0.5
        np.testing.assert_array_equal(cond[0] > 0.5, expected)
        torch.testing.assert_close(item["masked_image"], item["image"] * (1 - item["mask"]))
    assert not np.array_equal(ds[0]["scar"].numpy(), inp["scar"][0].astype(np.float32))  # it moved
    plain = InpaintingDataset(inp, cfg, train=False)[0]
    np.testing.assert_array_equal(plain["image"].numpy(), inp["image"][0])
    np.testing.assert_array_equal(plain["condition"].numpy(), inp["condition"][0])


def test_collate_stacks_tensors_and_keeps_captions(arrays):
    ds = InpaintingDataset(arrays, SliceDataConfig(crop_size=S), train=True, seed=0)
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["image"].shape == (3, 1, S, S) and batch["condition"].shape == (3, 1, S, S)
    assert batch["caption"] == [ds[i]["caption"] for i in range(3)] and isinstance(batch["caption"][0], str)
    loader = torch.utils.data.DataLoader(SegmentationDataset(arrays, train=False), batch_size=4, collate_fn=collate)
    first = next(iter(loader))
    assert first["image"].shape == (4, 1, S, S) and first["label"].shape == (4, S, S)


def test_edge_map_transform_array_and_dictionary():
    label, _ = ring()
    scar = (label == MYOCARDIUM)[None].astype(np.float32)
    out = EdgeMap(2)(scar)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0] > 0.5, edge_map(scar[0] > 0, 2))
    t = EdgeMap(1)(torch.from_numpy(scar))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    d = EdgeMapd(keys="scar", width=1, output_keys="condition")({"scar": torch.from_numpy(scar)})
    assert torch.equal(d["condition"], t) and torch.equal(d["scar"], torch.from_numpy(scar))


# ---------------------------------------------------------------------------------------------------
# downstream data


def _synthetic(n, seed=0, passed=None):
    rng = np.random.default_rng(seed)
    label, _ = ring()
    labels = np.repeat(label[None], n, axis=0)
    labels[:, S // 2 - 20 : S // 2 - 16, S // 2 - 2 : S // 2 + 2] = 3
    out = {"image": rng.uniform(0, 1, (n, 1, S, S)).astype(np.float32), "label": labels,
           "sample_id": [f"Syn/{i}#0" for i in range(n)]}
    if passed is not None:
        out["passed"] = passed
    return out


def test_mix_real_and_synthetic(arrays):
    syn = _synthetic(10)
    mixed = mix_real_and_synthetic(arrays, syn, 4, seed=0)
    assert isinstance(mixed, DownstreamData)
    assert len(mixed) == len(arrays) + 4 and mixed.synthetic.sum() == 4
    assert mixed.image.shape == (len(arrays) + 4, 1, S, S) and mixed.label.dtype == np.uint8
    assert mixed.source[: len(arrays)] == arrays.source
    chosen = mixed.source[len(arrays):]
    assert len(set(chosen)) == 4 and all(s.startswith("Syn/") for s in chosen)
    assert mix_real_and_synthetic(arrays, syn, 4, seed=0).source == mixed.source
    assert {tuple(mix_real_and_synthetic(arrays, syn, 4, seed=s).source[-4:]) for s in range(5)} != {tuple(chosen)}
    assert len(mix_real_and_synthetic(arrays, None, 0)) == len(arrays)
    assert len(mix_real_and_synthetic(arrays, syn, 10)) == len(arrays) + 10
    passed = np.zeros(10, bool)
    passed[[1, 4, 6]] = True
    only_passed = mix_real_and_synthetic(arrays, _synthetic(10, passed=passed), 3)
    assert sorted(only_passed.source[len(arrays):]) == ["Syn/1#0", "Syn/4#0", "Syn/6#0"]
    with pytest.raises(ValueError, match="asked for 11 synthetic samples but only 10"):
        mix_real_and_synthetic(arrays, syn, 11)
    with pytest.raises(ValueError, match="asked for 4 synthetic samples but only 3 .*passed"):
        mix_real_and_synthetic(arrays, _synthetic(10, passed=passed), 4)
    with pytest.raises(ValueError, match="no synthetic data"):
        mix_real_and_synthetic(arrays, None, 1)
    bad = _synthetic(3)
    bad["image"] = bad["image"] * 255
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mix_real_and_synthetic(arrays, bad, 2)
    ds = SegmentationDataset(mixed, train=False)
    assert len(ds) == len(mixed) and ds[len(mixed) - 1]["label"].max() == 3


def test_sampler_weights_balance_positive_and_negative(arrays):
    w = positive_weighted_sampler_weights(arrays)
    assert w.shape == (len(arrays),) and np.all(w > 0)
    assert math.isclose(w[arrays.positive].sum(), 0.5) and math.isclose(w[~arrays.positive].sum(), 0.5)
    sampler = torch.utils.data.WeightedRandomSampler(w, num_samples=4000, generator=torch.Generator().manual_seed(0))
    drawn = arrays.positive[list(sampler)]
    assert abs(drawn.mean() - 0.5) < 0.05  # about 1 in 6 slices is positive, yet half are drawn
    mixed = mix_real_and_synthetic(arrays, _synthetic(6), 6)
    wm = positive_weighted_sampler_weights(mixed)
    assert math.isclose(wm[mixed.positive].sum(), 0.5)
    with pytest.raises(ValueError, match="0 positive"):
        positive_weighted_sampler_weights(select(arrays, ~arrays.positive))


def test_the_vae_folder_is_absolute_for_workers_in_other_folders(tmp_path, monkeypatch):
    from engine.training.vae import VAEStageConfig

    monkeypatch.chdir(tmp_path)
    assert VAEStageConfig().folder("runs/demo") == tmp_path / "runs" / "demo" / "vae"
    assert VAEStageConfig(pretrained="models/vae").folder("runs/demo") == tmp_path / "models" / "vae"


def test_the_synthesis_tasks_modules_import_neither_torch_nor_monai():
    """Every per-shard preparation and write task worker imports these, and every command its
    settings; MONAI alone costs ~7 s of CPU per process (engine.training.datasets holds the MONAI
    layer, imported where a dataset is built)."""
    import subprocess
    import sys

    code = ("import sys; import engine.synthesis.plan, engine.synthesis.actors, engine.synthesis.sink, "
            "engine.training.data; print(sorted(m for m in ('torch', 'monai') if m in sys.modules)); "
            "import engine.settings; print('monai' in sys.modules)")  # every command's config: torch, no MONAI
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["[]", "False"]


def _pool(n_real_pos: int = 30, n_real_neg: int = 70, n_syn: int = 20):
    positive = np.r_[np.ones(n_real_pos, bool), np.zeros(n_real_neg, bool), np.ones(n_syn, bool)]
    synthetic = np.r_[np.zeros(n_real_pos + n_real_neg, bool), np.ones(n_syn, bool)]
    return positive, synthetic


@pytest.mark.parametrize("world", [1, 2])
def test_paired_batches_share_the_real_draws_and_steps_of_every_arm(world):
    """Real only and + synthetic: the same number of batches, and the same real draws in the same
    order once the synthetic samples are taken out of each batch."""
    from engine.training.loop import paired_batches

    positive, synthetic = _pool()
    real_only = (positive[:100], synthetic[:100])
    for epoch in (0, 3):
        for rank in range(world):
            base = paired_batches(*real_only, 16, epoch, rank, world, seed=5)
            mixed = paired_batches(positive, synthetic, 16, epoch, rank, world, seed=5, synthetic_fraction=0.4)
            assert len(base) == len(mixed) == math.ceil(math.ceil(100 / world) / 16)
            assert [[i for i in b if not synthetic[i]] for b in mixed] == base
            assert any(len(m) > len(b) for m, b in zip(mixed, base))  # added, never in place of a real draw
    # another seed draws other real slices
    assert paired_batches(*real_only, 16, 0, 0, 1, seed=6) != paired_batches(*real_only, 16, 0, 0, 1, seed=5)


@pytest.mark.parametrize("fraction, expected", [(0.4, 0.4), (0.75, 0.75), (None, 20 / 50)])
def test_paired_batches_give_synthetic_samples_their_share_of_the_positive_draws(fraction, expected):
    from engine.training.loop import paired_batches

    positive, synthetic = _pool()
    drawn = np.concatenate([np.concatenate(paired_batches(positive, synthetic, 16, e, 0, 1, 0, fraction))
                            for e in range(200)]).astype(int)
    real = drawn[~synthetic[drawn]]
    assert positive[real].mean() == pytest.approx(0.5, abs=0.02)  # the real draws stay class-balanced
    assert synthetic[drawn][positive[drawn]].mean() == pytest.approx(expected, abs=0.02)
    assert set(drawn[synthetic[drawn]]) == set(np.flatnonzero(synthetic))  # every synthetic sample drawn


def test_paired_batches_refuse_what_they_cannot_balance():
    from engine.training.loop import paired_batches

    positive, synthetic = _pool()
    with pytest.raises(ValueError, match="synthetic_fraction must be in \\[0, 1\\)"):
        paired_batches(positive, synthetic, 16, 0, 0, 1, 0, synthetic_fraction=1.0)
    with pytest.raises(ValueError, match="cannot balance classes: 0 positive and 70 negative real slices"):
        paired_batches(*_pool(n_real_pos=0), 16, 0, 0, 1, 0)
