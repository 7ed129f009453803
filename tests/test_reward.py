"""The reward model's training recipe: the learning-rate schedule and the logit head."""

from __future__ import annotations

import math

import pytest
import torch

from engine.models.reward import RewardModelConfig, build_reward_model
from engine.training.loop import WARMUP_FRACTION, TrainLoopConfig, learning_rate


@pytest.mark.parametrize("schedule, step, total, expected", [
    ("constant", 0, 100, 1e-3),
    ("constant", 99, 100, 1e-3),
    ("cosine", 0, 100, 1e-3 / round(WARMUP_FRACTION * 100)),   # warm-up starts small
    ("cosine", round(WARMUP_FRACTION * 100) - 1, 100, 1e-3),    # and reaches lr at its end
    ("cosine", 99, 100, 0.0),                                   # cosine decay ends at 0
    ("cosine", 500, 100, 0.0),                                  # past the end: stays at 0
    ("cosine", 0, 1, 1e-3),                                     # one step: warm-up of one step
])
def test_learning_rate_schedule(schedule, step, total, expected):
    loop = TrainLoopConfig(lr=1e-3, schedule=schedule)
    assert learning_rate(loop, step, total) == pytest.approx(expected, abs=1e-12)


def test_cosine_schedule_decreases_after_warmup():
    loop = TrainLoopConfig(lr=3e-3, schedule="cosine")
    warmup = round(WARMUP_FRACTION * 200)
    rates = [learning_rate(loop, s, 200) for s in range(warmup - 1, 200)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert rates[len(rates) // 2] == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=0.05)


def test_unknown_schedule_is_a_loud_error():
    with pytest.raises(ValueError, match="schedule"):
        TrainLoopConfig(schedule="step")


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_reward_logits_come_from_a_plain_1x1_head(norm):
    # The logits must not pass through a norm layer (MONAI UNet's own top layer would normalize them):
    # a bias on the head shifts every logit by exactly that amount.
    config = RewardModelConfig(channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm=norm)
    model = build_reward_model(config).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        before = model(x)
        model.head.bias += torch.tensor([5.0, -2.0])
        after = model(x)
    assert torch.allclose(after - before, torch.tensor([5.0, -2.0]).view(1, 2, 1, 1).expand_as(before), atol=1e-5)
