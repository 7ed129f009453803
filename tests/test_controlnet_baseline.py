"""The paper's ControlNet baselines (ControlNet, ControlNet with template guidance): a text-to-image
UNet + ControlNet on the edge map, seeded per sample; the template's strength moves the output from
the template's reconstruction (near 0) to a template-free sample (1); one tiny model trains in process
through the shared Ray Train harness, is not trained again once finished, and synthesizes for both
methods through the same plan, filter and store, into stores that never mix."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from engine.config import ConfigError, from_dict
from engine.models.controlnet import conditioning_image
from engine.models.controlnet_baseline import ControlNetBaseline
from engine.settings import EngineConfig
from engine.synthesis.methods import method_actor
from tests.synth_helpers import tiny_config

S = 32  # unit-test images: 16 px latents (the tiny VAE downsamples by 2)
TINY_CONTROLNET = ["controlnet_baseline.model.unet.block_out_channels=[16,32]",
                   "controlnet_baseline.model.unet.layers_per_block=1",
                   "controlnet_baseline.model.unet.attention_head_dim=8",
                   "controlnet_baseline.model.unet.norm_num_groups=8",
                   "controlnet_baseline.model.unet.cross_attention_dim=32",
                   "controlnet_baseline.model.conditioning_embedding_out_channels=[8,16]"]
CAPTIONS = ["LGE short-axis, mid slice. Enhancement in mid inferior segment, subendocardial, 26-50% transmural.",
            "LGE short-axis, basal slice. Enhancement in basal anterior segment, transmural, 76-100% transmural.",
            "LGE short-axis, apical slice. Enhancement in apical lateral segment, subepicardial, 1-25% transmural."]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread, as the synthesis actors use: two cores shared with Ray and other processes
    make torch's default thread pool spend seconds waiting on the first calls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> ControlNetBaseline:
    """The tiny baseline the run config resolves (generator.model's text encoder and sampler, 3 steps)."""
    cfg = tiny_config(Path("unused"), Path("unused"), [*TINY_CONTROLNET, "generator.model.num_inference_steps=3"])
    torch.manual_seed(0)
    net = ControlNetBaseline(cfg.controlnet_baseline.model.resolve(cfg.generator.model, cfg.vae.model)).eval()
    with torch.no_grad():  # an untrained ControlNet adds nothing: give its zero convolutions weights
        g = torch.Generator().manual_seed(1)
        cn = net.controlnet
        for module in [cn.controlnet_cond_embedding.conv_out, *cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def _batch(n: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    scar = torch.zeros(n, 1, S, S)
    for i in range(n):
        scar[i, :, 8 + 2 * i:16 + 2 * i, 10:20] = 1
    return {"image": torch.rand(n, 1, S, S, generator=g) * 2 - 1, "scar": scar, "mask": scar,
            "condition": conditioning_image(scar, "edges"), "caption": CAPTIONS[:n]}


def _noise(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# --------------------------------------------------------------------------- model

def test_a_text_to_image_unet_and_controlnet_trained_on_the_diffusion_loss_alone(model):
    cfg = model.cfg
    assert model.unet.config.in_channels == model.controlnet.config.in_channels == cfg.unet.latent_channels == 4
    assert model.controlnet.config.conditioning_channels == 1 and model.unet.config.cross_attention_dim == 32
    assert cfg.reward_weight == 0.0 and cfg.text_encoder.kind == "tiny-random" and cfg.num_inference_steps == 3
    batch = _batch()
    eps = model.predict_noise(torch.randn(3, 4, S // 2, S // 2), torch.tensor([1, 500, 999]),
                              model.text_states(batch["caption"]), batch["condition"])
    assert eps.shape == (3, 4, S // 2, S // 2)
    model.zero_grad()
    out = model.training_loss(batch, torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert set(out) == {"loss", "diffusion"} and torch.isfinite(out["loss"])
    assert all(p.grad is not None for p in model.trained_parts().parameters())
    assert all(p.grad is None for p in [*model.vae.parameters(), *model.text_encoder.parameters()])
    model.zero_grad()
    images = model.generate(batch, generator=_noise([1, 2, 3]))
    assert images.shape == (3, 1, S, S) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_generate_is_seeded_per_sample_and_independent_of_its_batch(model, strength):
    batch = _batch()
    out = model.generate(batch, generator=_noise([1, 2, 3]), template_strength=strength)
    assert torch.equal(out, model.generate(batch, generator=_noise([1, 2, 3]), template_strength=strength))
    alone = model.generate({k: v[1:2] for k, v in batch.items()}, generator=_noise([2]), template_strength=strength)
    assert torch.allclose(alone, out[1:2], atol=1e-5)
    other = model.generate(batch, generator=_noise([1, 9, 3]), template_strength=strength)
    assert not torch.allclose(other[1], out[1], atol=1e-3) and torch.allclose(other[0], out[0], atol=1e-5)


def test_the_template_strength_moves_from_the_template_to_a_template_free_sample(model):
    batch = _batch()
    other = {**batch, "image": batch["image"].flip(-1)}  # another template, same condition and caption
    # near 0 no sampler step is left: the template's VAE reconstruction, its scar region hidden
    near0 = model.generate(batch, generator=_noise([1, 2, 3]), template_strength=1e-3)
    template = model._decode(model._encode(model.template(batch))).clamp(-1, 1)
    assert torch.allclose(near0, template, atol=1e-6)
    unmasked = model._decode(model._encode(batch["image"])).clamp(-1, 1)
    assert not torch.allclose(near0, unmasked, atol=1e-3)  # what is under the mask never reaches the output
    # in between: the template shapes the output
    assert not torch.allclose(model.generate(batch, generator=_noise([1, 2, 3]), template_strength=0.5),
                              model.generate(other, generator=_noise([1, 2, 3]), template_strength=0.5), atol=1e-3)
    # at 1: pure noise, the template is ignored (the `controlnet` method)
    full = model.generate(batch, generator=_noise([1, 2, 3]), template_strength=1.0)
    assert torch.equal(full, model.generate(other, generator=_noise([1, 2, 3]), template_strength=1.0))
    assert torch.equal(full, model.generate({k: v for k, v in batch.items() if k != "mask"}, generator=_noise([1, 2, 3])))


@pytest.mark.parametrize("section, match", [
    ({"template_strength": 0.0}, "template_strength"),
    ({"template_strength": 1.5}, "template_strength"),
    ({"model": {"conditioning_embedding_out_channels": []}}, "conditioning_embedding_out_channels"),
    ({"model": {"unet": {"norm_num_groups": 7}}}, "norm_num_groups"),
    ({"loop": {"epochs": 0}}, "epochs"),
])
def test_bad_controlnet_baseline_settings_are_refused_naming_the_key(section, match):
    with pytest.raises(ConfigError, match=match) as info:
        from_dict(EngineConfig, {"cohort": {"root": "x"}, "controlnet_baseline": section})
    assert str(info.value).startswith("controlnet_baseline")


def test_the_cli_and_the_job_know_the_stage(capsys):
    from engine.cli import main
    from jobs.train_controlnet import parse_args

    with pytest.raises(SystemExit) as info:
        main(["train", "controlnet", "--help"])
    assert info.value.code == 0 and "controlnet" in capsys.readouterr().out
    overrides = ["controlnet_baseline.loop.epochs=1"]
    assert parse_args(["--config", "c.yaml", *overrides]).overrides == overrides
    with pytest.raises(ValueError, match="synthesis.method: expected one of .*controlnet.*controlnet-template"):
        from_dict(EngineConfig, {"cohort": {"root": "x"}, "synthesis": {"method": "controlnet-img2img"}})


# --------------------------------------------------------------------------- train, export, synthesize

TRAIN = [*TINY_CONTROLNET, "controlnet_baseline.loop.epochs=1", "controlnet_baseline.loop.batch_size=2",
         "controlnet_baseline.loop.max_steps=2", "controlnet_baseline.ray.num_workers=0",
         "synthesis.threshold=-1.0", "synthesis.max_candidates=4"]


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_one_model_trains_and_synthesizes_both_methods_into_stores_that_never_mix(ray_cluster, tmp_path_factory):
    from engine.evaluation.gates import realism, realism_items
    from engine.synthesis.check import check_store
    from engine.synthesis.pipeline import SynthesisJob, synthesize
    from engine.training.controlnet_baseline import train_controlnet_baseline
    from engine.training.prepare import prepare_arrays
    from tests.synth_helpers import make_tiny_run

    base = make_tiny_run(tmp_path_factory.mktemp("controlnet"))
    run = tmp_path_factory.mktemp("controlnet-run")
    cfg = tiny_config(base, run, [*TRAIN, "synthesis.method=controlnet"])
    with pytest.raises(FileNotFoundError, match="lgesynth train controlnet"):
        SynthesisJob(cfg)
    metrics = train_controlnet_baseline(cfg)
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"]) and np.isfinite(metrics["val_diffusion"])
    record = json.loads((run / "controlnet" / "controlnet_baseline.json").read_text())
    model = record["config"]["model"]
    assert model["reward_weight"] == 0.0 and model["text_encoder"]["kind"] == "tiny-random"
    assert record["config"]["crop_size"] == 64 and Path(record["config"]["vae_folder"]) == cfg.vae.folder(cfg.run_dir)
    # finished: not trained again, also when only a sampling setting changed
    again = tiny_config(base, run, [*TRAIN, "controlnet_baseline.template_strength=0.3"])
    assert train_controlnet_baseline(again)["step"] == 2
    assert json.loads((run / "controlnet" / "controlnet_baseline.json").read_text())["sha256"] == record["sha256"]

    template = tiny_config(base, run, [*TRAIN, "synthesis.method=controlnet-template", f"synthesis.store={run / 't.zarr'}"])
    stores = {}
    for method, method_cfg in (("controlnet", cfg), ("controlnet-template", template)):
        summary = synthesize(method_cfg, sequential=True, log=lambda _: None)
        assert summary["method"] == method and summary["written"] == 4
        url = method_cfg.synthesis.store_url(method_cfg.run_dir)
        assert check_store(url)[1] == []
        stores[method] = zarr.open_group(url, mode="r").attrs["lgesynth"]
        content = stores[method]["content"]
        assert content["synthesis"]["method"] == method
        assert content["checkpoints"]["controlnet_baseline"] == record["sha256"]
        assert set(content["checkpoints"]) == {"reward", "vae", "controlnet_baseline"}
    assert "controlnet" not in stores["controlnet"]["content"]
    assert stores["controlnet-template"]["content"]["controlnet"] == {"template_strength": 0.6}
    assert stores["controlnet"]["fingerprint"] != stores["controlnet-template"]["fingerprint"]
    stronger = tiny_config(base, run, [*TRAIN, "synthesis.method=controlnet-template", f"synthesis.store={run / 't.zarr'}",
                                       "controlnet_baseline.template_strength=0.9"])
    with pytest.raises(ValueError, match="template_strength"):  # another strength is another store
        synthesize(stronger, sequential=True, log=lambda _: None)

    parts = prepare_arrays(template)[0]  # the evaluation's realism gate: the actor from the job's arguments
    job = SynthesisJob(template, parts)
    actor = method_actor("controlnet-template")(**job.actor_args()[0])
    refilled = realism(actor, realism_items(parts["train"], job.data_cfg, 2), seed=0)
    assert refilled["slices"] == 2 and np.isfinite(refilled["ssim_whole"]["mean"])
