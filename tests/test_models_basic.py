"""Reward model, VAE and downstream model: shapes, gradients, configs, safetensors round trips, learning.

Tables of ``[config kwargs, input shape, expected output shape]`` cases (MONAI style), tiny models.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_model, save_model

from engine.config import from_dict
from engine.models.downstream import DownstreamModelConfig, build_downstream_model, downstream_loss_fn, predict
from engine.models.reward import (RewardModelConfig, build_reward_model, predict_scar, reward_loss_fn,
                                  targets_from_label)
from engine.models.vae import VAEConfig, build_vae, decode_latents, encode_latents, measure_scaling_factor, vae_loss

TINY_REWARD = {"channels": (8, 16, 32), "strides": (2, 2), "num_res_units": 1}
TINY_VAE = {"block_out_channels": (16, 32), "norm_num_groups": 8}
TINY_DOWNSTREAM = {"init_features": 8, "growth_rate": 4, "block_config": (2, 2, 2, 2),
                   "decoder_channels": (32, 16, 16, 8, 8)}


@pytest.fixture(autouse=True)
def _seeded_single_thread():
    # One intra-op thread: on two shared cores, two OpenMP threads that wait on each other while other
    # processes hold a core made a 20-step loop 40x slower (28 s instead of 0.7 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _labels(batch: int, size: int) -> torch.Tensor:
    """A ring of myocardium (2) around a cavity (1) with a scar wedge (3) and an MVO core (4)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = (size - 1) / 2
    r = torch.hypot(yy - c, xx - c)
    angle = torch.atan2(yy - c, xx - c)
    label = torch.zeros(size, size, dtype=torch.long)
    label[r < 0.3 * size] = 1
    ring = (r >= 0.15 * size) & (r < 0.3 * size)
    label[r < 0.15 * size] = 1
    label[ring] = 2
    label[ring & (angle.abs() < 0.5)] = 3
    label[ring & (angle.abs() < 0.1)] = 4
    return label.expand(batch, size, size).clone()


# ---------------------------------------------------------------- forward shapes

@pytest.mark.parametrize("kwargs, input_shape, expected_shape", [
    (TINY_REWARD, (2, 1, 64, 64), (2, 2, 64, 64)),
    ({**TINY_REWARD, "outputs": "scar"}, (2, 1, 64, 64), (2, 1, 64, 64)),
    ({**TINY_REWARD, "norm": "batch", "dropout": 0.1}, (3, 1, 32, 48), (3, 2, 32, 48)),
])
def test_reward_model_forward_shape(kwargs, input_shape, expected_shape):
    model = build_reward_model(RewardModelConfig(**kwargs))
    assert model(torch.randn(input_shape)).shape == expected_shape


@pytest.mark.parametrize("kwargs, input_shape, expected_latent_shape", [
    (TINY_VAE, (2, 1, 64, 64), (2, 4, 32, 32)),
    ({**TINY_VAE, "block_out_channels": (8, 16, 16), "latent_channels": 3}, (1, 1, 96, 64), (1, 3, 24, 16)),
    ({**TINY_VAE, "block_out_channels": (16,)}, (2, 1, 24, 24), (2, 4, 24, 24)),
])
def test_vae_round_trip_shapes(kwargs, input_shape, expected_latent_shape):
    config = VAEConfig(**kwargs)
    vae = build_vae(config)
    images = torch.rand(input_shape) * 2 - 1
    latents = encode_latents(vae, images, config.scaling_factor)
    assert latents.shape == expected_latent_shape
    assert input_shape[-1] // latents.shape[-1] == config.downsampling_factor == 2 ** (len(config.block_out_channels) - 1)
    assert decode_latents(vae, latents, config.scaling_factor).shape == input_shape


@pytest.mark.parametrize("kwargs, input_shape, expected_shape", [
    (TINY_DOWNSTREAM, (2, 1, 64, 64), (2, 2, 64, 64)),
    ({**TINY_DOWNSTREAM, "norm": "instance", "dropout": 0.1}, (1, 1, 32, 96), (1, 2, 32, 96)),
    ({}, (1, 1, 64, 64), (1, 2, 64, 64)),  # the real DenseNet121 encoder, once
    ({**TINY_DOWNSTREAM, "stem_stride": 1, "full_resolution_channels": 0}, (2, 1, 48, 32), (2, 2, 48, 32)),
    ({**TINY_DOWNSTREAM, "stem_stride": 1}, (1, 1, 32, 32), (1, 2, 32, 32)),
])
def test_downstream_forward_shape(kwargs, input_shape, expected_shape):
    model = build_downstream_model(DownstreamModelConfig(**kwargs))
    assert model(torch.randn(input_shape)).shape == expected_shape


@pytest.mark.parametrize("stem_stride, strides", [(2, [1, 2, 4, 8, 16, 32]), (1, [1, 1, 2, 4, 8, 16])])
def test_downstream_stem_stride_sets_the_encoder_resolution(stem_stride, strides):
    model = build_downstream_model(DownstreamModelConfig(**TINY_DOWNSTREAM, stem_stride=stem_stride))
    features = model.encode(torch.randn(1, 1, 64, 64))
    assert [64 // f.shape[-1] for f in features] == strides
    if stem_stride == 1:  # the decoder drops its coarsest stage; the stem's map is fused at full resolution
        assert len(model.decoder.blocks) == 4
        assert model.fuse.conv.in_channels == (TINY_DOWNSTREAM["decoder_channels"][-1] + TINY_DOWNSTREAM["init_features"]
                                               + DownstreamModelConfig().full_resolution_channels)


@pytest.mark.parametrize("build, bad_shape, message", [
    (lambda: build_reward_model(RewardModelConfig(**TINY_REWARD)), (1, 1, 30, 32), "multiples of 4"),
    (lambda: build_reward_model(RewardModelConfig(**TINY_REWARD)), (1, 2, 32, 32), "[B, 1, H, W]"),
    (lambda: build_downstream_model(DownstreamModelConfig(**TINY_DOWNSTREAM)), (1, 1, 48, 64), "multiples of 32"),
    (lambda: build_downstream_model(DownstreamModelConfig(**TINY_DOWNSTREAM, stem_stride=1)), (1, 1, 40, 64),
     "multiples of 16"),
])
def test_bad_input_shape_is_named(build, bad_shape, message):
    with pytest.raises(ValueError, match=r"got shape \(1, \d, \d+, \d+\)") as info:
        build()(torch.zeros(bad_shape))
    assert message in str(info.value)


def test_vae_rejects_bad_shapes():
    vae = build_vae(VAEConfig(**TINY_VAE))
    with pytest.raises(ValueError, match=r"VAE: image height and width must be multiples of 2, got shape \(1, 1, 33, 32\)"):
        encode_latents(vae, torch.zeros(1, 1, 33, 32))
    with pytest.raises(ValueError, match=r"latents \[B, 4, h, w\], got shape \(1, 3, 8, 8\)"):
        decode_latents(vae, torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------- gradients

def _assert_all_grads_finite_nonzero(model: torch.nn.Module):
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        assert param.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}: zero gradient"


@pytest.mark.parametrize("kwargs", [TINY_REWARD, {**TINY_REWARD, "norm": "batch", "loss": "dice_ce"}])
def test_reward_model_backward(kwargs):
    config = RewardModelConfig(**kwargs)
    model = build_reward_model(config)
    loss = reward_loss_fn(config)(model(torch.randn(2, 1, 32, 32)), targets_from_label(_labels(2, 32), config.outputs))
    loss.backward()
    assert torch.isfinite(loss)
    _assert_all_grads_finite_nonzero(model)


def test_vae_backward_and_loss_parts():
    vae = build_vae(VAEConfig(**TINY_VAE))
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    loss, parts = vae_loss(vae, images, kl_weight=1e-6, mse_weight=0.5)
    loss.backward()
    assert set(parts) == {"l1", "mse", "kl", "loss"}
    assert parts["kl"] > 0
    expected = parts["l1"] + 0.5 * parts["mse"] + 1e-6 * parts["kl"] / (32 * 32)
    assert torch.allclose(parts["loss"], expected)
    _assert_all_grads_finite_nonzero(vae)


def test_measured_scaling_factor_gives_unit_variance_latents():
    vae = build_vae(VAEConfig(**TINY_VAE)).eval()
    images = torch.rand(40, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    factor = measure_scaling_factor(vae, images, batch_size=16)  # batches must not change the figure
    assert factor == pytest.approx(1.0 / float(encode_latents(vae, images, 1.0).std()), rel=1e-4)
    assert float(encode_latents(vae, images, factor).std()) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="at least one image"):
        measure_scaling_factor(vae, images[:0])


def test_vae_decode_is_differentiable_wrt_latents():
    vae = build_vae(VAEConfig(**TINY_VAE)).requires_grad_(False)  # frozen, as in the generator's reward loss
    latents = torch.randn(2, 4, 16, 16, requires_grad=True)
    decode_latents(vae, latents, 0.5).square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0 and torch.isfinite(latents.grad).all()
    images = torch.rand(1, 1, 32, 32, requires_grad=True)
    encode_latents(vae, images, 0.5).sum().backward()
    assert images.grad.abs().sum() > 0


def test_downstream_backward():
    config = DownstreamModelConfig(**TINY_DOWNSTREAM)
    model = build_downstream_model(config)
    loss = downstream_loss_fn(config)(model(torch.randn(2, 1, 32, 32)), targets_from_label(_labels(2, 32)))
    loss.backward()
    _assert_all_grads_finite_nonzero(model)


# ---------------------------------------------------------------- targets and predictions

@pytest.mark.parametrize("outputs, expected", [
    ("scar", [[0, 0, 0, 1, 1]]),
    ("scar+myocardium", [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]),
])
def test_targets_from_label(outputs, expected):
    label = torch.tensor([[[0, 1, 2, 3, 4]]])
    targets = targets_from_label(label, outputs)
    assert targets.dtype == torch.float32 and targets.shape == (1, len(expected), 1, 5)
    assert targets[0, :, 0].tolist() == expected


@pytest.mark.parametrize("label, message", [
    (torch.tensor([[[0, 5]]]), "0..4"),
    (torch.tensor([[[0.0, 3.0]]]), "integer tensor"),
    (torch.zeros(1, 1, 2, 2, dtype=torch.long), r"\[B, H, W\]"),
])
def test_targets_from_label_rejects_bad_labels(label, message):
    with pytest.raises(ValueError, match=message):
        targets_from_label(label)


def test_predict_helpers_shapes():
    reward_model = build_reward_model(RewardModelConfig(**TINY_REWARD)).eval()
    prob, mask = predict_scar(reward_model, torch.randn(2, 1, 32, 32))
    assert prob.shape == mask.shape == (2, 1, 32, 32) and mask.dtype == torch.bool
    assert 0 <= prob.min() and prob.max() <= 1 and torch.equal(mask, prob > 0.5)
    model = build_downstream_model(DownstreamModelConfig(**TINY_DOWNSTREAM)).eval()
    out = predict(model, torch.randn(2, 1, 32, 32), threshold=0.3)
    assert out["scar"].shape == out["myocardium"].shape == out["scar_prob"].shape == (2, 32, 32)
    assert out["scar"].dtype == torch.bool and torch.equal(out["scar"], out["scar_prob"] > 0.3)
    with pytest.raises(ValueError, match="threshold"):
        predict_scar(reward_model, torch.randn(1, 1, 32, 32), threshold=1.0)


# ---------------------------------------------------------------- configs and checkpoints

@pytest.mark.parametrize("cls, kwargs", [
    (RewardModelConfig, TINY_REWARD), (VAEConfig, TINY_VAE), (DownstreamModelConfig, TINY_DOWNSTREAM)])
def test_config_json_round_trip(cls, kwargs):
    config = cls(**kwargs)
    data = json.loads(json.dumps(config.to_dict()))
    assert cls.from_dict(data) == config
    assert from_dict(cls, data) == config


@pytest.mark.parametrize("cls, kwargs, field", [
    (RewardModelConfig, {"channels": (8,)}, "channels"),
    (RewardModelConfig, {"channels": (8, 16), "strides": (2, 2)}, "strides"),
    (RewardModelConfig, {"num_res_units": -1}, "num_res_units"),
    (RewardModelConfig, {"dropout": 1.0}, "dropout"),
    (RewardModelConfig, {"norm": "group"}, "norm"),
    (RewardModelConfig, {"outputs": "myocardium"}, "outputs"),
    (RewardModelConfig, {"loss": "bce"}, "loss"),
    (VAEConfig, {"block_out_channels": ()}, "block_out_channels"),
    (VAEConfig, {"latent_channels": 0}, "latent_channels"),
    (VAEConfig, {"layers_per_block": 0}, "layers_per_block"),
    (VAEConfig, {"norm_num_groups": 12}, "norm_num_groups"),
    (VAEConfig, {"scaling_factor": 0.0}, "scaling_factor"),
    (DownstreamModelConfig, {"backbone": "resnet18"}, "backbone"),
    (DownstreamModelConfig, {"growth_rate": 0}, "growth_rate"),
    (DownstreamModelConfig, {"block_config": (2, 2, 2)}, "block_config"),
    (DownstreamModelConfig, {"decoder_channels": (16, 8)}, "decoder_channels"),
    (DownstreamModelConfig, {"dropout": -0.1}, "dropout"),
    (DownstreamModelConfig, {"stem_stride": 4}, "stem_stride"),
])
def test_bad_config_value_names_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=field):  # the same check through the YAML path
        cls.from_dict(data)


@pytest.mark.parametrize("build, input_shape", [
    (lambda: build_reward_model(RewardModelConfig(**{**TINY_REWARD, "norm": "batch"})), (2, 1, 32, 32)),
    (lambda: build_vae(VAEConfig(**TINY_VAE)), (2, 1, 32, 32)),
    (lambda: build_downstream_model(DownstreamModelConfig(**TINY_DOWNSTREAM)), (2, 1, 32, 32)),
])
def test_safetensors_round_trip(build, input_shape, tmp_path):
    trained = build()
    trained.train()
    trained(torch.randn(input_shape))  # move batch-norm running statistics away from their init
    trained.eval()
    path = tmp_path / "model.safetensors"
    save_model(trained, str(path))
    torch.manual_seed(1)
    restored = build().eval()
    missing, unexpected = load_model(restored, str(path))
    assert not missing and not unexpected
    images = torch.randn(input_shape)
    with torch.no_grad():
        if hasattr(trained, "encode") and hasattr(trained, "decode"):  # the VAE: compare deterministic round trips
            a, b = (decode_latents(m, encode_latents(m, images)) for m in (trained, restored))
        else:
            a, b = trained(images), restored(images)
    assert torch.equal(a, b)
    assert all(isinstance(v, torch.Tensor) for v in trained.state_dict().values())


# ---------------------------------------------------------------- learning sanity

def _ring_dataset(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """LGE-like rings: bright cavity, dark myocardium, a bright scar wedge at a random angle, noise."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    images, labels = [], []
    for _ in range(n):
        cy, cx = (size / 2 + torch.randint(-4, 5, (2,), generator=generator)).tolist()
        inner = 8 + 3 * torch.rand(1, generator=generator).item()
        outer = inner + 5 + 2 * torch.rand(1, generator=generator).item()
        r = torch.hypot(yy - cy, xx - cx)
        theta = torch.atan2(yy - cy, xx - cx)
        centre = (torch.rand(1, generator=generator).item() * 2 - 1) * math.pi
        wedge = torch.remainder(theta - centre + math.pi, 2 * math.pi) - math.pi
        label = torch.zeros(size, size, dtype=torch.long)
        label[r < inner] = 1
        ring = (r >= inner) & (r < outer)
        label[ring] = 2
        label[ring & (wedge.abs() < 0.6)] = 3
        image = torch.full((size, size), -0.3)
        image[label == 1] = 0.4
        image[label == 2] = -0.8
        image[label == 3] = 0.8
        images.append(image + 0.1 * torch.randn(size, size, generator=generator))
        labels.append(label)
    return torch.stack(images)[:, None], torch.stack(labels)


def test_reward_model_learns_scar_on_synthetic_rings():
    generator = torch.Generator().manual_seed(0)
    images, labels = _ring_dataset(16, 64, generator)
    # Batch norm learns this toy set fastest (scar Dice 0.71-0.95 after 60 steps over six seeds;
    # instance norm 0.5-0.8 over four), so the check has a wide margin.
    config = RewardModelConfig(**TINY_REWARD, norm="batch")
    model = build_reward_model(config)
    loss_fn = reward_loss_fn(config)
    targets = targets_from_label(labels, config.outputs)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        loss = loss_fn(model(images), targets)
        loss.backward()
        optimizer.step()
    _, mask = predict_scar(model.eval(), images)
    truth = targets[:, :1].bool()
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.5, f"scar Dice after 60 steps: {dice:.3f}"


def test_validation_reads_read_only_arrays_without_warnings():
    """Validation and the downstream detection read arrays that may be read-only views of Ray's
    object store: copied per batch, so torch does not warn (once per process, in every trial's log)."""
    import warnings

    import numpy as np

    from engine.training.data import SliceArrays
    from engine.training.downstream import patient_scores, predict_masks
    from engine.training.segmentation import scar_validation

    label = _labels(4, 32).numpy().astype(np.uint8)
    image = (label[:, None] / 4.0).astype(np.float32)
    image.setflags(write=False)
    label.setflags(write=False)
    reward = build_reward_model(RewardModelConfig(**TINY_REWARD))
    downstream = build_downstream_model(DownstreamModelConfig(**TINY_DOWNSTREAM))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = scar_validation(reward, image, label, "-1,1", "cpu", batch_size=2)
        arrays = SliceArrays(image=image, label=label, level=["mid"] * 4, source=["a/1", "a/2", "b/1", "b/2"],
                             patient_id=["a", "a", "b", "b"], caption=[""] * 4, positive=np.ones(4, bool),
                             pixel_area_mm2=np.ones(4, np.float32))
        areas = patient_scores(predict_masks(downstream, arrays, "cpu", batch_size=2), arrays)
    assert metrics["val_slices"] == 4 and sorted(areas) == ["a", "b"]


def test_best_so_far_keeps_the_best_epoch_and_survives_a_checkpoint(tmp_path):
    """Scores 0.2, 0.5, 0.4, 0.5, NaN: the weights of epoch 4 (a tie goes to the later epoch) are
    kept; the kept weights and score come back from a saved checkpoint."""
    import torch

    from engine.training.checkpoint import load_checkpoint, save_checkpoint
    from engine.training.segmentation import BestSoFar

    model = torch.nn.Linear(2, 1)
    best = BestSoFar(model)
    kept = {}
    for epoch, score in enumerate([0.2, 0.5, 0.4, 0.5, float("nan")], 1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        if best.offer(model, score):
            kept[epoch] = score
    assert list(kept) == [1, 2, 4] and int(best.epoch) == 4 and float(best.score) == 0.5
    assert torch.equal(best.model.weight, torch.full((1, 2), 4.0)) and not best.model.weight.requires_grad
    save_checkpoint(tmp_path / "c", models={"best": best}, state={"step": 1})
    again = BestSoFar(torch.nn.Linear(2, 1))
    load_checkpoint(tmp_path / "c", models={"best": again})
    assert int(again.epoch) == 4 and int(again.validations) == 5 and float(again.score) == 0.5
    assert torch.equal(again.model.weight, best.model.weight)
