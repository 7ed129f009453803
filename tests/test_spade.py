"""The paper's SPADE baselines (SPADE-FC, SPADE-LC): the semantic map shows the full context or only a
band around the LV and never the region to synthesize; the actor is deterministic, bounded and
refuses the wrong variant; one tiny SPADE-FC trains on Ray Train and synthesizes through the same
plan, filter and store as every method, and refills the realism gate's slices."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from engine.anatomy.labels import CAVITY, MYOCARDIUM, SCAR
from engine.config import ConfigError, from_dict
from engine.models.spade import (
    SpadeConfig,
    build_spade,
    context_visibility,
    inpainting_l1,
    semantic_map,
)
from engine.settings import EngineConfig
from engine.synthesis.methods import method_actor
from engine.synthesis.spade import SpadeActor
from engine.training.checkpoint import export_model
from engine.training.data import SliceArrays, SliceDataConfig, dilate_masks
from engine.training.datasets import SpadeDataset
from engine.training.spade import SpadeStageConfig, spade_arrays

S = 32
MARGIN = 3
TINY = SpadeConfig(channels=(16, 8), hidden_channels=8)


def _slices(n=3, seed=0):
    """n positive slices [n, 1, S, S] in [-1, 1] (a ring of myocardium around a cavity, a bright scar on
    its right) with their labels, scar and inpainting mask (the scar dilated by 1 pixel)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:S, :S]
    r = np.hypot(yy - S / 2, xx - S / 2)
    label = np.where(r < 5, CAVITY, np.where(r < 8, MYOCARDIUM, 0)).astype(np.uint8)
    scar = (label == MYOCARDIUM) & (xx > S / 2 + 3)
    label = np.where(scar, SCAR, label).astype(np.uint8)
    image01 = np.where(label == CAVITY, 0.5, np.where(label == MYOCARDIUM, 0.1, np.where(scar, 0.9, 0.3)))
    image = (image01[None] + 0.02 * rng.standard_normal((n, S, S))).clip(0, 1) * 2 - 1
    labels, scars = np.repeat(label[None], n, 0), np.repeat(scar[None], n, 0)
    return {"image": image[:, None].astype(np.float32), "label": labels,
            "scar": scars[:, None].astype(np.uint8), "mask": dilate_masks(scars, 1)[:, None].astype(np.uint8)}


def _export(folder: Path, context: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    export_model(folder, "spade", build_spade(TINY, S), {
        "model": TINY.to_dict(), "method": f"spade-{'fc' if context == 'full' else 'lc'}", "context": context,
        "limited_margin_px": MARGIN, "mask_dilation": 1, "input_range": "-1,1", "crop_size": S})
    return folder


# --------------------------------------------------------------------------- semantic map

def test_full_context_shows_everything_outside_the_region_limited_only_the_band():
    a = _slices()
    full = semantic_map(a["image"], a["label"], a["scar"], a["mask"], "full")
    limited = semantic_map(a["image"], a["label"], a["scar"], a["mask"], "limited", MARGIN)
    hidden = a["mask"][:, 0] > 0
    assert full.shape == limited.shape == (3, 5, S, S) and full.dtype == np.float32
    assert np.array_equal(full[:, 4] > 0, ~hidden)  # FC: every pixel but the region to synthesize
    assert np.array_equal(full[:, 3][~hidden], a["image"][:, 0][~hidden])
    heart = a["label"] > 0
    band = dilate_masks(heart, MARGIN)
    assert np.array_equal(limited[:, 4] > 0, band & ~hidden)  # LC: only the LV and MARGIN px around it
    assert band.sum() < 0.6 * band.size and not (limited[:, 4] > 0)[:, 0, 0].any()  # the corners are blank
    assert np.all(limited[:, 3][~band] == 0) and np.array_equal(limited[:, 3][band & ~hidden], a["image"][:, 0][band & ~hidden])
    # the label channels are the same for both: blood pool, myocardium with the scar, the scar
    assert np.array_equal(full[:, :3], limited[:, :3])
    assert np.array_equal(full[:, 0] > 0, a["label"] == CAVITY) and np.array_equal(full[:, 2] > 0, a["scar"][:, 0] > 0)
    assert np.array_equal(full[:, 1] > 0, a["label"] >= MYOCARDIUM)


def test_the_region_to_synthesize_is_blanked_and_a_negative_source_gives_the_training_map():
    a = _slices()
    hidden = a["mask"][:, 0] > 0
    for context in ("full", "limited"):
        seg = semantic_map(a["image"], a["label"], a["scar"], a["mask"], context, MARGIN)
        assert np.all(seg[:, 3][hidden] == 0) and np.all(seg[:, 4][hidden] == 0)  # the real scar never leaks
        assert seg[:, 3].max() < 0.9 * 2 - 1 - 0.1  # no scar-bright pixel in the context
        # synthesis sees the negative slice (scar labelled healthy myocardium) and the scar to draw
        negative = np.where(a["label"] == SCAR, MYOCARDIUM, a["label"])
        assert np.array_equal(semantic_map(a["image"], negative, a["scar"], a["mask"], context, MARGIN), seg)
    with pytest.raises(ValueError, match="context must be 'full' or 'limited'"):
        context_visibility(a["label"], a["mask"], "partial")
    with pytest.raises(ValueError, match="label must be"):
        semantic_map(a["image"], a["label"][:2], a["scar"], a["mask"], "full")


def test_inpainting_l1_weights_the_region():
    image = torch.zeros(2, 1, 4, 4)
    generated = torch.zeros(2, 1, 4, 4)
    generated[:, :, :2] = 1.0  # error 1 on half the pixels
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, 0] = 1.0  # a region entirely inside the wrong half
    loss, parts = inpainting_l1(generated, image, mask, mask_weight=3.0)
    assert parts["l1"].item() == pytest.approx(0.5) and parts["l1_mask"].item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(0.5 + 3.0)
    assert inpainting_l1(generated, image, torch.zeros_like(mask), 3.0)[0].item() == pytest.approx(0.5)


@pytest.mark.parametrize("context", ["full", "limited"])
def test_dataset_items_follow_the_augmented_scar(context):
    a = _slices(4)
    cfg = SliceDataConfig(crop_size=S, rotate_degrees=20.0, scale_range=0.2)
    plain = SpadeDataset(a, cfg, context, MARGIN, train=False)[1]
    assert np.allclose(plain["seg"].numpy(), semantic_map(a["image"][1:2], a["label"][1:2], a["scar"][1:2],
                                                           a["mask"][1:2], context, MARGIN)[0])
    assert np.allclose(plain["image"].numpy(), a["image"][1])
    moved = SpadeDataset(a, cfg, context, MARGIN, train=True, seed=3)
    for i in range(len(moved)):
        item = moved[i]
        assert item["image"].shape == item["mask"].shape == (1, S, S) and item["seg"].shape == (5, S, S)
        scar, visible = item["seg"][2] > 0, item["seg"][4] > 0
        assert scar.any() and not (scar & visible).any() and bool((item["mask"][0] > 0)[scar].all())


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs, match", [
    ({"mask_weight": -1.0}, "mask_weight"),
    ({"limited_margin_px": -2}, "limited_margin_px"),
    ({"limited_margin_px": 2.5}, "limited_margin_px"),
    ({"loop": {"epochs": 0}}, "epochs"),
    ({"model": {"channels": []}}, "channels"),
    ({"model": {"kernel_size": 4}}, "kernel_size"),
    ({"model": {"upsampling": "cubic"}}, "upsampling"),
])
def test_bad_spade_settings_are_refused_naming_the_key(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        from_dict(EngineConfig, {"cohort": {"root": "x"}, "spade": kwargs})
    assert str(info.value).startswith("spade")


def test_crop_size_must_fit_the_blocks_and_the_cli_knows_both_variants():
    with pytest.raises(ValueError, match="multiple of 8"):
        build_spade(SpadeConfig(channels=(32, 16, 8)), 36)
    assert SpadeStageConfig().folder("runs/x", "limited") == Path("runs/x/spade-lc").absolute()
    from engine.cli import build_parser

    for stage in ("spade-fc", "spade-lc"):
        assert build_parser().parse_args(["train", stage, "--config", "c.yaml"]).stage == stage
    with pytest.raises(ValueError, match="synthesis.method: expected one of .*spade-fc.*spade-lc"):
        from_dict(EngineConfig, {"cohort": {"root": "x"}, "synthesis": {"method": "spade"}})


# --------------------------------------------------------------------------- actor

def test_actor_output_is_bounded_deterministic_and_not_blended(tmp_path):
    a = _slices(5)
    a["scar"][4] = 0  # a candidate without a scar (no scar fits) is left as it is
    inputs = {"image": a["image"], "scar": a["scar"], "mask": a["mask"], "source_label": a["label"]}
    actor = method_actor("spade-fc")(spade_folder=str(_export(tmp_path / "fc", "full")), method="spade-fc", batch_size=2)
    out = actor.generate(inputs, [1, 2, 3, 4, 5])
    assert out.shape == (5, 1, S, S) and out.dtype == np.float32 and np.isfinite(out).all()
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert np.array_equal(out[4], a["image"][4])
    assert not np.allclose(out[:4][a["mask"][:4] == 0], a["image"][:4][a["mask"][:4] == 0], atol=1e-3)  # whole image out
    again = SpadeActor(spade_folder=str(tmp_path / "fc"), method="spade-fc", batch_size=5).generate(inputs, [9, 9, 9, 9, 9])
    assert np.array_equal(out, again)  # no noise input: batch size and seeds change nothing
    lc = SpadeActor(spade_folder=str(_export(tmp_path / "lc", "limited")), method="spade-lc", batch_size=2)
    assert not np.allclose(lc.generate(inputs, [0] * 5)[:4], out[:4])  # the same weights would differ by the map alone


def test_actor_refuses_the_other_variant_and_a_missing_export(tmp_path):
    _export(tmp_path / "fc", "full")
    with pytest.raises(ValueError, match="spade-lc needs 'limited' context"):
        SpadeActor(spade_folder=str(tmp_path / "fc"), method="spade-lc", batch_size=2)
    with pytest.raises(FileNotFoundError, match="lgesynth train spade-lc"):
        SpadeActor(spade_folder=str(tmp_path / "nothing"), method="spade-lc", batch_size=2)
    actor = SpadeActor(spade_folder=str(tmp_path / "fc"), method="spade-fc", batch_size=2)
    big = _slices(1)
    with pytest.raises(ValueError, match=f"1, {S}, {S}"):
        actor.generate({k: np.pad(v, [(0, 0)] * (v.ndim - 2) + [(0, 4), (0, 4)]) for k, v in
                        {"image": big["image"], "scar": big["scar"], "mask": big["mask"],
                         "source_label": big["label"]}.items()}, [0])


def test_the_realism_gate_refills_real_positives_with_a_spade_actor(tmp_path):
    from engine.evaluation.gates import realism, realism_items

    a = _slices(3)
    arrays = SliceArrays(image=(a["image"] + 1) / 2, label=a["label"], level=["mid"] * 3,
                         source=[f"P/{i}" for i in range(3)], patient_id=["P"] * 3, caption=["c"] * 3,
                         positive=[True] * 3, pixel_area_mm2=[2.0] * 3)
    items = realism_items(arrays, SliceDataConfig(crop_size=S, mask_dilation=1))
    assert np.array_equal(spade_arrays(arrays, SliceDataConfig(crop_size=S, mask_dilation=1))["mask"], items["mask"])
    actor = SpadeActor(spade_folder=str(_export(tmp_path / "fc", "full")), method="spade-fc", batch_size=2)
    result = realism(actor, items, seed=0)
    assert result["slices"] == 3 and result["images"].shape == (3, S, S)
    assert all(np.isfinite(result[k]["mean"]) for k in ("ssim_whole", "ssim_crop", "rmse_whole", "rmse_crop"))


# --------------------------------------------------------------------------- Ray: train, then synthesize

TINY_SPADE = ["spade.model.channels=[16,8]", "spade.model.hidden_channels=8", "spade.loop.epochs=2",
              "spade.loop.batch_size=4", "spade.loop.max_steps=2", "spade.ray.num_workers=1",
              "spade.ray.checkpoint_every_steps=1", "spade.limited_margin_px=4"]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_spade_fc_trains_on_ray_and_synthesizes_through_the_same_harness(ray_cluster, tmp_path_factory):
    from engine.evaluation.gates import realism, realism_items
    from engine.synthesis.check import check_store
    from engine.synthesis.pipeline import SynthesisJob, synthesize
    from engine.synthesis.plan import build_shard_inputs, make_plan
    from engine.training.prepare import prepare_arrays
    from engine.training.spade import train_spade
    from tests.synth_helpers import make_tiny_run, tiny_config

    base = make_tiny_run(tmp_path_factory.mktemp("spade"))
    run = tmp_path_factory.mktemp("spade-run")
    cfg = tiny_config(base, run, [*TINY_SPADE, "synthesis.method=spade-fc", "synthesis.threshold=-1.0",
                                  "synthesis.max_candidates=8"])
    metrics = train_spade(cfg, "full")
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"]) and "l1_mask" in metrics
    record = json.loads((run / "spade-fc" / "spade.json").read_text())
    assert record["config"]["context"] == "full" and record["config"]["limited_margin_px"] == 4
    assert not (run / "spade-lc").exists()

    summary = synthesize(cfg, sequential=True, log=lambda _: None)
    assert summary["method"] == "spade-fc" and summary["written"] == 8
    url = cfg.synthesis.store_url(cfg.run_dir)
    assert check_store(url)[1] == []
    store = zarr.open_group(url, mode="r")
    content = store.attrs["lgesynth"]["content"]
    assert content["synthesis"]["method"] == "spade-fc" and content["spade"] == {"context": "full", "limited_margin_px": 4}
    assert content["checkpoints"]["spade"] == record["sha256"] and set(content["checkpoints"]) == {"reward", "spade"}
    parts = prepare_arrays(cfg)[0]
    plan = make_plan(parts["train"], cfg.synthesis.candidates_per_slice, seed=0, max_candidates=8)
    inputs = build_shard_inputs(plan.slices, plan.jobs[:4], 0, cfg.scar_sampler, cfg.data, cfg.cohort.reference_angle)
    outside = inputs["mask"][:, 0] == 0
    made = np.asarray([not r for r in json.loads(inputs["meta"])["skip_reason"]])
    source = (inputs["image"][:, 0] + 1) / 2
    assert not np.allclose(store["image"][:4][made][outside[made]], source[made][outside[made]], atol=1e-3)  # no blending

    job = SynthesisJob(cfg, parts)  # the evaluation's realism gate: the method's actor from the same arguments
    items = realism_items(parts["train"], job.data_cfg, 2)
    refilled = realism(method_actor("spade-fc")(**job.actor_args()[0]), items, seed=0)
    assert refilled["slices"] == 2 and np.isfinite(refilled["ssim_whole"]["mean"])

    lc = tiny_config(base, run, [*TINY_SPADE, "synthesis.method=spade-lc", "synthesis.store=" + str(run / "lc.zarr")])
    with pytest.raises(FileNotFoundError, match="lgesynth train spade-lc"):
        synthesize(lc, sequential=True, log=lambda _: None)
