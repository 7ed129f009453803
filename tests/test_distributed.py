"""The Ray Train harness on a real two-node local cluster: DDP across nodes, checkpoints, resume.

The toy run (``engine.training._toy``): 256 samples, batch 16 per worker, 2 workers -> 8 steps per
epoch; a checkpoint every 4 steps and the 2 newest kept.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from engine.training._toy import toy_model, toy_regression_data, toy_train_fn
from engine.training.checkpoint import PICKLE_SUFFIXES, load_checkpoint, read_checkpoint_state
from engine.training.distributed import (
    IN_PROCESS_MANIFEST,
    InsufficientResourcesError,
    RayTrainConfig,
    check_cluster_resources,
    fit,
    latest_checkpoint_path,
    orphaned_placement_groups,
    release_orphaned_placement_groups,
    storage_path_for,
)


TOY = {"seed": 0, "samples": 256, "batch_size": 16, "epochs": 2}
STEPS_PER_EPOCH = 8


def _cfg(**overrides) -> RayTrainConfig:
    return RayTrainConfig(**{"num_workers": 2, "checkpoint_every_steps": 4, "keep_checkpoints": 2, "max_failures": 2, **overrides})


def _weights(checkpoint_path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    model = toy_model(seed=123)
    state = load_checkpoint(checkpoint_path, models={"toy": model})
    return state, {k: v.clone() for k, v in model.state_dict().items()}


def _mse(weights: dict[str, torch.Tensor]) -> float:
    model = toy_model(seed=0)
    model.load_state_dict(weights)
    x, y = toy_regression_data(seed=0, samples=256)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        [{"num_workers": -1}, "num_workers must be an int >= 0"],
        [{"cpus_per_worker": 0}, "cpus_per_worker must be > 0"],
        [{"backend": "nccl"}, "backend 'nccl' needs use_gpu=True"],
        [{"backend": "mpi"}, "backend must be"],
        [{"mixed_precision": "fp16"}, "mixed_precision must be"],
        [{"max_failures": -2}, "max_failures must be an int >= -1"],
        [{"checkpoint_every_steps": 0}, "checkpoint_every_steps must be an int >= 1"],
        [{"keep_checkpoints": 0}, "keep_checkpoints must be an int >= 1"],
    ],
)
def test_config_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RayTrainConfig(**kwargs)


def test_config_resolves_backend_resources_and_storage(tmp_path, monkeypatch):
    assert RayTrainConfig().resolved_backend == "gloo"
    assert RayTrainConfig(use_gpu=True).resolved_backend == "nccl"
    assert RayTrainConfig(cpus_per_worker=0.5).resources_per_worker == {"CPU": 0.5}
    assert RayTrainConfig(use_gpu=True, gpus_per_worker=0.5).resources_per_worker == {"CPU": 1.0, "GPU": 0.5}
    monkeypatch.chdir(tmp_path)
    assert storage_path_for("runs/a", RayTrainConfig()) == str(tmp_path / "runs" / "a" / "ray")
    assert storage_path_for("s3://bucket/run", RayTrainConfig()) == "s3://bucket/run/ray"
    assert storage_path_for("runs/a", RayTrainConfig(storage_path="elsewhere")) == str(tmp_path / "elsewhere")
    assert latest_checkpoint_path(str(tmp_path / "runs" / "a"), "toy") is None


def test_only_groups_whose_creator_job_and_actor_are_both_gone_are_orphans():
    def group(pg_id, **fields):
        return {"placement_group_id": pg_id, "state": "CREATED", "is_detached": False, "creator_job_dead": True,
                "creator_actor_id": "ab" * 16, **fields}

    actors = {"ab" * 16: "DEAD", "cd" * 16: "ALIVE", "ee" * 16: "RESTARTING"}
    groups = [
        group("orphan"),
        group("creator unknown to the GCS", creator_actor_id="12" * 16),
        group("job alive", creator_job_dead=False),
        group("removed", state="REMOVED"),
        group("detached", is_detached=True),
        group("made by the driver", creator_actor_id="f" * 32),
        group("creator alive", creator_actor_id="cd" * 16),
        group("creator restarting", creator_actor_id="ee" * 16),
        group("pending", state="PENDING"),
    ]
    found = orphaned_placement_groups(groups, actors.get)
    assert [g["placement_group_id"] for g in found] == ["orphan", "creator unknown to the GCS", "pending"]


def test_a_ray_whose_tables_cannot_be_read_removes_nothing_and_says_so_once(monkeypatch, caplog):
    import logging

    from ray._private import state

    import engine.training.distributed as distributed

    def unreadable():
        raise RuntimeError("the GCS tables differ")

    monkeypatch.setattr(state.state, "_connect_and_get_accessor", unreadable)
    monkeypatch.setattr(distributed, "_ORPHAN_LOOKUP_FAILED", [])
    with caplog.at_level(logging.WARNING, logger="engine.training.distributed"):
        assert release_orphaned_placement_groups() == [] and release_orphaned_placement_groups() == []
    said = [r.getMessage() for r in caplog.records if "placement groups left by dead Ray actors" in r.getMessage()]
    assert said == ["could not look for placement groups left by dead Ray actors: RuntimeError: the GCS tables differ"]


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_release_leaves_the_groups_of_live_drivers_and_actors_and_removes_what_it_selects(ray_cluster, monkeypatch):
    """The GCS's own tables, read on the cluster: a group made by this driver and one made by a live
    actor are in use, and stay. The removal itself, on a group the selection is made to name (an
    orphan comes only from a race of Ray's, seen in test_sweep's Ctrl-C test)."""
    import ray
    from ray.util.placement_group import remove_placement_group

    import engine.training.distributed as distributed
    from engine.training._toy import PlacementGroupMaker

    mine = ray.util.placement_group([{"CPU": 0.1}])
    maker = ray.remote(num_cpus=0)(PlacementGroupMaker).remote()
    theirs = ray.get(maker.make.remote({"CPU": 0.1}))
    try:
        ray.get([mine.ready(), theirs.ready()], timeout=30)
        assert release_orphaned_placement_groups() == []
        table = ray.util.placement_group_table()
        assert table[mine.id.hex()]["state"] == table[theirs.id.hex()]["state"] == "CREATED"
        seen = []
        monkeypatch.setattr(distributed, "orphaned_placement_groups", lambda groups, actor_state: seen.extend(groups) or [
            g for g in groups if g["placement_group_id"] == mine.id.hex()])
        assert release_orphaned_placement_groups() == [mine.id.hex()]
        by_id = {g["placement_group_id"]: g for g in seen}
        assert by_id[theirs.id.hex()]["creator_actor_id"] == maker._actor_id.hex()
        assert not by_id[mine.id.hex()]["creator_job_dead"] and by_id[mine.id.hex()]["bundles"] == [{"CPU": 0.1}]
        assert ray.util.placement_group_table()[mine.id.hex()]["state"] == "REMOVED"
        assert ray.util.placement_group_table()[theirs.id.hex()]["state"] == "CREATED"
    finally:
        remove_placement_group(mine)
        remove_placement_group(theirs)
        ray.kill(maker)


@pytest.fixture(scope="module")
def completed_run(ray_cluster, tmp_path_factory):
    """A finished two-epoch toy run: (run_dir, result, final weights, seconds)."""
    run_dir = str(tmp_path_factory.mktemp("toy-run"))
    started = time.perf_counter()
    result = fit(toy_train_fn, TOY, name="toy", run_dir=run_dir, cfg=_cfg())
    seconds = time.perf_counter() - started
    _, weights = _weights(result.checkpoint.path)
    print(f"\n[timing] toy fit, 2 workers x 2 epochs: {seconds:.1f} s")
    return run_dir, result, weights


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_fit_refuses_workers_the_cluster_cannot_hold(ray_cluster, tmp_path):
    with pytest.raises(InsufficientResourcesError, match="cannot hold 3 training workers .* only 2 fit"):
        fit(toy_train_fn, TOY, name="too-many", run_dir=str(tmp_path), cfg=_cfg(num_workers=3))
    with pytest.raises(InsufficientResourcesError, match="only 0 fit"):  # 2 nodes x 1 CPU: no node holds 1.5
        check_cluster_resources(_cfg(num_workers=1, cpus_per_worker=1.5))
    assert not os.path.exists(tmp_path / "ray")


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_two_workers_on_two_nodes_write_safetensors_checkpoints(completed_run, ray_cluster):
    run_dir, result, weights = completed_run
    assert result.metrics["step"] == 2 * STEPS_PER_EPOCH
    assert sorted(result.metrics["node_ips"].split(",")) == sorted(ray_cluster["node_ips"])  # ranks on both nodes
    assert result.path == os.path.join(run_dir, "ray", "toy")
    with warnings.catch_warnings():  # a run polled for its checkpoint prints nothing each time
        warnings.simplefilter("error")
        assert latest_checkpoint_path(run_dir, "toy") == result.checkpoint.path

    checkpoints = sorted(d for d in os.listdir(result.path) if d.startswith("checkpoint_step"))
    assert [d.split("_")[1] for d in checkpoints] == ["step00000012", "step00000016"]  # keep_checkpoints=2
    for directory in checkpoints:
        files = os.listdir(os.path.join(result.path, directory))
        assert files and all(f.endswith((".safetensors", ".json")) for f in files), files
    for _, _, files in os.walk(run_dir):
        assert not [f for f in files if f.endswith(PICKLE_SUFFIXES)]

    state = read_checkpoint_state(result.checkpoint.path)
    assert state["step"] == 16 and state["start_steps"] == [0]
    assert _mse(weights) < 0.5 * _mse(toy_model(seed=0).state_dict())  # it really trained


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_worker_death_resumes_from_the_latest_checkpoint(completed_run, tmp_path):
    _, _, uninterrupted = completed_run
    started = time.perf_counter()
    result = fit(toy_train_fn, {**TOY, "crash_at_step": 6, "crash_rank": 1}, name="toy-crash", run_dir=str(tmp_path), cfg=_cfg())
    print(f"\n[timing] toy fit with rank 1 killed at step 6 and restarted: {time.perf_counter() - started:.1f} s")
    assert (tmp_path / "toy-crash.crashed").exists()  # the worker did die
    state, weights = _weights(result.checkpoint.path)
    assert state["step"] == 16
    assert state["start_steps"] == [0, 4]  # the restarted attempt began at the step-4 checkpoint, not 0
    for key in uninterrupted:  # and ended exactly where the uninterrupted run did
        torch.testing.assert_close(weights[key], uninterrupted[key], rtol=0, atol=0)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_fit_again_with_more_epochs_continues_the_finished_run(completed_run):
    run_dir, first, _ = completed_run
    started = time.perf_counter()
    result = fit(toy_train_fn, {**TOY, "epochs": 3}, name="toy", run_dir=run_dir, cfg=_cfg())
    print(f"\n[timing] second toy fit, one more epoch: {time.perf_counter() - started:.1f} s")
    assert result.metrics["step"] == 3 * STEPS_PER_EPOCH
    assert result.metrics["start_step"] == 2 * STEPS_PER_EPOCH  # continued, not restarted
    state = read_checkpoint_state(result.checkpoint.path)
    assert state["start_steps"] == [0, 16]
    assert result.path == first.path


_DRIVER = """
import sys, ray
from engine.training._toy import toy_train_fn
from engine.training.distributed import RayTrainConfig, fit
ray.init(address=sys.argv[1], logging_level="WARNING")
try:
    fit(toy_train_fn, {**eval(sys.argv[2])}, name="toy-driver", run_dir=sys.argv[3],
        cfg=RayTrainConfig(num_workers=2, checkpoint_every_steps=4, keep_checkpoints=2))
except KeyboardInterrupt as err:
    print(f"interrupted: {err}", file=sys.stderr)
    sys.exit(130)
"""


def _driver_held_at_checkpoint(ray_cluster, run_dir: str, failpoints) -> tuple[subprocess.Popen, int]:
    """A driver process running the toy fit, held (a fail point) at its first checkpoint: the driver
    and that checkpoint's step."""
    failpoints.arm("train.checkpoint")
    from tests.conftest import INTERRUPTIBLE_PREAMBLE

    driver = subprocess.Popen([sys.executable, "-c", INTERRUPTIBLE_PREAMBLE + _DRIVER, ray_cluster["address"], repr(TOY), run_dir],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    held = failpoints.wait("train.checkpoint", 150, alive=lambda: driver.poll() is None)
    assert held["run"] == "toy-driver"
    return driver, held["step"]


def _cpus_back(started: float) -> None:
    import ray

    while ray.available_resources().get("CPU", 0) < 2:  # Ray reclaims the dead job's workers
        assert time.perf_counter() - started < 200, "the dead driver's workers still hold the CPUs"
        time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_fit_after_the_driver_died_resumes_from_its_last_checkpoint(completed_run, ray_cluster, tmp_path,
                                                                     failpoints):
    """The driver dies mid-run twice: Ctrl-C (SIGINT: Ray Train aborts the run; fit raises
    KeyboardInterrupt rather than Ray's bare SystemExit(1)), then, in the driver that continued the
    run, SIGKILL (no cleanup). Each next fit continues from the last checkpoint, and the run ends
    exactly where an uninterrupted one does."""
    _, _, uninterrupted = completed_run
    run_dir = str(tmp_path)
    started = time.perf_counter()
    driver, interrupted_at = _driver_held_at_checkpoint(ray_cluster, run_dir, failpoints)
    try:
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=60)
        assert driver.returncode == 130 and "interrupted: run 'toy-driver' aborted" in err, err[-2000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.communicate()
    assert interrupted_at == 4  # the first checkpoint (every 4 steps of 16)
    assert read_checkpoint_state(latest_checkpoint_path(run_dir, "toy-driver"))["step"] == interrupted_at
    _cpus_back(started)

    driver, killed_at = _driver_held_at_checkpoint(ray_cluster, run_dir, failpoints)  # held at its first checkpoint
    os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-run, without cleanup
    driver.communicate()
    assert killed_at == 8
    assert read_checkpoint_state(latest_checkpoint_path(run_dir, "toy-driver"))["step"] == killed_at
    failpoints.disarm("train.checkpoint")
    _cpus_back(started)

    handler = signal.getsignal(signal.SIGINT)
    result = fit(toy_train_fn, TOY, name="toy-driver", run_dir=run_dir, cfg=_cfg())
    # Ray Train's Ctrl-C handler is not left behind: it swallowed a later Ctrl-C ("aborting" a run long over)
    assert signal.getsignal(signal.SIGINT) is handler
    print(f"\n[timing] interrupted at step >= {interrupted_at}, killed at step >= {killed_at}, then fit again: "
          f"{time.perf_counter() - started:.1f} s")
    state, weights = _weights(result.checkpoint.path)
    assert state["step"] == 16
    starts = state["start_steps"]
    assert len(starts) == 3 and starts[0] == 0, starts
    assert starts[1:] == [interrupted_at, killed_at], starts  # each from the last checkpoint
    for key in uninterrupted:
        torch.testing.assert_close(weights[key], uninterrupted[key], rtol=0, atol=0)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_in_process_run_keeps_checkpoints_and_resumes_like_a_worker_run(ray_cluster, tmp_path):
    """num_workers 0: Ray Train's local mode, with this harness's checkpoints in the run's storage."""
    import json

    run_dir = str(tmp_path)
    cfg = _cfg(num_workers=0)  # world size 1: 16 steps an epoch, a checkpoint every 4, the 2 newest kept
    first = fit(toy_train_fn, {**TOY, "epochs": 1}, name="toy-local", run_dir=run_dir, cfg=cfg)
    experiment = os.path.join(run_dir, "ray", "toy-local")
    names = json.load(open(os.path.join(experiment, IN_PROCESS_MANIFEST)))["checkpoints"]
    assert [n.split("_")[1] for n in names] == ["step00000012", "step00000016"]
    assert sorted(d for d in os.listdir(experiment) if d.startswith("checkpoint")) == names  # older ones removed
    assert first.metrics["step"] == 16 and first.checkpoint.path == os.path.join(experiment, names[-1])
    assert latest_checkpoint_path(run_dir, "toy-local") == first.checkpoint.path
    for _, _, files in os.walk(run_dir):
        assert not [f for f in files if f.endswith(PICKLE_SUFFIXES)]

    resumed = fit(toy_train_fn, {**TOY, "epochs": 2}, name="toy-local", run_dir=run_dir, cfg=cfg)
    state, weights = _weights(resumed.checkpoint.path)
    assert state["step"] == 32 and state["start_steps"] == [0, 16]  # continued, not restarted
    straight = fit(toy_train_fn, {**TOY, "epochs": 2}, name="toy-local-straight", run_dir=run_dir, cfg=cfg)
    _, uninterrupted = _weights(straight.checkpoint.path)
    for key in uninterrupted:  # resuming changed nothing
        torch.testing.assert_close(weights[key], uninterrupted[key], rtol=0, atol=0)
    assert _mse(weights) < 0.5 * _mse(toy_model(seed=0).state_dict())

    with pytest.raises(ValueError, match="last trained in process"):  # Ray's workers only know Ray's snapshot
        fit(toy_train_fn, {**TOY, "epochs": 3}, name="toy-local", run_dir=run_dir, cfg=_cfg())
    with pytest.raises(ValueError, match="keeps its checkpoints on a local path"):
        fit(toy_train_fn, TOY, name="toy-s3", run_dir=run_dir, cfg=_cfg(num_workers=0, storage_path="s3://bucket/x"))
