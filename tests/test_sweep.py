"""`lgesynth sweep`: the grid (the real-only baseline once), the selection of stored samples by
Dice (and the refusal of a threshold a store cannot serve), the aggregation over seeds and the
best-setting rule, the outputs; and one tiny sweep on the session's real Ray cluster (Tune trials
training in their own processes), re-run to check that the restored experiment runs nothing again,
and one interrupted by Ctrl-C (Tune trials driving Ray Train runs) and resumed."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from engine.config import apply_overrides, from_dict
from engine.evaluation.sweep import (
    REAL,
    SweepConfig,
    best_setting,
    max_concurrent_trials,
    run_name,
    store_selection,
    summarize,
    sweep_grid,
    trial_resources,
    write_outputs,
)
from engine.settings import EngineConfig
from engine.synthesis.store import StoreLayout, create_store, read_synthetic_arrays, select_samples, update_attrs, write_shard
from engine.training.distributed import InsufficientResourcesError, RayTrainConfig

# ---------------------------------------------------------------------------------------------------
# the grid and the config


def test_the_grid_runs_the_real_only_baseline_once_and_names_every_run():
    sweep = SweepConfig(methods=["paste", "lgesynthnet"], n_synthetic=[60, 0, 30], thresholds=[0.6, 0.7], seeds=[0, 1])
    grid = sweep_grid(sweep)
    assert grid[0] == {"method": REAL, "threshold": None, "n": 0}
    assert sum(s["n"] == 0 for s in grid) == 1 and len(grid) == 1 + 2 * 2 * 2
    assert [s["n"] for s in grid if s["method"] == "paste" and s["threshold"] == 0.6] == [30, 60]
    names = {run_name(s, seed) for s in grid for seed in sweep.seeds}
    assert len(names) == len(grid) * 2  # every (method, threshold, n, seed) its own downstream run
    assert run_name({"method": "paste", "threshold": 0.7, "n": 60}, 1) == "downstream-paste-t0.7-n60-s1"
    assert run_name({"method": "paste", "threshold": 0.7, "n": 60}, 1, n_used=41) == "downstream-paste-t0.7-n41-s1"
    assert run_name(grid[0], 2) == "downstream-real-n0-s2"
    # the store the samples come from is in the name: another store, another model
    assert run_name({"method": "paste", "threshold": 0.7, "n": 60}, 1, 41, "0123abcd") == "downstream-paste-0123abcd-t0.7-n41-s1"
    assert run_name(grid[0], 2, store="0123abcd") == "downstream-real-n0-s2"
    assert all(s["n"] for s in sweep_grid(SweepConfig(n_synthetic=[30], thresholds=[0.6])))  # no 0: no baseline


@pytest.mark.parametrize("kwargs, message", [
    ({"methods": ["spade"]}, "methods"),
    ({"n_synthetic": [0, 0]}, "n_synthetic"),
    ({"n_synthetic": [-1]}, "n_synthetic"),
    ({"thresholds": [1.0]}, "thresholds"),
    ({"seeds": []}, "seeds"),
    ({"name": "a/b"}, "name"),
    ({"trial_cpus": 0.0, "trial_memory_mb": 0}, "reserves nothing"),
])
def test_sweep_config_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SweepConfig(**kwargs)


def test_trials_reserve_no_cpu_and_concurrency_follows_the_worker_slots():
    from ray import tune
    from ray.tune.execution.placement_groups import PlacementGroupFactory

    def trainable(config):
        return None

    wrapped = tune.with_resources(trainable, trial_resources(SweepConfig()))
    assert wrapped._resources.required_resources.get("CPU", 0) == 0  # memory only: no worker slot is lost
    with pytest.raises(ValueError, match="empty head"):  # why: Tune refuses a trial that reserves nothing
        PlacementGroupFactory([{"CPU": 0}])
    two_nodes = [{"CPU": 1.0, "memory": 2e9}, {"CPU": 1.0, "memory": 2e9}]
    one = RayTrainConfig(num_workers=1, cpus_per_worker=1.0)
    two = RayTrainConfig(num_workers=2, cpus_per_worker=1.0)
    assert max_concurrent_trials(one, SweepConfig(), two_nodes) == 2
    assert max_concurrent_trials(two, SweepConfig(), two_nodes) == 1
    # a driver holding 0.01 CPU costs a whole worker slot on a one-CPU node
    assert max_concurrent_trials(one, SweepConfig(trial_cpus=0.01), two_nodes) == 1
    with pytest.raises(InsufficientResourcesError, match="cannot hold one sweep trial"):
        max_concurrent_trials(two, SweepConfig(trial_cpus=0.01), two_nodes)
    autoscaling = RayTrainConfig(num_workers=2, cpus_per_worker=1.0, check_resources=False)
    assert max_concurrent_trials(autoscaling, SweepConfig(trial_cpus=0.01), two_nodes) == 1
    gpus = RayTrainConfig(num_workers=2, use_gpu=True, cpus_per_worker=4.0)
    assert max_concurrent_trials(gpus, SweepConfig(), [{"CPU": 64.0, "GPU": 8.0}]) == 4
    # in process (num_workers 0): the trial is the worker and reserves its resources itself
    in_process = RayTrainConfig(num_workers=0, cpus_per_worker=1.0)
    assert trial_resources(SweepConfig(), in_process) == {"cpu": 1.0, "memory": 512 * 1024**2}
    assert max_concurrent_trials(in_process, SweepConfig(trial_cpus=0.5), two_nodes) == 2
    gpu_in_process = RayTrainConfig(num_workers=0, use_gpu=True, cpus_per_worker=4.0, gpus_per_worker=1.0)
    assert trial_resources(SweepConfig(), gpu_in_process)["gpu"] == 1.0
    assert max_concurrent_trials(gpu_in_process, SweepConfig(), [{"CPU": 64.0, "GPU": 8.0}]) == 8


# ---------------------------------------------------------------------------------------------------
# selecting stored samples by Dice

DICE = np.array([0.9, 0.65, 0.6, 0.3, 0.1, 0.8, 0.7, 0.55], np.float32)


def _store(path: Path, threshold: float, keep_rejected: bool, incomplete_shard: bool = False) -> str:
    """A store of 8 candidates in shards of 4, filtered at ``threshold`` as the filter actor does
    (float32 Dice > threshold); row 7 could not take a scar (skipped)."""
    url = str(path)
    layout = StoreLayout(rows=8, height=8, width=8, shard_size=4)
    group = create_store(url, layout, {"config": {"threshold": threshold, "keep_rejected": keep_rejected}})
    made = np.arange(8) != 7
    passed = made & (DICE > threshold)
    has_image = made if keep_rejected else passed
    image = np.where(has_image[:, None, None], (np.arange(8)[:, None, None] + 1) / 10.0, 0.0).astype(np.float32)
    rows = {"image": image * np.ones((8, 8, 8), np.float32), "label": np.zeros((8, 8, 8), np.uint8),
            "condition": np.zeros((8, 8, 8), np.uint8), "dice": np.where(made, DICE, 0).astype(np.float32),
            "passed": passed, "seed": np.arange(8), "sample_id": [f"s{i}" for i in range(8)],
            "source": ["P/1"] * 8, "caption": [""] * 8, "spec": ["{}"] * 8,
            "skip_reason": ["" if m else "no myocardium" for m in made]}
    for shard in range(2):
        if incomplete_shard and shard == 1:
            continue
        write_shard(group, shard, {k: np.asarray(v)[shard * 4:(shard + 1) * 4] for k, v in rows.items()})
    update_attrs(group, complete=not incomplete_shard, fingerprint="f", content={"synthesis": {"method": "paste"}})
    return url


def test_selection_by_dice_above_the_stores_threshold_is_a_subset_of_what_passed(tmp_path):
    import zarr

    url = _store(tmp_path / "s.zarr", 0.6, keep_rejected=False)
    group = zarr.open_group(url, mode="r")
    passed = np.flatnonzero(group["passed"][:])
    assert select_samples(group, 0.6, url).tolist() == passed.tolist() == [0, 1, 5, 6]  # 0.6 itself did not pass
    assert select_samples(group, 0.7, url).tolist() == [0, 5]
    default = read_synthetic_arrays(url)
    assert default["sample_id"] == ["s0", "s1", "s5", "s6"]  # the existing behaviour: what passed
    strict = read_synthetic_arrays(url, min_dice=0.7)
    assert strict["sample_id"] == ["s0", "s5"] and strict["passed"].all() and (strict["dice"] > 0.7).all()
    assert np.allclose(strict["image"][:, 0, 0, 0], [0.1, 0.6])
    with pytest.raises(ValueError, match=r"s\.zarr: asked for samples with Dice > 0\.5, but the store was filtered "
                                         r"at Dice > 0\.6 without keep_rejected"):
        select_samples(group, 0.5, url)
    with pytest.raises(ValueError, match="passed_only"):
        read_synthetic_arrays(url, passed_only=False, min_dice=0.7)


def test_a_looser_threshold_reaches_rejected_candidates_of_a_keep_rejected_store(tmp_path):
    import zarr

    url = _store(tmp_path / "k.zarr", 0.6, keep_rejected=True)
    loose = read_synthetic_arrays(url, min_dice=0.5)
    assert loose["sample_id"] == ["s0", "s1", "s2", "s5", "s6"]  # s7 (0.55) was skipped: no image
    assert (loose["image"] > 0).all()
    assert select_samples(zarr.open_group(url, mode="r"), -1.0, url).tolist() == [0, 1, 2, 3, 4, 5, 6]
    # rows of a shard never completed hold nothing, whatever their (fill) Dice says
    partial = _store(tmp_path / "p.zarr", 0.6, keep_rejected=True, incomplete_shard=True)
    assert select_samples(zarr.open_group(partial, mode="r"), -1.0, partial).tolist() == [0, 1, 2, 3]


def test_the_sweep_refuses_a_threshold_its_store_cannot_serve_before_any_trial(tmp_path):
    url = _store(tmp_path / "s.zarr", 0.6, keep_rejected=False)
    cfg = from_dict(EngineConfig, apply_overrides({}, [
        f"cohort.root={tmp_path / 'cohort'}", f"run_dir={tmp_path / 'run'}", f"synthesis.store={url}",
        "synthesis.method=paste", "synthesis.threshold=0.6", "sweep.methods=[paste]", "sweep.n_synthetic=[0,2]"]))
    ok = store_selection(cfg, sweep_grid(SweepConfig(methods=["paste"], n_synthetic=[0, 2], thresholds=[0.6, 0.7])))
    assert ok["paste"]["url"] == url and ok["paste"]["available"] == {"0.6": 4, "0.7": 2}
    with pytest.raises(ValueError, match=r"Dice > 0\.5, but the store was filtered at Dice > 0\.6"):
        store_selection(cfg, sweep_grid(SweepConfig(methods=["paste"], n_synthetic=[2], thresholds=[0.5, 0.6])))
    assert store_selection(cfg, sweep_grid(SweepConfig(methods=["paste"], n_synthetic=[0]))) == {}  # real only: no store read
    as_generator = from_dict(EngineConfig, apply_overrides({}, [f"cohort.root={tmp_path}", f"synthesis.store={url}"]))
    with pytest.raises(ValueError, match="made by method 'paste', the sweep asks for 'lgesynthnet'"):
        store_selection(as_generator, sweep_grid(SweepConfig(methods=["lgesynthnet"], n_synthetic=[2])))
    with pytest.raises(ValueError, match="no store of method 'lgesynthnet'"):
        store_selection(cfg, sweep_grid(SweepConfig(methods=["lgesynthnet"], n_synthetic=[2])))
    partial = _store(tmp_path / "p.zarr", 0.6, keep_rejected=True, incomplete_shard=True)
    cfg = from_dict(EngineConfig, apply_overrides({}, [f"cohort.root={tmp_path}", f"synthesis.store={partial}",
                                                       "synthesis.method=paste"]))
    with pytest.raises(ValueError, match="incomplete"):
        store_selection(cfg, sweep_grid(SweepConfig(methods=["paste"], n_synthetic=[2])))


# ---------------------------------------------------------------------------------------------------
# results


def _trial(method, threshold, n, seed, bacc, n_used=None, collapsed=False):
    n_used = n if n_used is None else n_used
    return {"method": method, "threshold": threshold, "n": n, "seed": seed, "balanced_accuracy": bacc, "dice": 0.5 + seed / 10,
            "dice_tp": 0.4, "accuracy": bacc, "auroc": bacc, "myocardium_dice": 0.8, "collapsed": collapsed,
            "n_used": n_used, "short": n_used < n, "run": f"downstream-{method}-t{threshold}-n{n}-s{seed}"}


def _patients_files(run_dir: Path, trials) -> None:
    """Per-patient validation records of each trial's run (8 patients, 4 positive), as trials write them."""
    from engine.evaluation.sweep import PATIENTS_FILE

    for t in trials:
        rng = np.random.default_rng(t["seed"] + len(t["run"]))
        records = {f"p{i}": {"positive": i < 4, "score": float(rng.uniform() + (i < 4)), "called": bool(rng.uniform() < 0.7) == (i < 4),
                             "scar_dice_sum": 0.5 * (i < 4), "scar_slices": int(i < 4), "scar_tp_dice_sum": 0.5 * (i < 4),
                             "scar_tp_slices": int(i < 4), "myocardium_dice_sum": 0.8, "myocardium_slices": 1} for i in range(8)}
        (run_dir / t["run"]).mkdir(parents=True, exist_ok=True)
        (run_dir / t["run"] / PATIENTS_FILE.format(split="val")).write_text(json.dumps(records))


GRID = sweep_grid(SweepConfig(methods=["paste"], n_synthetic=[0, 30, 60], thresholds=[0.6, 0.7], seeds=[0, 1]))
TRIALS = [
    _trial(REAL, None, 0, 0, 0.70), _trial(REAL, None, 0, 1, 0.80),
    _trial("paste", 0.6, 30, 0, 0.90), _trial("paste", 0.6, 30, 1, 0.80, collapsed=True),
    _trial("paste", 0.6, 60, 0, 0.80), _trial("paste", 0.6, 60, 1, 0.90),  # ties with n=30: fewer samples win
    _trial("paste", 0.7, 30, 0, 0.60), _trial("paste", 0.7, 30, 1, 0.60),
    _trial("paste", 0.7, 60, 0, 0.95, n_used=41),  # one seed only (the other errored), and short
]


def test_results_are_aggregated_over_seeds_and_the_best_setting_prefers_fewer_samples():
    rows = summarize(TRIALS, GRID)
    assert [(r["method"], r["threshold"], r["n_synthetic"]) for r in rows] == [(s["method"], s["threshold"], s["n"]) for s in GRID]
    real, p30, p60, q30, q60 = rows
    assert real["seeds"] == [0, 1] and real["balanced_accuracy"]["mean"] == pytest.approx(0.75)
    assert real["balanced_accuracy"]["sd"] == pytest.approx(np.std([0.7, 0.8], ddof=1))
    assert p30["collapsed"] == 1 and p30["dice"]["mean"] == pytest.approx(0.55)
    assert q60["seeds"] == [0] and q60["n_used"] == [41] and q60["short"] == 1 and q60["balanced_accuracy"]["sd"] == 0.0
    assert best_setting(rows)["n_synthetic"] == 60 and best_setting(rows)["threshold"] == 0.7  # 0.95 beats all
    without = summarize(TRIALS[:-1], GRID)
    assert without[-1]["seeds"] == [] and math.isnan(without[-1]["balanced_accuracy"]["mean"])
    best = best_setting(without)
    assert (best["threshold"], best["n_synthetic"]) == (0.6, 30)  # 0.85 for n = 30 and n = 60: the fewer
    tie_with_real = summarize([_trial(REAL, None, 0, 0, 0.9), _trial("paste", 0.6, 30, 0, 0.9)], GRID)
    assert best_setting(tie_with_real)["method"] == REAL  # synthetic samples that add nothing are not the best
    assert best_setting(summarize([], GRID)) is None


def test_outputs_table_csv_json_and_roi_figure(tmp_path):
    from engine.evaluation.sweep import add_intervals

    rows = summarize(TRIALS, GRID)
    _patients_files(tmp_path, TRIALS)
    add_intervals(rows, TRIALS, tmp_path, "val", resamples=1000)
    for row in rows:
        lo, hi = row["balanced_accuracy"]["ci95"]
        assert 0 <= lo <= hi <= 1
    result = {"sweep": {"name": "t", "seeds": [0, 1]}, "rows": rows, "best": best_setting(rows), "trials": TRIALS,
              "errors": [{"method": "paste", "threshold": 0.7, "n": 60, "seed": 1, "error": "RuntimeError: boom", "path": "x"}],
              "experiment": str(tmp_path)}
    outputs = write_outputs(result, tmp_path)
    assert Path(outputs["roi"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(outputs["roi"]).stat().st_size > 5000
    with open(outputs["csv"]) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 5 and table[0]["method"] == REAL and table[0]["threshold"] == ""
    assert float(table[1]["balanced_accuracy_mean"]) == pytest.approx(0.85) and table[4]["n_used"] == "41"
    assert float(table[1]["balanced_accuracy_ci95_lo"]) == pytest.approx(rows[1]["balanced_accuracy"]["ci95"][0])
    text = Path(outputs["markdown"]).read_text()
    assert "| real only |  | 0 |" in text and "41 (short in 1)" in text and "0.850 ± 0.071 [" in text
    assert "Best setting: paste, Dice > 0.7, n = 60: validation balanced accuracy 0.950 ± 0.000, 95% interval [" in text
    assert "paste-t0.7-n60 seed 1: RuntimeError: boom" in text
    saved = json.loads(Path(outputs["json"]).read_text())
    assert saved["best"]["n_synthetic"] == 60 and len(saved["rows"]) == 5
    assert math.isnan(summarize([], GRID)[0]["dice"]["mean"])


# ---------------------------------------------------------------------------------------------------
# a tiny sweep on the real Ray cluster

DOWNSTREAM_TINY = [
    "downstream.model.init_features=8", "downstream.model.growth_rate=4", "downstream.model.block_config=[1,1,1,1]",
    "downstream.model.decoder_channels=[16,8,8,8,4]", "downstream.loop.epochs=1", "downstream.loop.batch_size=4",
    "downstream.loop.max_steps=2", "downstream.ray.num_workers=1", "downstream.ray.checkpoint_every_steps=1",
    "downstream.ray.cpus_per_worker=0.5",  # four worker slots on the two one-CPU nodes: the three trials at once
]


def _tiny_paste_run(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A tiny run with a paste store of 12 candidates (all kept, rejected images too): ``(base,
    run_dir, the store's config overrides)``."""
    from engine.synthesis.pipeline import synthesize
    from tests.synth_helpers import make_tiny_run, tiny_config

    base = make_tiny_run(tmp_path_factory.mktemp("sweep"), patients=8)
    run_dir = tmp_path_factory.mktemp("sweep-run")
    store_args = ["synthesis.method=paste", "synthesis.threshold=-1.0", "synthesis.keep_rejected=true",
                  "synthesis.max_candidates=12"]
    synthesize(tiny_config(base, run_dir, store_args), sequential=True, log=lambda _: None)
    return base, run_dir, store_args


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_tiny_sweep_on_ray_tune_writes_its_results_and_resumes_without_rerunning(ray_cluster, tmp_path_factory,
                                                                                  monkeypatch):
    """Three trials (the real-only baseline, two thresholds), their results and Tune's own logs; the
    same call restores them and trains nothing. A credential in the driver's environment reaches no
    file: Ray Tune copies the driver's AWS_* variables into every trial's runtime_env, which Ray's
    runtime-env agent logs in plain text (engine.evaluation.sweep hides them while trials start)."""
    import os
    import secrets

    import zarr

    from engine.evaluation.sweep import sweep
    from tests.conftest import files_holding
    from tests.synth_helpers import tiny_config

    base, run_dir, store_args = _tiny_paste_run(tmp_path_factory)
    dice = np.unique(zarr.open_group(str(run_dir / "synthetic.zarr"), mode="r")["dice"][:])
    strict = float(dice[-3])  # the two highest Dice values lie above it: fewer samples than asked for
    expected = {-1.0: 12, strict: int((zarr.open_group(str(run_dir / "synthetic.zarr"), mode="r")["dice"][:] > np.float32(strict)).sum())}
    # the downstream models train in their trials' own processes (num_workers 0; the Ctrl-C test below
    # drives Ray Train runs from its trials): no Train controller and worker a trial, ~35 s of a core
    cfg = tiny_config(base, run_dir, [*store_args, *DOWNSTREAM_TINY, "downstream.ray.num_workers=0",
                                      "sweep.methods=[paste]", "sweep.n_synthetic=[0,4]",
                                      f"sweep.thresholds=[-1.0,{strict!r}]", "sweep.seeds=[0]", "sweep.name=tiny"])
    log: list[str] = []
    secret = secrets.token_hex(24)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    result = sweep(cfg, log=log.append)

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret  # the driver's own again
    assert files_holding(secret.encode(), run_dir, Path(ray_cluster["temp_dir"])) == []
    assert result["errors"] == [] and not result["restored"] and result["trials_run"] == 3
    assert [(r["method"], r["threshold"], r["n_synthetic"]) for r in result["rows"]] == [
        (REAL, None, 0), ("paste", -1.0, 4), ("paste", strict, 4)]
    by_threshold = {t["threshold"]: t for t in result["trials"]}
    for threshold, available in expected.items():
        trial = by_threshold[threshold]
        assert trial["n_available"] == available and trial["n_used"] == min(4, available)
        assert trial["short"] == (available < 4)
        record = json.loads((run_dir / trial["run"] / "downstream.json").read_text())["config"]
        assert record["n_synthetic"] == trial["n_used"] and record["synthetic_min_dice"] == threshold
        assert record["synthetic"] == str(run_dir / "synthetic.zarr")
    real = by_threshold[None]
    assert real["run"] == "downstream-real-n0-s0" and real["n_used"] == 0
    for trial in result["trials"]:
        # scored on the 2 validation patients, the detection threshold calibrated on the train patients
        assert trial["val_patients"] == 2 and trial["detection_calibrated_on_train"]
        assert 0.0 <= trial["balanced_accuracy"] <= 1.0 and trial["tn"] + trial["fp"] + trial["fn"] + trial["tp"] == 2
    out = run_dir / "sweeps" / "tiny"
    assert result["experiment"] == str(out)
    for name in ("results.csv", "results.md", "roi.png", "sweep.json", "sweep_settings.json"):
        assert (out / name).is_file(), name
    assert (out / "roi.png").read_bytes()[:4] == b"\x89PNG"
    assert "| real only |" in (out / "results.md").read_text()
    trial_dirs = [p for p in out.iterdir() if p.is_dir() and (p / "result.json").is_file()]
    assert len(trial_dirs) == 3  # Tune's own loggers: JSON, CSV and TensorBoard per trial
    assert all((p / "progress.csv").is_file() and list(p.glob("events.out.tfevents*")) for p in trial_dirs)
    exports = {t["run"]: (run_dir / t["run"] / "downstream.json").stat().st_mtime_ns for t in result["trials"]}

    again = sweep(cfg, log=log.append)
    assert again["restored"] and again["trials_run"] == 0 and again["errors"] == []
    assert {t["run"]: t["balanced_accuracy"] for t in again["trials"]} == {t["run"]: t["balanced_accuracy"] for t in result["trials"]}
    assert {run: (run_dir / run / "downstream.json").stat().st_mtime_ns for run in exports} == exports
    assert sum((p / "result.json").read_text().count("\n") for p in trial_dirs) == 3  # no trial reported again
    assert any("resuming" in line for line in log)
    # another grid in the same experiment folder is refused, not mixed in
    other = tiny_config(base, run_dir, [*store_args, *DOWNSTREAM_TINY, "sweep.methods=[paste]", "sweep.n_synthetic=[0,6]",
                                        "sweep.seeds=[0]", "sweep.thresholds=[-1.0]", "sweep.name=tiny"])
    with pytest.raises(ValueError, match="started with other settings"):
        sweep(other, log=log.append)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ctrl_c_stops_the_sweep_without_results_and_the_same_command_resumes_it(ray_cluster, tmp_path_factory,
                                                                               failpoints):
    """`lgesynth sweep` on the cluster, Ctrl-C (SIGINT) while its trial trains: exit 130 with one line
    and no results; the same command restores the experiment and runs the trials that were running.
    (Ray Tune's own handler recorded them as finished without a result and returned: the sweep read
    them as failed, and a restore never ran them again.) The trial's training is held (a fail point)
    at its first checkpoint, where the Ctrl-C lands."""
    import os
    import signal
    import subprocess
    import sys

    from engine.config import dump_config
    from engine.evaluation.sweep import sweep
    from tests.synth_helpers import tiny_config

    from tests.conftest import cluster_holders, cpu_held, cpu_released, interruptible_module, sigint_ignored

    held_before = cpu_held()
    base, run_dir, store_args = _tiny_paste_run(tmp_path_factory)
    cfg = tiny_config(base, run_dir, [*store_args, *DOWNSTREAM_TINY, "sweep.methods=[paste]",
                                      "sweep.n_synthetic=[2]", "sweep.thresholds=[-1.0]", "sweep.seeds=[0]",
                                      "sweep.name=interrupted"])  # one trial: its Train run is what matters
    dump_config(cfg, run_dir / "sweep.yaml")
    out = run_dir / "sweeps" / "interrupted"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"], "PYTHONPATH": str(Path(__file__).parents[1])}
    failpoints.arm("train.checkpoint")
    driver = subprocess.Popen(interruptible_module("engine.cli", "sweep", "--config", str(run_dir / "sweep.yaml")),
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        held = failpoints.wait("train.checkpoint", 180, alive=lambda: driver.poll() is None)
        assert list(out.glob("*/params.json")) and held["pid"] != driver.pid  # a trial's Train worker
        assert not sigint_ignored(driver.pid)
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=120)
    finally:
        driver.kill()
    failpoints.disarm("train.checkpoint")
    assert driver.returncode == 130, err[-3000:]
    assert "lgesynth sweep: interrupted: the finished trials are kept; the same command resumes the sweep" in err
    assert not (out / "sweep.json").exists() and not (out / "results.md").exists()
    again = sweep(cfg, log=lambda _: None)  # the trials of the killed driver die with it
    assert again["restored"] and again["errors"] == [] and again["trials_run"] == 1
    assert [(r["method"], r["threshold"], r["n_synthetic"]) for r in again["rows"]] == [("paste", -1.0, 2)]
    assert (out / "sweep.json").is_file()
    # The killed trial's Train controller often restarts its worker group as it dies: Ray keeps that
    # placement group (0.5 CPU) for good, unless the engine's next run on the cluster releases it
    assert cpu_released(held_before, 15.0), f"the cluster's CPU stays held: {cluster_holders()}"


def test_settings_that_train_the_same_model_are_one_trial_and_report_on_each_setting():
    from engine.evaluation.sweep import expand_trials, trained_settings

    grid = sweep_grid(SweepConfig(methods=["lgesynthnet"], n_synthetic=[0, 15, 30], thresholds=[0.6, 0.7, 0.9]))
    stores = {"lgesynthnet": {"available": {"0.6": 13, "0.7": 30, "0.9": 0}}}
    trained = trained_settings(grid, stores)
    # 0.6: both counts train on all 13 (one model); 0.7: 15 and 30 differ; 0.9: nothing available, kept as asked
    assert trained == [{"method": "real", "threshold": None, "n": 0}, {"method": "lgesynthnet", "threshold": 0.6, "n": 13},
                       {"method": "lgesynthnet", "threshold": 0.7, "n": 15}, {"method": "lgesynthnet", "threshold": 0.7, "n": 30},
                       {"method": "lgesynthnet", "threshold": 0.9, "n": 15}, {"method": "lgesynthnet", "threshold": 0.9, "n": 30}]
    trials = [{**s, "seed": 0, "n_used": min(s["n"], 13 if s["threshold"] == 0.6 else s["n"]), "short": False,
               "balanced_accuracy": 0.5} for s in trained]
    rows = expand_trials(trials, grid, stores)
    assert len(rows) == len(grid)
    at_06 = [r for r in rows if r["threshold"] == 0.6]
    assert [(r["n"], r["n_used"], r["short"]) for r in at_06] == [(15, 13, True), (30, 13, True)]
    assert [(r["n"], r["short"]) for r in rows if r["threshold"] == 0.7] == [(15, False), (30, False)]


def test_one_experiment_at_a_time_in_a_folder_and_a_dead_holder_leaves_no_lock(tmp_path):
    """Two sweeps (or evaluations, loops) in one folder would overwrite each other's Tune state: the
    second is refused at once with the holder's pid; the lock dies with its process (SIGKILL too)."""
    import os
    import subprocess
    import sys

    from engine.evaluation.sweep import experiment_lock

    folder = tmp_path / "sweeps" / "grid"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import pathlib, time; from engine.evaluation.sweep import experiment_lock\n"
         f"with experiment_lock(pathlib.Path({str(folder)!r})):\n"
         "    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"another sweep, evaluation or loop \(pid {holder.pid}\)"):
            with experiment_lock(folder):
                pass
    finally:
        holder.kill()
        holder.wait(30)
    with experiment_lock(folder):  # free again; re-entrant inside its own process
        with experiment_lock(folder):
            assert (folder / ".lock").read_text() == str(os.getpid())
