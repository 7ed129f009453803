"""The three-gate evaluation: realism against an identity refill, alignment from a store, the
verdict against the paste control. The whole evaluation, downstream trainings included, runs in
tests/test_stages.py as the last step of `lgesynth demo`."""

import math

import numpy as np
import pytest

from engine.evaluation.gates import (
    EvaluationConfig,
    calibrate_detection,
    realism,
    realism_items,
    store_alignment,
)
from engine.evaluation.report import verdict
from engine.synthesis.actors import DiffusionActor, FilterActor
from engine.synthesis.methods import PasteActor
from engine.synthesis.pipeline import SynthesisJob, synthesize
from engine.training.prepare import prepare_arrays
from tests.synth_helpers import make_tiny_run, tiny_config

QUIET = lambda _: None  # noqa: E731


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("evaluation"), patients=8)


class Identity:
    """A 'method' that gives back the real image: realism must be perfect."""

    def generate(self, inputs, noise_seeds):
        return np.asarray(inputs["image"], np.float32)


def test_realism_is_perfect_for_the_real_image_and_not_for_a_refill(base, tmp_path):
    cfg = tiny_config(base, tmp_path)
    parts = prepare_arrays(cfg)[0]
    items = realism_items(parts["train"], cfg.data, max_slices=4)
    assert len(items["image"]) == 4 and (items["scar"] > 0).any()
    perfect = realism(Identity(), items, seed=0)
    assert perfect["ssim_whole"]["mean"] == pytest.approx(1.0) and perfect["rmse_crop"]["mean"] == pytest.approx(0.0)
    pasted = realism(PasteActor({"blood_ratio": 3.0, "noise": 0.0}), items, seed=0)
    assert pasted["ssim_crop"]["mean"] < 1.0 and pasted["rmse_crop"]["mean"] > pasted["rmse_whole"]["mean"] > 0
    job = SynthesisJob(cfg, parts)
    generated = realism(DiffusionActor(**job.actor_args()[0]), realism_items(parts["train"], job.data_cfg, 2), seed=1)
    assert generated["slices"] == 2 and generated["images"].shape == (2, 64, 64)
    assert -1.0 <= generated["ssim_whole"]["mean"] <= 1.0


def test_a_positive_slice_without_a_blood_pool_is_left_out_for_every_method_and_counted(base, tmp_path, caplog):
    """An apical positive slice has no cavity: the paste control cannot measure its level there, so
    the realism gate leaves it out for every method (it had stopped the study's evaluation)."""
    import dataclasses

    from engine.anatomy.labels import CAVITY, MYOCARDIUM
    from engine.training.data import select

    cfg = tiny_config(base, tmp_path)
    train = prepare_arrays(cfg)[0]["train"]
    positives = select(train, train.positive)
    label = positives.label.copy()
    label[0][label[0] == CAVITY] = MYOCARDIUM  # the first positive slice loses its blood pool
    apical = dataclasses.replace(positives, label=label)
    items = realism_items(apical, cfg.data)
    assert items["left_out"] == [str(positives.source[0])] and str(positives.source[0]) in caplog.text
    assert len(items["image"]) == len(positives) - 1 and list(items["source"]) == list(positives.source[1:])
    np.testing.assert_array_equal(items["image"], realism_items(positives, cfg.data)["image"][1:])
    pasted = realism(PasteActor(), items, seed=0)  # refused the apical slice before
    assert pasted["slices"] == len(positives) - 1 and pasted["left_out_no_blood_pool"] == 1


class WholeCropNoise:
    """A 'method' that rewrites every pixel: the real image inside the inpainting region, noise outside."""

    def generate(self, inputs, noise_seeds):
        real = np.asarray(inputs["image"], np.float32)
        noise = np.random.default_rng(0).uniform(-1, 1, real.shape).astype(np.float32)
        return np.where(np.asarray(inputs["mask"]) > 0, real, noise)


def test_realism_scores_every_method_over_the_same_pixels(base, tmp_path):
    """What a method writes outside the inpainting region is not scored (the real image stands
    there): a method that rewrites the whole crop scores as one that keeps it, given the same region."""
    cfg = tiny_config(base, tmp_path)
    items = realism_items(prepare_arrays(cfg)[0]["train"], cfg.data, max_slices=4)
    noisy = realism(WholeCropNoise(), items, seed=0)
    for key in ("ssim_whole", "ssim_crop", "ssim_region"):
        assert noisy[key]["mean"] == pytest.approx(1.0), key
    for key in ("rmse_whole", "rmse_crop", "rmse_region"):
        assert noisy[key]["mean"] == pytest.approx(0.0, abs=1e-6), key
    pasted = realism(PasteActor({"blood_ratio": 3.0, "noise": 0.0}), items, seed=0)
    assert pasted["rmse_region"]["mean"] > pasted["rmse_crop"]["mean"] > 0 and pasted["ssim_region"]["mean"] < 1


def test_scar_intensity_ratios_and_their_distance_to_real():
    from engine.evaluation.gates import ratio_distance
    from engine.evaluation.metrics import region_quality, scar_intensity_ratios

    label = np.zeros((3, 8, 8), np.uint8)
    label[:, 0:4, :] = 1  # blood pool
    label[:, 4:8, :] = 2  # remote myocardium
    label[:2, 6:8, 0:2] = 3  # scar on slices 0 and 1
    image = np.where(label == 1, 0.8, np.where(label == 2, 0.1, 0.0)).astype(np.float32)
    image[label == 3] = 0.8
    image[1][label[1] == 3] = 0.4
    got = scar_intensity_ratios(image, label)
    np.testing.assert_allclose(got["scar_blood"], [1.0, 0.5])
    np.testing.assert_allclose(got["scar_remote"], [8.0, 4.0])
    shifted = {k: v + 0.5 for k, v in got.items()}
    distance = ratio_distance(shifted, got)
    assert distance["scar_blood"]["wasserstein_to_real"] == pytest.approx(0.5)
    assert distance["scar_remote"]["median"] == pytest.approx(6.5) and distance["scar_remote"]["n"] == 2
    region = label[0] == 3
    same = region_quality(image[0], image[0], region, 1.0)
    assert same == {"ssim_region": pytest.approx(1.0), "rmse_region": 0.0}
    other = image[0].copy()
    other[region] = 0.0
    assert region_quality(other, image[0], region, 1.0)["rmse_region"] == pytest.approx(0.8)


def test_the_pools_channels_last_setting_reaches_the_actors(base, tmp_path):
    """synthesis.*.channels_last (default on) decides the layout of the actors' convolution weights."""
    import torch

    cfg = tiny_config(base, tmp_path)
    parts = prepare_arrays(cfg)[0]
    diffusion, filt = SynthesisJob(cfg, parts).actor_args()
    assert diffusion["channels_last"] and filt["channels_last"]
    off = tiny_config(base, tmp_path / "off", ["synthesis.diffusion.channels_last=false",
                                               "synthesis.filter.channels_last=false"])
    diffusion_off, filt_off = SynthesisJob(off, parts).actor_args()
    assert not diffusion_off["channels_last"] and not filt_off["channels_last"]
    for args, channels_last in ((diffusion, True), (diffusion_off, False)):
        conv_in = DiffusionActor(**args).model.unet.conv_in.weight
        assert conv_in.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert conv_in.is_contiguous() != channels_last
    for args, channels_last in ((filt, True), (filt_off, False)):
        convs = [m.weight for m in FilterActor(**args).model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(w.is_contiguous() != channels_last for w in convs if w.shape[1] > 1 and w.shape[2:] != (1, 1))


def test_store_alignment_matches_the_synthesis_summary(base, tmp_path):
    cfg = tiny_config(base, tmp_path, ["synthesis.max_candidates=8", "synthesis.method=paste", "synthesis.threshold=0.2"])
    summary = synthesize(cfg, sequential=True, log=QUIET)
    ali = store_alignment(cfg.synthesis.store_url(cfg.run_dir), 0.2)
    assert ali["made"] == summary["made"] and ali["kept"] == summary["kept"]
    assert ali["pass_rate"] == pytest.approx(summary["pass_rate"])
    found = ali["dice"][ali["dice"] > 0]
    assert (math.isnan(ali["dice_tp"]) and not len(found)) or ali["dice_tp"] == pytest.approx(found.mean())


def _records(called_right: tuple[int, int], n_pos: int = 10, n_neg: int = 10, seed: int = 0) -> dict:
    """Per-patient records: patients ``called_right[0]`` to ``called_right[1] - 1`` of each class
    called right, their scores ranking them right."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_pos + n_neg):
        positive, rank = i < n_pos, i % n_pos if i < n_pos else i - n_pos
        right = called_right[0] <= rank < called_right[1]
        score = (10.0 + rng.uniform() if right else rng.uniform()) if positive else (rng.uniform() if right else 10.0 + rng.uniform())
        out[f"p{i:02d}"] = {"positive": positive, "score": score, "called": positive == right,
                            "scar_dice_sum": 0.5 * positive, "scar_slices": int(positive), "scar_tp_dice_sum": 0.5 * positive,
                            "scar_tp_slices": int(positive), "myocardium_dice_sum": 0.8, "myocardium_slices": 1}
    return out


def _arm(ssim, called_right, collapsed=0):
    """An arm of the report, its utility summarized from per-patient records over three seeds."""
    from engine.evaluation.run import summarize_utility
    from engine.evaluation.stats import PatientScores

    runs = [{"seed": s, "collapsed": i < collapsed, "n_synthetic": 10, "confusion": [1, 0, 0, 1]} for i, s in enumerate((0, 1, 2))]
    scores = PatientScores.from_runs([{"seed": s, "patients": _records(called_right, seed=s)} for s in (0, 1, 2)])
    return ({"realism": {"ssim_crop": {"mean": ssim, "sd": 0.0}},
             "alignment": {"made": 10, "pass_rate": 0.5, "dice_tp": 0.7, "dice": np.zeros(1)},
             "utility": summarize_utility(runs, scores, 1000, 0)}, scores)


def _report(arms: dict) -> dict:
    from engine.evaluation.run import REAL_ONLY, compare_arms

    real, real_scores = _arm(0.0, (0, 6), collapsed=2)
    result = {"threshold": 0.6, "seeds": [0, 1, 2], "realism_split": "test", "bootstrap": {"resamples": 1000},
              "reference": {"slices": 5, "pass_rate": 0.356, "dice_tp": 0.6}, "real_only": real,
              "methods": {name: arm[0] for name, arm in arms.items()}}
    compare_arms(result, {REAL_ONLY: real_scores, **{name: arm[1] for name, arm in arms.items()}}, 1000, 0)
    return result


def test_verdict_claims_only_what_the_paired_intervals_show():
    # 6 of 10 per class right for real only and paste; lgesynthnet 7 of 10 (3 more right, 2 fewer):
    # a margin of 0.1 in balanced accuracy whose paired interval holds zero, and the better realism
    result = _report({"paste": _arm(0.80, (0, 6)), "lgesynthnet": _arm(0.95, (2, 9))})
    util = result["methods"]["lgesynthnet"]["utility"]
    assert util["vs_real_only"]["balanced_accuracy"]["diff"] == pytest.approx(0.1)
    lo, hi = util["vs_real_only"]["balanced_accuracy"]["ci95"]
    assert lo < 0 < hi
    line = next(x for x in verdict(result) if x.startswith("lgesynthnet:"))
    assert "help not shown" in line and "beating paste not shown" in line and "beats" not in line, line
    assert "LV-crop SSIM 0.950" in line and "not a condition" in line
    assert any("real only: 2 of 3 downstream runs collapsed" in x for x in verdict(result))
    # every test patient called right by lgesynthnet: both intervals exclude zero
    result = _report({"paste": _arm(0.80, (0, 6)), "lgesynthnet": _arm(0.10, (0, 10))})
    line = next(x for x in verdict(result) if x.startswith("lgesynthnet:"))
    assert "helps" in line and "beats the model-free control" in line, line
    # paste alone: its help against real only is judged, nothing against itself
    paste_line = next(x for x in verdict(result) if x.startswith("paste:"))
    assert "help not shown" in paste_line and "vs paste" not in paste_line
    # without a paste control nothing is claimed about what the model adds
    alone = _report({"lgesynthnet": _arm(0.5, (0, 10))})
    assert "no paste control in this report" in next(x for x in verdict(alone) if x.startswith("lgesynthnet:"))


def test_a_better_auroc_with_a_significant_loss_in_balanced_accuracy_does_not_help():
    from engine.evaluation.report import shown_better

    diff = {"balanced_accuracy": {"diff": -0.2, "ci95": [-0.3, -0.1]}, "auroc": {"diff": 0.2, "ci95": [0.1, 0.3]}}
    assert not shown_better(diff)
    assert shown_better({**diff, "balanced_accuracy": {"diff": 0.0, "ci95": [-0.1, 0.1]}})
    assert not shown_better({"balanced_accuracy": {"diff": 0.1, "ci95": [-0.01, 0.2]}})
    # the verdict names the reason: a significant loss, or intervals that all hold zero
    held = {"balanced_accuracy": {"diff": 0.1, "ci95": [-0.01, 0.2]}, "auroc": {"diff": 0.0, "ci95": [-0.1, 0.1]}}
    result = {"methods": {"spade-fc": {"utility": {"vs_real_only": diff, "vs_paste": held}}}, "real_only": {}}
    line = verdict(result)[0]
    assert "help not shown (significantly worse in balanced accuracy)" in line, line
    assert "beating paste not shown (every detection interval holds zero)" in line, line


def test_the_report_json_and_markdown_carry_intervals_and_paired_differences(tmp_path):
    from engine.evaluation.report import markdown
    from engine.evaluation.run import dumps

    import json

    result = _report({"paste": _arm(0.80, (0, 6)), "lgesynthnet": _arm(0.95, (2, 9))})
    data = json.loads(dumps({**result, "seconds": 1}))
    for entry in [data["real_only"], *data["methods"].values()]:
        for key, stat in entry["utility"].items():
            if isinstance(stat, dict) and "mean" in stat:
                assert len(stat["ci95"]) == 2 and stat["ci95"][0] - 1e-9 <= stat["mean"] <= stat["ci95"][1] + 1e-9, key
        assert {"auroc", "myocardium_dice"} <= set(entry["utility"])
    for name, entry in data["methods"].items():
        compared = ["vs_real_only"] + (["vs_paste"] if name != "paste" else [])
        for key in compared:
            for metric in ("balanced_accuracy", "auroc", "dice"):
                assert set(entry["utility"][key][metric]) >= {"diff", "ci95"}, (name, key, metric)
    text = markdown({**result, "seconds": 1})
    assert "| + paste | 10 | 0.600 ± 0.000 [" in text and "## Paired differences" in text and "35.6%" in text
    assert "| lgesynthnet | +0.100 [" in text


def test_evaluation_config_is_validated():
    with pytest.raises(ValueError, match="methods"):
        EvaluationConfig(methods=["spade"])
    with pytest.raises(ValueError, match="seeds"):
        EvaluationConfig(seeds=[1, 1])
    with pytest.raises(ValueError, match="bootstrap_resamples must be >= 1000"):
        EvaluationConfig(bootstrap_resamples=200)


def test_detection_threshold_is_calibrated_on_validation_patients():
    truth = {"a": True, "b": True, "c": False, "d": False}
    assert calibrate_detection({"a": 50, "b": 30, "c": 5, "d": 0}, truth, fallback=10) == 5  # a, b above 5
    # a model that sees scar everywhere: the threshold moves above the negatives' false positives
    assert calibrate_detection({"a": 900, "b": 700, "c": 400, "d": 300}, truth, fallback=10) == 400
    # b is missed at any threshold that keeps c and d negative: ties are broken by the median threshold
    assert calibrate_detection({"a": 90, "b": 0, "c": 0, "d": 0}, truth, fallback=10) == 0
    assert calibrate_detection({"a": 1, "b": 2}, {"a": True, "b": True}, fallback=10) == 10  # one class only


def test_alignment_counts_the_filters_decisions_and_refuses_another_threshold(base, tmp_path):
    cfg = tiny_config(base, tmp_path, ["synthesis.max_candidates=4", "synthesis.method=paste", "synthesis.threshold=0.2"])
    synthesize(cfg, sequential=True, log=QUIET)
    url = cfg.synthesis.store_url(cfg.run_dir)
    import zarr

    group = zarr.open_group(url, mode="r+")
    group["dice"][0] = np.float32(0.2)  # a Dice of exactly the threshold reads back above it as float32
    group["passed"][0] = False
    assert store_alignment(url, 0.2)["kept"] == int(np.asarray(group["passed"][:]).sum())
    with pytest.raises(ValueError, match="filtered at Dice > 0.2, the evaluation asks for 0.5"):
        store_alignment(url, 0.5)
