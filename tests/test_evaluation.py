"""The three-gate evaluation: realism against an identity refill, alignment from a store, the
verdict against the paste control. The whole evaluation, downstream trainings included, runs in
tests/test_stages.py as the last step of `lgesynth demo`."""

import math

import numpy as np
import pytest

from engine.evaluation.gates import (
    EvaluationConfig,
    calibrate_detection,
    mean_sd,
    realism,
    realism_items,
    store_alignment,
)
from engine.evaluation.report import markdown, verdict
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


def _entry(ssim, bacc, sds=(0.01, 0.01, 0.01), collapsed=0):
    runs = [{"seed": s, "collapsed": i < collapsed, "n_synthetic": 10, "confusion": [1, 0, 0, 1]} for i, s in enumerate((0, 1, 2))]
    return {"realism": {"ssim_crop": {"mean": ssim, "sd": 0.0}},
            "alignment": {"made": 10, "pass_rate": 0.5, "dice_tp": 0.7, "dice": np.zeros(1)},
            "utility": {"balanced_accuracy": {"mean": bacc, "sd": sds[0]}, "dice": mean_sd([0.5]), "dice_tp": mean_sd([0.5]),
                        "accuracy": mean_sd([bacc]), "collapsed": collapsed, "runs": runs}}


def test_verdict_against_the_paste_control():
    result = {"threshold": 0.6, "seeds": [0, 1, 2], "realism_split": "test",
              "reference": {"slices": 5, "pass_rate": 0.356, "dice_tp": 0.6},
              "real_only": _entry(0, 0.6, collapsed=2),
              "methods": {"paste": _entry(0.80, 0.70), "lgesynthnet": _entry(0.60, 0.90)}}
    lines = verdict(result)
    assert any(line.startswith("lgesynthnet:") and "does not beat paste" in line and "has shown nothing" in line
               for line in lines), lines
    assert any("real only: 2 of 3 downstream runs collapsed" in line for line in lines), lines
    result["methods"]["lgesynthnet"] = _entry(0.85, 0.705, sds=(0.05,))
    line = next(x for x in verdict(result) if x.startswith("lgesynthnet:"))
    assert "within one SD" in line and "beats the model-free control on both gates" in line
    text = markdown({**result, "seconds": 1})
    assert "| + paste | 10 |" in text and "| real only |" in text and "35.6%" in text


def test_evaluation_config_is_validated():
    with pytest.raises(ValueError, match="methods"):
        EvaluationConfig(methods=["spade"])
    with pytest.raises(ValueError, match="seeds"):
        EvaluationConfig(seeds=[1, 1])


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
