"""Failure-targeted synthesis: the scar sampler's weights, where a downstream model misses scar (per
AHA segment and transmurality class), the reweighting and the bull's-eye. The whole loop on Ray runs
in tests/test_stages.py on the trained tiny run."""

import numpy as np
import pytest
import torch

from engine.anatomy import aha_segments
from engine.anatomy.masks import ScarSamplerConfig, sample_scar
from engine.evaluation.loop import CLASSES, SEGMENTS, LoopConfig, miss_counts, reweight, territory_weights, weights_figure
from engine.training.data import SliceArrays

SIZE, CENTRE, R_IN, R_OUT = 64, 32.0, 10.0, 20.0


def ring():
    rows, cols = np.mgrid[:SIZE, :SIZE]
    r = np.hypot(rows - CENTRE, cols - CENTRE)
    label = np.zeros((SIZE, SIZE), np.uint8)
    label[r <= R_OUT] = 2
    label[r < R_IN] = 1
    angle = np.degrees(np.arctan2(-(rows - CENTRE), cols - CENTRE)) % 360  # "up" is decreasing row index
    return label, angle, r


def test_segment_and_transmurality_weights_steer_the_draws():
    label, _, _ = ring()
    ischemic_lad = {"pattern_weights": {"ischemic": 1.0}, "territory_weights": {"LAD": 1.0}}
    plain = ScarSamplerConfig(**ischemic_lad)
    steered = ScarSamplerConfig(**ischemic_lad, segment_weights={"8": 50.0}, transmurality_weights={"76-100%": 1.0, "1-25%": 0.0,
                                                                                                     "26-50%": 0.0, "51-75%": 0.0})
    plain_segments = [sample_scar(label, "mid", np.random.default_rng(s), plain)[1].segment for s in range(60)]
    specs = [sample_scar(label, "mid", np.random.default_rng(s), steered)[1] for s in range(60)]
    assert set(plain_segments) == {7, 8} and plain_segments.count(8) < 45  # LAD at mid level: 7 and 8, evenly
    assert sum(spec.segment == 8 for spec in specs) >= 55
    assert all(0.75 <= spec.transmurality <= 1.0 for spec in specs)
    # a class outside the pattern's range cannot be drawn: non-ischemic scar stays in 0.2-0.5
    midwall = ScarSamplerConfig(pattern_weights={"midwall": 1.0}, transmurality_weights={"76-100%": 10.0})
    assert all(0.2 <= sample_scar(label, "mid", np.random.default_rng(s), midwall)[1].transmurality <= 0.5
               for s in range(20))
    with pytest.raises(ValueError, match="segment_weights: unknown keys"):
        ScarSamplerConfig(segment_weights={"17": 1.0})
    with pytest.raises(ValueError, match="transmurality_weights: unknown keys"):
        ScarSamplerConfig(transmurality_weights={"0%": 1.0})


class _FixedPrediction(torch.nn.Module):
    """A 'downstream model' predicting a fixed scar mask per slice (the slice index is the image value)."""

    def __init__(self, scar: np.ndarray):
        super().__init__()
        self.scar = torch.as_tensor(scar)

    def forward(self, x):
        index = x[:, 0, 0, 0].round().long()
        logits = torch.where(self.scar[index], 10.0, -10.0).float()
        return torch.stack([logits, logits], 1)


def test_misses_are_counted_per_segment_and_transmurality_class():
    label, angle, r = ring()
    scar = label.copy()
    in_7 = (label == 2) & (angle >= 70) & (angle < 110)  # mid anterior, transmural
    in_10 = (label == 2) & (angle >= 250) & (angle < 290) & (r <= 12.5)  # mid inferior, thin subendocardial
    scar[in_7 | in_10] = 3
    labels = np.stack([scar, label])  # a positive and a negative slice
    arrays = SliceArrays(image=np.stack([np.full((1, SIZE, SIZE), i, np.float32) for i in range(2)]), label=labels,
                         level=["mid", "mid"], source=["p/0", "p/1"], patient_id=["p", "p"], caption=["", ""],
                         positive=[True, False], pixel_area_mm2=[1.0, 1.0])
    model = _FixedPrediction(np.stack([in_7, np.zeros_like(in_7)]))  # finds the segment-7 scar, misses segment 10
    counts = miss_counts([model, model], arrays)
    n7, n10 = int(in_7.sum()), int(in_10.sum())
    assert counts["segment"] == {"7": [0, 2 * n7], "10": [2 * n10, 2 * n10]}  # two models pooled
    assert counts["transmurality"] == {"76-100%": [0, 2 * n7], "26-50%": [2 * n10, 2 * n10]}
    assert set(np.unique(aha_segments(scar, "mid")[scar == 3])) == {7, 10}


def test_reweighting_moves_weight_to_what_is_missed_and_keeps_a_floor():
    counts = {"7": [0, 100], "10": [100, 100]}
    new = reweight({}, counts, SEGMENTS, strength=1.0, floor=0.2)
    assert new["10"] > 1.0 > new["7"] >= 0.2 * 1.0 - 1e-9  # the floor: 20% of the uniform weight
    assert np.isclose(np.mean(list(new.values())), 1.0)
    unseen = [new[k] for k in SEGMENTS if k not in counts]
    assert np.allclose(unseen, unseen[0]) and np.isclose(unseen[0], 1.0)  # no evidence: unchanged
    again = reweight(new, counts, SEGMENTS, strength=1.0, floor=0.2)
    assert again["10"] > new["10"]  # a second round pushes further
    assert reweight({}, counts, SEGMENTS, strength=0.0, floor=0.2) == dict.fromkeys(SEGMENTS, 1.0)
    assert reweight({}, {}, CLASSES, strength=1.0, floor=0.2) == dict.fromkeys(CLASSES, 1.0)
    lad_heavy = territory_weights({"LAD": 0.4, "RCA": 0.3, "LCx": 0.3}, {"1": 3.0, "7": 3.0, "13": 3.0})
    assert lad_heavy["LAD"] > 0.4 and lad_heavy["RCA"] == pytest.approx(0.3)
    # the mean is over the reweighted segments 1-16 only: the apex (17, in LAD) is never drawn
    doubled = territory_weights({"LAD": 0.4, "RCA": 0.3}, {s: 2.0 for s in ("1", "2", "7", "8", "13", "14")})
    assert doubled == pytest.approx({"LAD": 0.8, "RCA": 0.3})


def test_loop_config_and_bullseye(tmp_path):
    with pytest.raises(ValueError, match="rounds must be >= 2"):
        LoopConfig(rounds=1)
    with pytest.raises(ValueError, match="floor must be in"):
        LoopConfig(floor=1.0)
    path = tmp_path / "weights.png"
    weights_figure([{"round": 0, "weights": {}}, {"round": 1, "weights": {"segment": {"10": 2.5, "7": 0.3}}}],
                   {"segment": {"10": 3.0}}, path)
    assert path.stat().st_size > 5_000


def test_the_loop_verdict_rests_on_the_paired_interval():
    from engine.evaluation.loop import loop_verdict

    inside = {"targeted_vs_uniform": {"balanced_accuracy": {"diff": 0.08, "ci95": [-0.02, 0.18]},
                                      "auroc": {"diff": 0.05, "ci95": [-0.03, 0.12]}}}
    assert "no difference shown" in loop_verdict(inside) and "+0.080 [-0.020, +0.180]" in loop_verdict(inside)
    better = {"targeted_vs_uniform": {**inside["targeted_vs_uniform"], "auroc": {"diff": 0.1, "ci95": [0.02, 0.2]}}}
    assert "targeting helps here" in loop_verdict(better)
    worse = {"targeted_vs_uniform": {"balanced_accuracy": {"diff": -0.2, "ci95": [-0.3, -0.1]},
                                     "auroc": {"diff": -0.02, "ci95": [-0.1, 0.05]}}}
    assert "uniform is better here" in loop_verdict(worse)
