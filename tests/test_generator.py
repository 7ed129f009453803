"""LGESynthNet generator: text encoder, inpainting UNet, ControlNet, training loss and sampling.

Tiny models on 32 px images (latents 16 px) so every test runs in seconds on two CPU cores; the
text encoder is the tiny random BERT except in one test that loads the packaged MiniLM offline.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.anatomy.captions import CONSTANT_CAPTION
from engine.anatomy.masks import edge_map
from engine.models.controlnet import ControlNetConfig, build_controlnet, conditioning_image
from engine.models.generator import COMPONENTS, GeneratorConfig, LGESynthNet, inpaint_mask, soft_dice_loss
from engine.models.inpaint_unet import InpaintUNetConfig, build_inpaint_unet
from engine.models.reward import RewardModelConfig, build_reward_model
from engine.models.text_encoder import TextEncoder, TextEncoderConfig
from engine.models.vae import VAEConfig

SIZE = 32
CAPTIONS = [
    "LGE short-axis, mid slice. Enhancement in mid inferior segment, subendocardial, 26-50% transmural.",
    "LGE short-axis, basal slice. Enhancement in basal anterior segment, transmural, 76-100% transmural.",
]


def tiny_config(**overrides) -> GeneratorConfig:
    cfg = GeneratorConfig(
        text_encoder=TextEncoderConfig(kind="tiny-random", tiny_hidden_size=32, max_length=32),
        unet=InpaintUNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=16,
                               cross_attention_dim=32, norm_num_groups=8),
        controlnet=ControlNetConfig(conditioning_embedding_out_channels=(16, 32)),
        vae=VAEConfig(block_out_channels=(16, 32), norm_num_groups=8),
        num_inference_steps=3,
        mask_dilation=1,
    )
    return dataclasses.replace(cfg, **overrides)


def tiny_reward_model():
    return build_reward_model(RewardModelConfig(channels=(8, 16), strides=(2,), num_res_units=0, outputs="scar"))


def make_inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 1, SIZE, SIZE, generator=g) * 2 - 1
    scar = torch.zeros(batch, 1, SIZE, SIZE)
    scar[0, :, 10:16, 8:20] = 1
    scar[1:, :, 18:24, 12:22] = 1
    return image, scar, [CAPTIONS[i % 2] for i in range(batch)]


def make_batch(model: LGESynthNet, batch: int = 2, seed: int = 0):
    return model.make_batch(*make_inputs(batch, seed))


def randomize_zero_convs(model: LGESynthNet, seed: int = 1) -> None:
    """Give the ControlNet's zero-initialised outputs weights, so it actually steers the UNet."""
    g = torch.Generator().manual_seed(seed)
    cn = model.controlnet
    with torch.no_grad():
        for module in [cn.controlnet_cond_embedding.conv_out, *cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def model() -> LGESynthNet:
    torch.manual_seed(0)
    return LGESynthNet(tiny_config())


# ------------------------------------------------------------------------------ component shapes
def test_text_encoder_tiny_random_is_seeded_cached_and_frozen():
    encoder = TextEncoder(TextEncoderConfig(kind="tiny-random", tiny_hidden_size=32, max_length=24, cache_size=2))
    states = encoder.encode([CAPTIONS[0], "", CAPTIONS[0]])
    assert states.shape == (3, 24, 32) and encoder.hidden_size == 32
    assert not states.requires_grad and torch.equal(states[0], states[2])
    assert len(encoder._cache) == 2  # LRU bound
    again = TextEncoder(TextEncoderConfig(kind="tiny-random", tiny_hidden_size=32, max_length=24))
    assert torch.equal(again.encode([CAPTIONS[0]])[0], states[0])  # same init in every process
    assert all(not p.requires_grad for p in encoder.parameters())
    assert not encoder.train().training


def test_packaged_minilm_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    encoder = TextEncoder(TextEncoderConfig())
    assert encoder.encode(["LGE short-axis, mid slice."]).shape[-1] == 384


@pytest.mark.parametrize(
    "unet_kwargs, cond_channels, latent, n_residuals",
    [
        [dict(block_out_channels=(32, 64), layers_per_block=1), (16, 32), 16, 4],
        [dict(block_out_channels=(16, 32, 64), layers_per_block=2, cross_attention_levels=(True, True, False)),
         (16, 32, 96), 8, 9],
    ],
)
def test_controlnet_residuals_match_the_unet_skips(unet_kwargs, cond_channels, latent, n_residuals):
    unet_cfg = InpaintUNetConfig(cross_attention_dim=32, attention_head_dim=16, norm_num_groups=8, **unet_kwargs)
    unet = build_inpaint_unet(unet_cfg)
    controlnet = build_controlnet(ControlNetConfig(conditioning_embedding_out_channels=cond_channels), unet_cfg, unet)
    assert unet.config.in_channels == 9 and unet.config.out_channels == 4 and controlnet.config.in_channels == 4
    b, f = 2, 2 ** (len(cond_channels) - 1)
    t = torch.tensor([10, 500])
    text = torch.randn(b, 7, 32)
    down, mid = controlnet(torch.randn(b, 4, latent, latent), t, text, torch.ones(b, 1, latent * f, latent * f),
                           return_dict=False)
    skips = []  # the UNet's own skip connections, recorded on its down path
    unet.conv_in.register_forward_hook(lambda m, i, o: skips.append(o.shape))
    for block in unet.down_blocks:
        block.register_forward_hook(lambda m, i, o: skips.extend(r.shape for r in o[1]))
    mids = []
    unet.mid_block.register_forward_hook(lambda m, i, o: mids.append(o.shape))
    eps = unet(torch.randn(b, 9, latent, latent), t, text, down_block_additional_residuals=down,
               mid_block_additional_residual=mid).sample
    assert eps.shape == (b, 4, latent, latent)
    assert len(down) == n_residuals and [r.shape for r in down] == skips and mid.shape == mids[0]
    assert all(torch.all(r == 0) for r in (*down, mid))  # zero convolutions: a new ControlNet is a no-op


def test_controlnet_starts_from_the_unet_weights():
    unet_cfg = InpaintUNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                 attention_head_dim=16, norm_num_groups=8)
    unet = build_inpaint_unet(unet_cfg)
    controlnet = build_controlnet(ControlNetConfig(conditioning_embedding_out_channels=(16, 32)), unet_cfg, unet)
    assert torch.equal(controlnet.conv_in.weight, unet.conv_in.weight[:, :4])
    assert torch.equal(controlnet.down_blocks[1].attentions[0].proj_in.weight,
                       unet.down_blocks[1].attentions[0].proj_in.weight)


def test_controlnet_restarts_from_a_loaded_unet_as_a_no_op():
    model = LGESynthNet(tiny_config())
    randomize_zero_convs(model)
    with torch.no_grad():
        model.unet.conv_in.weight.add_(1.0)  # as if a trained inpainting UNet had been loaded
    model.init_controlnet_from_unet()
    assert torch.equal(model.controlnet.conv_in.weight, model.unet.conv_in.weight[:, :4])
    down, mid = model.controlnet(torch.randn(1, 4, 16, 16), torch.tensor([3]), torch.randn(1, 5, 32),
                                 torch.ones(1, 1, SIZE, SIZE), return_dict=False)
    assert all(torch.all(r == 0) for r in (*down, mid))


@pytest.mark.parametrize("width", [1, 2])
def test_edge_condition_equals_the_anatomy_edge_map(width):
    rng = np.random.default_rng(width)
    masks = rng.random((3, 20, 20)) > 0.35
    got = conditioning_image(torch.tensor(masks[:, None], dtype=torch.float32), "edges", width)[:, 0].numpy()
    assert np.array_equal(got > 0.5, np.stack([edge_map(m, width) for m in masks]))
    filled = conditioning_image(torch.tensor(masks[:, None], dtype=torch.float32), "mask")[:, 0].numpy()
    assert np.array_equal(filled > 0.5, masks)


def test_inpaint_mask_dilates_by_a_disc_and_soft_dice_is_bounded():
    scar = torch.zeros(1, 1, 9, 9)
    scar[0, 0, 4, 4] = 1
    assert inpaint_mask(scar, 0).sum() == 1 and inpaint_mask(scar, 1).sum() == 5 and inpaint_mask(scar, 2).sum() == 13
    target = torch.zeros(2, 1, 4, 4)
    target[:, :, 1:3, 1:3] = 1
    loss = soft_dice_loss(torch.stack([target[0], 1 - target[1]]), target)
    assert loss[0] < 1e-6 and abs(loss[1] - 1) < 1e-6


# ------------------------------------------------------------------------------ assembly checks
@pytest.mark.parametrize(
    "overrides, message",
    [
        [dict(unet=InpaintUNetConfig(block_out_channels=(32, 64), cross_attention_dim=48, attention_head_dim=16,
                                     norm_num_groups=8)), "cross_attention_dim"],
        [dict(controlnet=ControlNetConfig(conditioning_embedding_out_channels=(16, 32, 96))), "downsample"],
        [dict(vae=VAEConfig(block_out_channels=(16, 32), latent_channels=3, norm_num_groups=8)), "latent_channels"],
    ],
)
def test_mismatched_components_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        LGESynthNet(tiny_config(**overrides))


def test_bad_batches_are_refused(model):
    image, scar, captions = make_inputs()
    with pytest.raises(ValueError, match="multiples of 4"):
        model.make_batch(image[..., :30, :30], scar[..., :30, :30], captions)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.make_batch(image * 3, scar, captions)
    with pytest.raises(ValueError, match="2 strings"):
        model.make_batch(image, scar, captions[:1])


# ----------------------------------------------------------------------------------- training
def test_reward_gradients_reach_only_the_controlnet():
    torch.manual_seed(0)
    model = LGESynthNet(tiny_config())
    reward_model = tiny_reward_model()
    batch = make_batch(model)
    out = model.training_loss(batch, reward_model, torch.Generator().manual_seed(0),
                              timesteps=torch.tensor([0, model.cfg.reward_t_max]))
    assert out["n_reward"] == 2 and torch.isfinite(out["loss"]) and 0 < out["reward"] <= 1
    assert torch.allclose(out["loss"], out["diffusion"] + model.cfg.reward_weight * out["reward"])
    out["reward"].backward()  # the reward term alone
    grads = [p.grad for p in model.controlnet.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    for frozen in (model.unet, model.vae, model.text_encoder, reward_model):
        assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert not reward_model.training and not model.vae.training
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.controlnet.parameters()}


def test_train_base_trains_the_unet_too():
    model = LGESynthNet(tiny_config(train_base=True))
    out = model(make_batch(model), generator=torch.Generator().manual_seed(0))  # forward = training_loss
    assert out["n_reward"] == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.unet.conv_in.parameters())
    assert len(model.trainable_parameters()) == len(list(model.unet.parameters())) + len(list(model.controlnet.parameters()))
    assert model.train().unet.training and not model.vae.training


def test_no_reward_above_t_max(model):
    batch = make_batch(model)
    t_max = model.cfg.reward_t_max
    out = model.training_loss(batch, tiny_reward_model(), torch.Generator().manual_seed(0),
                              timesteps=torch.tensor([t_max + 1, model.cfg.num_train_timesteps - 1]))
    assert out["n_reward"] == 0 and float(out["reward"]) == 0.0 and torch.equal(out["loss"], out["diffusion"])
    seeded = [model.training_loss(batch, generator=torch.Generator().manual_seed(3))["loss"] for _ in range(2)]
    assert torch.equal(*seeded)


# ----------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("scheduler", ["ddim", "dpm-solver"])
def test_generate_keeps_the_known_region_and_is_seeded(scheduler):
    torch.manual_seed(0)
    model = LGESynthNet(tiny_config(scheduler=scheduler)).eval()
    randomize_zero_convs(model)
    batch = make_batch(model, batch=3)
    first = model.generate(batch, generator=torch.Generator().manual_seed(7))
    again = model.generate(batch, generator=torch.Generator().manual_seed(7))
    other = model.generate(batch, num_inference_steps=2, generator=torch.Generator().manual_seed(8))
    assert first.shape == (3, 1, SIZE, SIZE) and first.dtype == torch.float32
    assert first.min() >= -1 and first.max() <= 1
    outside = batch["mask"] == 0
    assert torch.equal(first[outside], batch["image"][outside]) and torch.equal(other[outside], batch["image"][outside])
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_generate_encodes_a_shared_source_once_and_maps_it_back():
    """Candidates of one slice share their source image: it is VAE-encoded once, and every sample
    still gets its own source's latents (each sample as when generated alone)."""
    torch.manual_seed(0)
    model = LGESynthNet(tiny_config()).eval()
    randomize_zero_convs(model)
    batch = make_batch(model, batch=3)
    order = [1, 0, 1, 2, 0]  # sources 0 and 1 twice each, out of order
    shared = {k: (v[order] if torch.is_tensor(v) else [v[i] for i in order]) for k, v in batch.items()}
    shared["mask"] = torch.roll(shared["mask"], 1, dims=0)  # the same source under another scar
    calls = []
    encode = model._encode
    model._encode = lambda images: calls.append(len(images)) or encode(images)
    together = model.generate(shared, num_inference_steps=2, generator=[torch.Generator().manual_seed(i) for i in range(5)])
    assert calls == [3 + 5]  # three distinct sources, five masked copies
    for i in range(5):
        one = {k: v[i:i + 1] for k, v in shared.items()}
        alone = model.generate(one, num_inference_steps=2, generator=[torch.Generator().manual_seed(i)])
        assert torch.allclose(together[i:i + 1], alone, atol=1e-4), i


def test_channels_last_placement_generates_and_segments_the_same():
    """The actors' default placement (engine.synthesis.actors.place_model): every convolution's
    weight in channels-last layout, the same images and reward predictions up to float rounding."""
    import copy

    from engine.models.reward import predict_scar
    from engine.synthesis.actors import place_model

    torch.manual_seed(0)
    model = LGESynthNet(tiny_config()).eval()
    randomize_zero_convs(model)
    batch = make_batch(model, batch=3)
    seeds = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    with torch.inference_mode():
        reference = model.generate(batch, num_inference_steps=2, generator=seeds())
    fast = place_model(copy.deepcopy(model), "cpu")
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs
                         if w.shape[2:] != (1, 1) and w.shape[1] > 1)
    with torch.inference_mode():
        out = fast.generate(batch, num_inference_steps=2, generator=seeds())
    assert torch.allclose(out, reference, atol=1e-4) and not torch.equal(out, batch["image"])
    assert place_model(model, "cpu", channels_last=False) is model and model.unet.conv_in.weight.is_contiguous()

    reward = tiny_reward_model().eval()
    images = batch["image"]
    with torch.inference_mode():
        probs, _ = predict_scar(reward, images)
        probs_fast, _ = predict_scar(place_model(copy.deepcopy(reward), "cpu"), images)
    assert torch.allclose(probs_fast, probs, atol=1e-5)


def test_generate_with_guidance_and_under_bf16_autocast():
    model = LGESynthNet(tiny_config(guidance_scale=2.0, caption_dropout=0.1)).eval()
    randomize_zero_convs(model)
    batch = make_batch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(batch, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    outside = batch["mask"] == 0
    assert torch.equal(out[outside], batch["image"][outside])


# ------------------------------------------------------------------------------- ablation switches
def _captured_controlnet_inputs(model: LGESynthNet, batch) -> dict:
    seen = {}

    def hook(module, args, kwargs):
        seen["cond"] = kwargs["controlnet_cond"].clone()
        seen["text"] = kwargs["encoder_hidden_states"].clone()

    handle = model.controlnet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.training_loss(batch, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return seen


def test_ablation_switches_change_what_the_model_receives():
    torch.manual_seed(0)
    edges = LGESynthNet(tiny_config())
    filled = LGESynthNet(tiny_config(controlnet=dataclasses.replace(edges.cfg.controlnet, conditioning="mask")))
    constant = LGESynthNet(tiny_config(caption_mode="constant"))
    image, scar, captions = make_inputs()

    seen_edges = _captured_controlnet_inputs(edges, edges.make_batch(image, scar, captions))
    seen_filled = _captured_controlnet_inputs(filled, filled.make_batch(image, scar, captions))
    assert torch.equal(seen_filled["cond"], scar)
    assert torch.equal(seen_edges["cond"], conditioning_image(scar, "edges")) and seen_edges["cond"].sum() < scar.sum()
    assert not torch.equal(seen_edges["text"][0], seen_edges["text"][1])  # descriptive captions differ

    # constant captions hold even when the batch carries descriptive ones
    seen_constant = _captured_controlnet_inputs(constant, edges.make_batch(image, scar, captions))
    assert torch.equal(seen_constant["text"][0], seen_constant["text"][1])
    assert constant.make_batch(image, scar, captions)["caption"] == [CONSTANT_CAPTION] * 2


# ------------------------------------------------------------------------------- checkpoints
def test_state_dicts_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = LGESynthNet(tiny_config()).eval()
    randomize_zero_convs(model)
    for name, state in model.state_dicts().items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    torch.manual_seed(1)
    restored = LGESynthNet(tiny_config()).eval()
    batch = make_batch(model)
    before = restored.generate(batch, generator=torch.Generator().manual_seed(0))
    restored.load_state_dicts({name: load_file(str(tmp_path / f"{name}.safetensors")) for name in COMPONENTS})
    expected = model.generate(batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(restored.generate(batch, generator=torch.Generator().manual_seed(0)), expected)
    assert not torch.equal(before, expected)
    with pytest.raises(KeyError, match="text_encoder"):
        restored.load_state_dicts({"text_encoder": {}})


def test_config_round_trips_through_plain_data():
    cfg = tiny_config(scheduler="dpm-solver")
    assert GeneratorConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="guidance_scale"):
        tiny_config(guidance_scale=0.5)


def test_a_skipped_base_needs_an_exported_base_and_a_stage_must_train(tmp_path):
    import shutil

    from engine.config import ConfigError
    from engine.training.generator import train_generator
    from tests.synth_helpers import make_tiny_run, tiny_config

    base = make_tiny_run(tmp_path / "tiny")
    run = tmp_path / "run"
    shutil.copytree(base / "models" / "reward", run / "reward")  # a reward model, but no generator yet
    cfg = tiny_config(base, run, ["generator.base.epochs=0", "generator.controlnet.epochs=1"])
    with pytest.raises(ValueError, match="no exported base"):
        train_generator(cfg)
    for overrides, message in ((["generator.base.epochs=0", "generator.controlnet.epochs=0"], "nothing to train"),
                               (["reward.loop.epochs=0"], "loop.epochs must be >= 1"),
                               (["downstream.loop.epochs=0"], "loop.epochs must be >= 1")):
        with pytest.raises((ValueError, ConfigError), match=message):
            tiny_config(base, run, overrides)
