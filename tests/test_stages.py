"""Every training stage end to end on the session's real two-node Ray cluster, tiny configs:
reward -> VAE -> generator (base, then ControlNet with the reward loss) -> downstream (real only and
real + synthetic from a Zarr store). Exports are safetensors + json; a re-run continues."""

import json
from pathlib import Path

import numpy as np
import pytest

from engine.config import apply_overrides, from_dict
from engine.phantom import write_phantom_cohort
from engine.phantom.config import PhantomConfig
from engine.settings import EngineConfig
from tests.synth_helpers import TINY_MODELS

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

TINY = [
    *TINY_MODELS, "data.augment=true", "generator.model.reward_t_max_fraction=1.0", "generator.preview_count=4",
    "downstream.model.init_features=8", "downstream.model.growth_rate=4",
    "downstream.model.block_config=[1,1,1,1]", "downstream.model.decoder_channels=[16,8,8,8,4]",
]
LOOPS = ["reward.loop", "vae.loop", "generator.base", "generator.controlnet", "downstream.loop"]


def stage_config(root, run_dir, extra=()):
    overrides = [f"cohort.root={root}", f"run_dir={run_dir}", *TINY, "split.fractions=[0.5,0.25,0.25]"]
    for loop in LOOPS:
        overrides += [f"{loop}.epochs=1", f"{loop}.batch_size=4", f"{loop}.max_steps=2"]
    # Two workers (DDP on two nodes) where the stage's model makes DDP interesting: the generator
    # (frozen text encoder, VAE and reward model beside the trained UNet/ControlNet) and the
    # downstream model; one worker elsewhere (each extra worker costs ~7 s of start-up on two cores;
    # test_distributed covers two-node DDP, worker death and resumption).
    for stage, workers in (("reward", 1), ("vae", 1), ("generator", 2), ("downstream", 2)):
        overrides += [f"{stage}.ray.num_workers={workers}", f"{stage}.ray.checkpoint_every_steps=1"]
    return from_dict(EngineConfig, apply_overrides({}, [*overrides, *extra]))


@pytest.fixture(scope="module")
def trained_run(ray_cluster, tmp_path_factory):
    from engine.training.downstream import train_downstream
    from engine.training.generator import train_generator
    from engine.training.reward import train_reward
    from engine.training.vae import train_vae

    base = tmp_path_factory.mktemp("stages")
    write_phantom_cohort(base / "cohort", 8, seed=3, cfg=PhantomConfig(image_size=128))
    cfg = stage_config(base / "cohort", base / "run")
    metrics = {"reward": train_reward(cfg), "vae": train_vae(cfg), "generator": train_generator(cfg),
               "downstream": train_downstream(cfg)}
    return cfg, base, metrics


def test_every_stage_exports_safetensors_and_json(trained_run):
    cfg, base, metrics = trained_run
    run = Path(cfg.run_dir)
    for folder, names in (("reward", ["reward"]), ("vae", ["vae"]), ("generator", ["unet", "controlnet"]),
                          ("downstream", ["downstream"])):
        for name in names:
            record = json.loads((run / folder / f"{name}.json").read_text())
            assert (run / folder / record["weights"]).stat().st_size > 0
            assert record["sha256"] and record["num_parameters"] > 0
    suffixes = {p.suffix for p in (run / "ray").rglob("*") if p.is_file()}
    assert not suffixes & {".pt", ".pth", ".pkl", ".bin", ".ckpt"}, suffixes
    assert {"val_scar_dice", "val_pass_rate"} <= set(metrics["reward"])
    assert {"val_l1", "val_ssim"} <= set(metrics["vae"])
    vae_record = json.loads((run / "vae" / "vae.json").read_text())["config"]["model"]
    assert vae_record["scaling_factor"] != 1.0  # measured after training: unit-variance latents
    from engine.training.vae import load_vae

    assert load_vae(run / "vae")[0].config.scaling_factor == vae_record["scaling_factor"]
    assert {"val_positive_pass_rate", "loss", "reward"} <= set(metrics["generator"])
    assert {"val_patient_balanced_accuracy", "val_tp"} <= set(metrics["downstream"])
    assert all(np.isfinite(v) for m in metrics.values() for v in m.values() if isinstance(v, float))


def test_every_stage_uses_the_runs_one_split(trained_run):
    cfg, base, _ = trained_run
    splits = json.loads((Path(cfg.run_dir) / "splits.json").read_text())["splits"]
    everyone = [p for part in splits.values() for p in part]
    assert len(everyone) == len(set(everyone)) == 8


def test_a_rerun_with_more_epochs_continues(trained_run):
    from engine.training.reward import train_reward

    cfg, base, metrics = trained_run
    first = metrics["reward"]
    more = stage_config(base / "cohort", base / "run", ["reward.loop.epochs=2", "reward.loop.max_steps=4"])
    again = train_reward(more)
    assert first.get("step") == 2 and again.get("step") == 4 and again.get("epoch") == 2, (sorted(first), sorted(again))


def test_downstream_trains_on_real_plus_synthetic_from_a_zarr_store(trained_run):
    import zarr

    from engine.training.downstream import train_downstream

    cfg, base, _ = trained_run
    store = str(base / "synthetic.zarr")
    rng = np.random.default_rng(0)
    n = 6
    group = zarr.open_group(store, mode="w")
    group.create_array("image", data=rng.random((n, 64, 64), dtype=np.float32))
    label = np.zeros((n, 64, 64), np.uint8)
    label[:, 20:40, 20:40] = 2
    label[:, 25:30, 20:40] = 3
    group.create_array("label", data=label)
    group.create_array("passed", data=np.array([True] * 4 + [False] * 2))
    mixed = stage_config(base / "cohort", base / "run", [f"downstream.synthetic={store}", "downstream.n_synthetic=4",
                                                         "downstream.name=downstream-mixed",
                                                         "downstream.ray.num_workers=1"])
    metrics = train_downstream(mixed)
    record = json.loads((Path(cfg.run_dir) / "downstream-mixed" / "downstream.json").read_text())
    assert record["config"]["n_synthetic"] == 4 and len(record["config"]["synthetic_sources"]) == 4
    assert "val_patient_balanced_accuracy" in metrics
    too_many = stage_config(base / "cohort", base / "run", [f"downstream.synthetic={store}", "downstream.n_synthetic=5",
                                                            "downstream.name=downstream-too-many"])
    with pytest.raises(ValueError, match="5"):
        train_downstream(too_many)
