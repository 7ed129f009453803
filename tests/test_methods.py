"""Synthesis methods in one harness: the paste control fills exactly the scar mask with a level
measured on the slice's blood pool, and runs through the same plan, filter and store as the
generator (sequential path; the Ray path takes the same actor class)."""

from pathlib import Path

import numpy as np
import pytest
import zarr

from engine.anatomy.labels import CAVITY, MYOCARDIUM
from engine.synthesis.check import check_store
from engine.synthesis.methods import PasteActor, PasteConfig, method_actor, paste
from engine.synthesis.pipeline import synthesize
from engine.synthesis.plan import build_shard_inputs, make_plan
from engine.training.prepare import prepare_arrays
from tests.synth_helpers import make_tiny_run, tiny_config

QUIET = lambda _: None  # noqa: E731


def _slice(size=64, blood=0.5, blood_sd=0.05, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    label = np.where(r < 10, CAVITY, np.where(r < 16, MYOCARDIUM, 0)).astype(np.uint8)
    image01 = np.where(label == CAVITY, blood + blood_sd * rng.standard_normal(label.shape),
                       np.where(label == MYOCARDIUM, 0.1, 0.3)).clip(0, 1)
    scar = (label == MYOCARDIUM) & (xx > size / 2)
    return (image01 * 2 - 1).astype(np.float32), scar, label


def test_paste_fills_only_the_scar_at_the_blood_pool_level():
    image, scar, label = _slice()
    cfg = PasteConfig(blood_ratio=1.2, noise=1.0, smooth_px=0.0)
    out = paste(image, scar, label, noise_seed=7, cfg=cfg)
    assert np.array_equal(out[~scar], image[~scar])  # nothing outside the mask moves
    blood = (image[label == CAVITY] + 1) / 2
    filled = (out[scar] + 1) / 2
    assert abs(filled.mean() - 1.2 * np.median(blood)) < 0.02
    assert abs(filled.std() - blood.std()) < 0.3 * blood.std()  # the blood pool's own spread
    assert np.array_equal(out, paste(image, scar, label, 7, cfg))  # the noise seed decides
    assert not np.array_equal(out, paste(image, scar, label, 8, cfg))
    flat = paste(image, scar, label, 7, PasteConfig(blood_ratio=1.2, noise=0.0))
    assert np.allclose((flat[scar] + 1) / 2, 1.2 * np.median(blood), atol=1e-6)


def test_paste_refuses_a_slice_without_blood_pool_and_bad_settings():
    image, scar, label = _slice()
    with pytest.raises(ValueError, match="no blood pool"):
        paste(image, scar, np.where(label == CAVITY, 0, label), 0, PasteConfig())
    with pytest.raises(ValueError, match="blood_ratio"):
        PasteConfig(blood_ratio=0)
    with pytest.raises(ValueError, match="unknown synthesis method 'spade'"):
        method_actor("spade")
    assert method_actor("paste") is PasteActor


def test_paste_and_generator_stores_share_the_plan_and_the_filter(tmp_path_factory):
    base = make_tiny_run(tmp_path_factory.mktemp("methods"))
    runs = {}
    for method in ("lgesynthnet", "paste"):
        cfg = tiny_config(base, tmp_path_factory.mktemp(method), [f"synthesis.method={method}", "synthesis.threshold=-1.0",
                                                                   "synthesis.max_candidates=8"])
        summary = synthesize(cfg, sequential=True, log=QUIET)
        assert summary["method"] == method and summary["written"] == 8
        url = cfg.synthesis.store_url(cfg.run_dir)
        assert check_store(url)[1] == []
        runs[method] = (cfg, zarr.open_group(url, mode="r"))
    (cfg, gen), (_, pas) = runs["lgesynthnet"], runs["paste"]
    for name in ("sample_id", "source", "caption", "condition", "seed"):  # same candidates, same conditions
        assert np.array_equal(gen[name][:], pas[name][:]), name
    attrs = pas.attrs["lgesynth"]["content"]
    assert set(attrs["checkpoints"]) == {"reward"} and attrs["synthesis"]["method"] == "paste" and "paste" in attrs
    parts = prepare_arrays(cfg)[0]
    plan = make_plan(parts["train"], 2, seed=0, max_candidates=8)
    inputs = build_shard_inputs(plan.slices, plan.jobs[:4], 0, cfg.scar_sampler, cfg.data, cfg.cohort.reference_angle)
    source, scar = (inputs["image"][:, 0] + 1) / 2, inputs["scar"][:, 0] > 0
    assert np.allclose(pas["image"][:4][~scar], source[~scar], atol=1e-6)  # only the scar is pasted
    assert not np.allclose(pas["image"][:4][scar], source[scar], atol=1e-3)
    # the same run dir and store under another method is refused, not mixed
    other = tiny_config(base, Path(cfg.run_dir), ["synthesis.method=paste", "synthesis.threshold=-1.0",
                                                  "synthesis.max_candidates=8"])
    with pytest.raises(ValueError, match="synthesis.method: None -> 'paste'"):
        synthesize(other, sequential=True, log=QUIET)
