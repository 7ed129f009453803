"""Every stage end to end through `lgesynth demo` on the session's real two-node Ray cluster, tiny
configs: phantom -> validate -> reward -> VAE -> generator (base, then ControlNet with the reward loss)
-> synthesis -> evaluation (downstream real only, + paste, + LGESynthNet from their Zarr stores).
Exports are safetensors + json; a re-run continues."""

import json
from pathlib import Path

import numpy as np
import pytest

from engine.config import apply_overrides, dump_config, from_dict
from engine.settings import EngineConfig
from tests.synth_helpers import TINY_MODELS

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

TINY = [
    *TINY_MODELS, "data.augment=true", "generator.model.reward_t_max_fraction=1.0", "generator.preview_count=4",
    "downstream.model.init_features=8", "downstream.model.growth_rate=4",
    "downstream.model.block_config=[1,1,1,1]", "downstream.model.decoder_channels=[16,8,8,8,4]",
    "spade.model.channels=[16,8]", "spade.model.hidden_channels=8",
]
LOOPS = ["reward.loop", "vae.loop", "generator.base", "generator.controlnet", "downstream.loop", "spade.loop"]
# the demo's own sections, tiny: 8 phantom patients, 6 candidates (all kept: threshold -1), one seed,
# the three methods the demo compares; a sweep whose real-only trial is the evaluation's own model
DEMO = ["demo.patients=8", "demo.phantom_seed=3", "phantom.image_size=128", "synthesis.threshold=-1.0",
        "synthesis.max_candidates=6", "synthesis.shard_size=3", "synthesis.candidates_per_slice=1",
        "evaluation.methods=[paste,lgesynthnet,spade-fc]",
        "evaluation.seeds=[0]", "evaluation.n_synthetic=4", "evaluation.realism_split=train", "evaluation.realism_max=2",
        "sweep.methods=[lgesynthnet]", "sweep.n_synthetic=[0,2]", "sweep.thresholds=[-1.0]", "sweep.seeds=[0]",
        "sweep.name=tiny"]


def stage_config(run_dir, extra=()):
    overrides = [f"cohort.root={Path(run_dir) / 'cohort'}", f"run_dir={run_dir}", *TINY, *DEMO,
                 "split.fractions=[0.5,0.25,0.25]"]
    for loop in LOOPS:
        overrides += [f"{loop}.epochs=1", f"{loop}.batch_size=4", f"{loop}.max_steps=2"]
    # Two workers (DDP on two nodes) for the generator, whose frozen text encoder, VAE and reward
    # model sit beside the trained UNet/ControlNet; the others train in process (num_workers 0: no
    # Train controller or worker actors, ~15 s of start-up each saved on two cores; the downstream
    # runs inside the evaluation's and the sweep's Tune trials). test_distributed covers two-node
    # DDP, worker death and resumption in both modes.
    for stage, workers in (("reward", 0), ("vae", 0), ("generator", 2), ("downstream", 0), ("spade", 0)):
        overrides += [f"{stage}.ray.num_workers={workers}", f"{stage}.ray.checkpoint_every_steps=1"]
    return from_dict(EngineConfig, apply_overrides({}, [*overrides, *extra]))


@pytest.fixture(scope="module")
def trained_run(ray_cluster, tmp_path_factory):
    """`lgesynth demo --out RUN --config tiny.yaml --sequential`, as a user runs it."""
    from engine.cli import main

    base = tmp_path_factory.mktemp("stages")
    cfg = stage_config(base / "run")
    dump_config(stage_config(base / "elsewhere"), base / "tiny.yaml")  # --out moves run and cohort
    assert main(["demo", "--out", str(base / "run"), "--config", str(base / "tiny.yaml"), "--sequential"]) == 0
    demo = json.loads((base / "run" / "reports" / "demo.json").read_text())
    return cfg, base, demo["metrics"]


def test_every_stage_exports_safetensors_and_json(trained_run):
    cfg, base, metrics = trained_run
    run = Path(cfg.run_dir)
    assert (run / "cohort" / "manifest.json").is_file()  # the demo wrote its phantom into --out
    mixed = [p.name for p in run.glob("downstream-*-t-1-n4-s0")]  # named by method, store tag, threshold, n, seed
    assert sorted(name.split("-")[1] for name in mixed) == ["lgesynthnet", "paste", "spade"]
    for folder, names in (("reward", ["reward"]), ("vae", ["vae"]), ("generator", ["unet", "controlnet"]),
                          ("spade-fc", ["spade"]), ("downstream-real-n0-s0", ["downstream"]),
                          *((name, ["downstream"]) for name in mixed)):
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
    assert all(np.isfinite(v) for m in metrics.values() for v in m.values() if isinstance(v, float))


def test_the_demo_report_holds_every_step_and_all_three_gates(trained_run):
    cfg, base, _ = trained_run
    reports = Path(cfg.run_dir) / "reports"
    demo = json.loads((reports / "demo.json").read_text())
    assert [s["step"] for s in demo["steps"]] == ["phantom", "validate", "train reward", "train vae", "train generator",
                                                  "train spade-fc", "synthesize", "evaluate", "sweep"]
    assert demo["peak_rss_mib"] > 100 and demo["seconds"] > 0
    result = json.loads((reports / "evaluation.json").read_text())
    assert result["methods"]["lgesynthnet"]["store"] == cfg.synthesis.store_url(cfg.run_dir)  # the run's own store
    for method in ("paste", "lgesynthnet", "spade-fc"):
        entry = result["methods"][method]
        assert entry["realism"]["slices"] == 2 and entry["alignment"]["made"] == 6
        run = entry["utility"]["runs"][0]
        assert run["seed"] == 0 and run["n_synthetic"] == 4 and sum(run["confusion"]) == run["patients"] > 0
        assert run["run"].startswith(f"downstream-{method}-") and run["run"].endswith("-t-1-n4-s0")
        record = json.loads((Path(cfg.run_dir) / run["run"] / "downstream.json").read_text())
        assert record["config"]["n_synthetic"] == 4 and len(record["config"]["synthetic_sources"]) == 4
    assert any(line.startswith("lgesynthnet:") and "paste" in line for line in result["verdict"])
    text = (reports / "demo.md").read_text()
    assert "| train generator |" in text and "| + paste | 4 |" in text and "| real only | 0 |" in text
    for png in ("realism.png", "samples.png", "dice_hist.png"):
        assert (reports / png).stat().st_size > 5_000, png
    # the sweep, on the validation patients; its real-only trial scores the evaluation's own model
    sweep = demo["sweep"]
    assert [(r["method"], r["n_synthetic"]) for r in sweep["rows"]] == [("real", 0), ("lgesynthnet", 2)]
    assert "## Sweep (validation patients)" in text and (Path(sweep["experiment"]) / "roi.png").stat().st_size > 5_000
    trials = json.loads((Path(sweep["experiment"]) / "sweep.json").read_text())["trials"]
    tag = result["methods"]["lgesynthnet"]["utility"]["runs"][0]["run"].split("-")[2]  # the run's own store
    assert sorted(t["run"] for t in trials) == [f"downstream-lgesynthnet-{tag}-t-1-n2-s0", "downstream-real-n0-s0"]


def test_every_stage_uses_the_runs_one_split(trained_run):
    cfg, base, _ = trained_run
    splits = json.loads((Path(cfg.run_dir) / "splits.json").read_text())["splits"]
    everyone = [p for part in splits.values() for p in part]
    assert len(everyone) == len(set(everyone)) == 8


def test_a_finished_stage_is_not_trained_again_and_a_changed_one_is_refused(trained_run):
    from engine.training.reward import train_reward

    cfg, base, metrics = trained_run
    checkpoints = sorted((Path(cfg.run_dir) / "ray" / "reward").glob("checkpoint_*"))
    again = train_reward(cfg)  # the same config: finished, nothing to do
    assert again["step"] == metrics["reward"]["step"] and again["val_scar_dice"] == metrics["reward"]["val_scar_dice"]
    assert sorted((Path(cfg.run_dir) / "ray" / "reward").glob("checkpoint_*")) == checkpoints
    with pytest.raises(ValueError, match=r"run 'reward' has checkpoints .*stage\.loop\.lr: [0-9.e-]+ -> 0\.005"):
        train_reward(stage_config(cfg.run_dir, ["reward.loop.lr=0.005"]))


def test_a_rerun_with_more_epochs_continues(trained_run):
    from engine.training.reward import train_reward

    cfg, base, metrics = trained_run
    first = metrics["reward"]
    more = stage_config(cfg.run_dir, ["reward.loop.epochs=2", "reward.loop.max_steps=4"])
    again = train_reward(more)
    assert first.get("step") == 2 and again.get("step") == 4 and again.get("epoch") == 2, (sorted(first), sorted(again))


def test_downstream_takes_any_store_with_image_label_passed_and_counts_what_it_needs(trained_run):
    import zarr

    from engine.training.downstream import train_downstream

    cfg, base, _ = trained_run
    store = str(base / "synthetic.zarr")  # a store of the user's own, only the arrays the reader needs
    rng = np.random.default_rng(0)
    n = 6
    label = np.zeros((n, 64, 64), np.uint8)
    label[:, 20:40, 20:40] = 2
    label[:, 25:30, 20:40] = 3
    arrays = {"image": rng.random((n, 64, 64), dtype=np.float32), "label": label,
              "passed": np.array([True] * 4 + [False] * 2)}
    group = zarr.open_group(store, mode="w")
    for name, data in arrays.items():
        group.create_array(name, data=data)
    too_many = stage_config(cfg.run_dir, [f"downstream.synthetic={store}", "downstream.n_synthetic=5",
                                          "downstream.name=downstream-too-many"])
    with pytest.raises(ValueError, match="asked for 5 synthetic samples but only 4 synthetic samples that passed"):
        train_downstream(too_many)  # only the 4 passed samples are available; refused before Ray starts


def test_downstream_refuses_synthetic_samples_made_from_validation_or_test_patients(trained_run):
    """A store whose samples came from held-out patients' negatives (``synthesis.split=test``, or
    another run's split) never trains the run's downstream model: refused before Ray starts."""
    import zarr

    from engine.training.downstream import train_downstream

    cfg, base, _ = trained_run
    splits = json.loads((Path(cfg.run_dir) / "splits.json").read_text())["splits"]
    label = np.zeros((3, 64, 64), np.uint8)
    label[:, 20:40, 20:40] = 2
    source = [f"{splits['train'][0]}/0", f"{splits['test'][0]}/1", f"{splits['train'][0]}/2"]
    group = zarr.open_group(str(base / "from-test.zarr"), mode="w")
    group.create_array("image", data=np.zeros((3, 64, 64), np.float32))
    group.create_array("label", data=label)
    group.create_array("passed", data=np.ones(3, bool))
    sources = group.create_array("source", shape=(3,), dtype=str)  # variable-length text, as the engine's stores
    sources[:] = np.array(source, dtype=object)
    leaky = stage_config(cfg.run_dir, [f"downstream.synthetic={base / 'from-test.zarr'}", "downstream.n_synthetic=3",
                                       "downstream.name=downstream-leaky"])
    with pytest.raises(ValueError, match=rf"1 of the 3 synthetic samples .*\({splits['test'][0]}\)"):
        train_downstream(leaky)
    assert not (Path(cfg.run_dir) / "downstream-leaky").exists()


def test_downstream_opens_a_store_on_object_storage_with_the_runs_storage_options(trained_run, s3_endpoint):
    """``downstream.synthetic`` on an S3 endpoint of its own (MinIO, moto): opened with
    ``synthesis.storage_options``, as every store of the run (evaluate's method stores too)."""
    import zarr

    from engine.training.downstream import train_downstream
    from tests.conftest import make_bucket

    cfg, base, _ = trained_run
    make_bucket(s3_endpoint, "downstream-own")
    url = "s3://downstream-own/user.zarr"
    group = zarr.open_group(url, mode="w", storage_options={"endpoint_url": s3_endpoint})
    group.create_array("image", data=np.zeros((3, 64, 64), np.float32))
    group.create_array("label", data=np.zeros((3, 64, 64), np.uint8))
    group.create_array("passed", data=np.array([True, False, True]))
    too_many = stage_config(cfg.run_dir, [f"downstream.synthetic={url}", "downstream.n_synthetic=3",
                                          f"synthesis.storage_options={{endpoint_url: '{s3_endpoint}'}}",
                                          "downstream.name=downstream-s3"])
    with pytest.raises(ValueError, match=f"only 2 synthetic samples that passed the filter in {url}"):
        train_downstream(too_many)  # the store was read (2 passed); refused before Ray starts


def test_failure_targeted_loop_steers_the_sampler_and_compares_at_equal_count(trained_run):
    """`lgesynth loop` on the tiny run: two rounds (uniform, then targeted), one seed, 2 samples each."""
    from engine.evaluation.loop import SEGMENTS, run_loop
    from engine.synthesis.store import open_store, store_attrs

    cfg, base, _ = trained_run
    # round 0 is the run's own store; a store of its own here, since an earlier test of this module
    # retrained the reward model (the run's synthetic.zarr, filtered by the old one, is refused)
    loop_cfg = stage_config(cfg.run_dir, ["loop.rounds=2", "loop.seeds=[0]", "loop.n_synthetic=2",
                                          f"synthesis.store={base / 'loop-own.zarr'}"])
    result = run_loop(loop_cfg, sequential=True, log=lambda _: None)
    first, second = result["rounds"]
    assert first["weights"]["segment"] == {} and second["store"] != first["store"]  # round 0: the configured sampler
    steered = second["weights"]["segment"]
    assert sorted(steered) == sorted(SEGMENTS) and np.isclose(np.mean(list(steered.values())), 1.0)
    sampler = store_attrs(open_store(second["store"]))["content"]["scar_sampler"]
    assert sampler["segment_weights"] == steered  # round 1 drew its scars with the new weights
    assert "segment_weights" not in store_attrs(open_store(first["store"]))["content"]["scar_sampler"]
    for arm in ("real_only", "uniform", "targeted"):
        assert len(result["test"][arm]["runs"]) == 1
    assert result["test"]["uniform"]["runs"][0]["run"] == first["val"]["runs"][0]["run"]  # scored, not retrained
    assert result["test"]["targeted"]["runs"][0]["n_used"] == 2
    text = Path(result["outputs"]["markdown"]).read_text()
    assert "| round |" in text and "Verdict:" in text
    assert Path(result["outputs"]["weights"]).stat().st_size > 5_000
