"""The streaming synthesis pipeline on the session's real two-node Ray cluster: exactly once, every
candidate equal to the sequential loop's, through a killed diffusion actor (with each actor pool
placed on the node it asks for) and a killed worker node (each with a local folder, memory:// and a
real S3 endpoint: moto), a stalled pipeline (local) and a killed driver (S3; memory:// dies with its
driver): a versioned bucket shows that no object of a shard that was complete is written again by
the re-run. tests/test_cluster.py kills the driver of a job submitted to a two-node cluster writing
to a local folder, and re-submits it."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from engine.config import dump_config
from engine.synthesis.check import check_store
from engine.synthesis.pipeline import synthesize
from engine.synthesis.store import completed_shards, open_store, read_store_dataset
from tests.conftest import in_session_cluster, make_bucket
from tests.synth_helpers import make_tiny_run, shard_of_object, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]
QUIET = lambda _: None  # noqa: E731
# slow enough (many sampler steps, small shards) that a failure lands in the middle of the run; all
# kept (threshold -1), so that every stored image is compared with the sequential loop's; a Ray Data
# hang after a failure: the engine restarts the pipeline after 60 s
SLOW = ["synthesis.shard_size=2", "synthesis.num_inference_steps=12", "synthesis.max_candidates=20",
        "synthesis.threshold=-1.0", "synthesis.stall_timeout_s=60"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("synth_ray"))


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """The sequential loop's store of the first 12 candidates (threshold -1: all kept)."""
    cfg = tiny_config(base, tmp_path_factory.mktemp("reference"), ["synthesis.max_candidates=12", "synthesis.threshold=-1.0"])
    synthesize(cfg, sequential=True, log=QUIET)
    return zarr.open_group(cfg.synthesis.store_url(cfg.run_dir), mode="r")


@pytest.fixture(scope="module")
def slow_reference(base, tmp_path_factory):
    """``of(steps)``: the sequential loop's store of the failure runs' config (SLOW) at ``steps``
    sampler steps, made once: what an undisturbed run makes."""
    made = {}

    def of(steps: int):
        if steps not in made:
            cfg = tiny_config(base, tmp_path_factory.mktemp(f"slow_reference_{steps}"),
                              [*SLOW, f"synthesis.num_inference_steps={steps}"])
            synthesize(cfg, sequential=True, log=QUIET)
            made[steps] = zarr.open_group(cfg.synthesis.store_url(cfg.run_dir), mode="r")
        return made[steps]

    return of


def _same_store(url: str, reference, storage_options=None) -> None:
    group = open_store(url, "r", storage_options)
    for name in ("sample_id", "caption", "source", "label", "condition", "passed"):
        assert np.array_equal(group[name][:], reference[name][:]), name
    np.testing.assert_allclose(group["image"][:], reference["image"][:], atol=1e-5)
    np.testing.assert_allclose(group["dice"][:], reference["dice"][:], atol=1e-6)


def test_a_resource_nobody_has_is_refused_before_anything_is_made(ray_cluster, base, tmp_path):
    """Instead of an actor pool waiting for it forever."""
    missing = tiny_config(base, tmp_path, ["synthesis.diffusion.resources={gpu_h100: 1}"])
    with pytest.raises(ValueError, match=r"synthesis.diffusion.resources asks 1 x 1 of 'gpu_h100'; the cluster has 0 "
                                         r"\(no node offers it\)"):
        synthesize(missing, log=QUIET)
    assert not completed_shards(open_store(missing.synthesis.store_url(missing.run_dir))).any()  # nothing made


def _pids(text: str) -> list[int]:
    """Processes of the session's Ray cluster whose command line holds ``text`` (Ray sets actors'
    titles); another Ray instance on the machine may run actors of the same names."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and in_session_cluster(int(entry)):
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                out.append(int(entry))
    return out


def _node_of(pid: int) -> str:
    """The IP of the Ray node that started process ``pid``: its raylet's ``--node_ip_address``
    (Ray workers are the children of their node's raylet); "" when it is gone."""
    with contextlib.suppress(OSError, AttributeError):
        while pid > 1:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "raylet/raylet" in cmdline:
                return re.search(r"--node_ip_address=(\S+)", cmdline).group(1)
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return ""


def _failure_config(kind: str, base, tmp_path, s3_endpoint):
    """The slow tiny run writing to a store of ``kind``: the run's local folder, a bucket of its own
    on the S3 endpoint (versioned: every write of an object is kept, so a rewrite shows), or
    ``memory://`` (written by the driver); ``(cfg, url, storage_options)``."""
    if kind == "local":
        cfg = tiny_config(base, tmp_path, SLOW)
        return cfg, cfg.synthesis.store_url(cfg.run_dir), None
    if kind == "memory":
        url = f"memory://failure-{tmp_path.name}/synthetic.zarr"
        return tiny_config(base, tmp_path, [*SLOW, f"synthesis.store={url}"]), url, None
    import boto3

    bucket = f"failure-{tmp_path.name.lower().replace('_', '-')}"[:63]
    make_bucket(s3_endpoint, bucket)
    boto3.client("s3", endpoint_url=s3_endpoint).put_bucket_versioning(
        Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    url, options = f"s3://{bucket}/run/synthetic.zarr", {"endpoint_url": s3_endpoint}
    cfg = tiny_config(base, tmp_path, [*SLOW, f"synthesis.store={url}",
                                       f"synthesis.storage_options={{endpoint_url: '{s3_endpoint}'}}"])
    return cfg, url, options


def _when_held_and_complete(failpoints, point: str, at: int, url: str, count: int, action, timeout: float = 240.0,
                            storage_options=None) -> dict:
    """In a thread: once a process is held at the ``at``-th reach of fail point ``point`` (armed here:
    the run cannot end while it is held) and ``count`` shards of ``url`` are complete,
    ``action(held)`` with the held process's record; what it saw.

    Held at ``store.shard_complete``, shards complete for certain: the reaches before the held one
    mark theirs. Held at ``synthesis.generate``, maybe none: Ray Data gathers an actor task's output
    rows into one block, so the shards the held task made before are not passed on while it is held."""
    seen: dict = {}
    failpoints.arm(point, at=at)

    def watch():
        deadline = time.monotonic() + timeout
        seen["held"] = failpoints.wait(point, timeout)
        while time.monotonic() < deadline:
            try:
                done = completed_shards(open_store(url, "r", storage_options))
            except Exception:  # noqa: BLE001 - the store does not exist yet or is being created
                done = np.zeros(0, bool)
            if done.size and done.sum() >= count:
                seen["complete_at_action"] = int(done.sum())
                seen["total"] = int(done.size)
                seen["result"] = action(seen["held"])
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    seen["thread"] = thread
    return seen


def _exactly_once(url: str, reference, storage_options=None) -> None:
    """Every candidate of the plan stored once (check-store), and as the undisturbed sequential loop made it."""
    total = reference["sample_id"].shape[0]
    summary, problems = check_store(url, storage_options)
    assert problems == [] and summary["rows"] == total and summary["unique_ids"] == total
    _same_store(url, reference, storage_options)


def _kill_when_held(failpoints, earlier: set[int], timeout: float = 240.0) -> dict:
    """In a thread: SIGKILL the diffusion actor once it is held (fail point ``synthesis.generate``,
    armed here) as it starts its second shard: it has made one and is at work on the next."""
    seen: dict = {}
    failpoints.arm("synthesis.generate", at=2)

    def watch():
        held = failpoints.wait("synthesis.generate", timeout)
        actors = set(_pids("DiffusionActor")) - earlier
        if held["pid"] in actors:
            os.kill(held["pid"], signal.SIGKILL)
            seen["result"] = held
        else:
            seen["not_an_actor"] = (held, sorted(actors))
        failpoints.disarm("synthesis.generate")

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    seen["thread"] = thread
    return seen


def _watch_nodes(roles: tuple[str, ...]) -> dict:
    """In a thread, until ``seen["stop"]`` is set: the nodes (IPs) on which new processes of each role
    (not those running now) ran."""
    earlier = {pid for role in roles for pid in _pids(role)}
    seen: dict = {"nodes": {role: set() for role in roles}, "stop": threading.Event()}

    def watch():
        while not seen["stop"].wait(0.2):
            for role, nodes in seen["nodes"].items():
                nodes.update(_node_of(pid) for pid in _pids(role) if pid not in earlier)
                nodes.discard("")  # a process that ended while looked at

    seen["thread"] = threading.Thread(target=watch, daemon=True)
    seen["thread"].start()
    return seen


@pytest.mark.parametrize("kind", ["local", "memory", "s3"])
def test_killed_diffusion_actor_is_replaced_on_its_node_and_every_candidate_lands_once(
        ray_cluster, base, slow_reference, tmp_path, s3_endpoint, kind, capsys, failpoints):
    """A diffusion actor killed while it generates, as it starts its second shard of 10, is replaced;
    the shards it held are made again and every candidate is stored once, as the sequential loop
    makes it. ``synthesis.*.resources`` place each pool, the replacement too (by Ray's per-node
    resource: the diffusion actors on the head, the filter actor on the worker node, where Ray's own
    placement puts neither on this cluster). The progress lines are read from the store while it
    runs; `lgesynth check-store` passes; the store reads back as a Ray Dataset."""
    from engine.cli import main
    from tests.conftest import HEAD_IP, WORKER_IP

    cfg, url, options = _failure_config(kind, base, tmp_path, s3_endpoint)
    cfg.synthesis.progress_interval_s = 0.5
    cfg.synthesis.diffusion.resources = {f"node:{HEAD_IP}": 0.01}
    cfg.synthesis.filter.resources = {f"node:{WORKER_IP}": 0.01}
    placed = _watch_nodes(("DiffusionActor", "FilterActor"))
    killed = _kill_when_held(failpoints, earlier=set(_pids("DiffusionActor")))
    lines: list[str] = []
    try:
        summary = synthesize(cfg, log=lines.append)
    finally:
        placed["stop"].set()
        placed["thread"].join(5)
        killed["thread"].join(5)
    assert killed.get("result"), f"no diffusion actor was killed: {killed}"
    assert placed["nodes"] == {"DiffusionActor": {HEAD_IP}, "FilterActor": {WORKER_IP}}
    assert summary["written"] == 20 and summary["shards_complete"] == 10 and summary["candidates_per_s"] > 0
    progress = [line for line in lines if " shards complete (" in line]
    assert progress and all(re.match(r"synthesis: \d+ of 10 shards complete \(\d+ of 20 candidates", p) for p in progress)
    reference = slow_reference(cfg.synthesis.num_inference_steps)
    _exactly_once(url, reference, options)
    capsys.readouterr()
    assert main(["check-store", url, *[f"--storage-option=endpoint_url={v}" for v in (options or {}).values()]]) == 0
    assert '"problems": 0' in capsys.readouterr().out
    rows = read_store_dataset(url, storage_options=options).take_all()
    assert sorted(r["sample_id"] for r in rows) == sorted(str(s) for s in reference["sample_id"][:])
    assert rows[0]["image"].shape == (1, 64, 64)


@pytest.mark.parametrize("kind", ["local", "memory", "s3"])
def test_lost_worker_node_and_the_run_completes_once(ray_cluster, base, slow_reference, tmp_path, s3_endpoint, kind,
                                                     failpoints):
    """The worker node, holding the pipeline's actors, is killed while the diffusion actor is at work
    on its third shard of 10 (held there by a fail point, so the run is still going), and a new node
    takes its place (as KubeRay replaces a lost pod): Ray starts the actors again on
    it and every candidate is stored once. ``synthesis.*.resources`` place both pools on the worker
    node, by Ray's per-node resource, which the new node offers again (until it joins, the actors'
    restarts wait for it). A local folder and S3 are written by Ray tasks, on either node; memory://
    by the driver."""
    from tests.conftest import WORKER_IP

    cfg, url, options = _failure_config(kind, base, tmp_path, s3_endpoint)
    cfg.synthesis.diffusion.resources = cfg.synthesis.filter.resources = {f"node:{WORKER_IP}": 0.01}
    earlier = set(_pids("DiffusionActor")) | set(_pids("FilterActor"))
    placed = _watch_nodes(("DiffusionActor", "FilterActor"))
    node = {"killed": False, "replaced": False}

    def kill_and_replace_the_worker_node(held_actor):
        held = {role: sorted({_node_of(pid) for pid in _pids(role) if pid not in earlier} - {""})
                for role in ("DiffusionActor", "FilterActor")}
        held["held_actor_node"] = _node_of(held_actor["pid"])
        node["killed"] = True
        ray_cluster["kill_worker"]()
        failpoints.disarm("synthesis.generate")
        ray_cluster["start_worker"]()
        node["replaced"] = True
        return held

    seen = _when_held_and_complete(failpoints, "synthesis.generate", 3, url, 0, kill_and_replace_the_worker_node,
                                   storage_options=options)
    try:
        summary = synthesize(cfg, log=QUIET)
        seen["thread"].join(5)
        assert seen.get("result"), "the worker node was not killed and replaced"
        assert seen["complete_at_action"] < seen["total"], "the run ended before the node was killed"
        # the actors at work when the node died were on it, the held diffusion actor too
        held = seen["result"]
        assert held == {"FilterActor": [WORKER_IP], "DiffusionActor": [WORKER_IP], "held_actor_node": WORKER_IP}, held
        assert summary["written"] == 20 and summary["shards_complete"] == 10
        _exactly_once(url, slow_reference(cfg.synthesis.num_inference_steps), options)
    finally:
        placed["stop"].set()
        placed["thread"].join(5)
        seen["thread"].join(60)
        if node["killed"] and not node["replaced"]:  # the next tests need the worker node
            ray_cluster["start_worker"]()
    # every actor of the run, the restarted ones too, ran on the worker's IP
    assert placed["nodes"] == {"DiffusionActor": {WORKER_IP}, "FilterActor": {WORKER_IP}}, placed["nodes"]


def test_a_stalled_pipeline_is_started_again_on_the_shards_missing(ray_cluster, base, slow_reference, tmp_path,
                                                                  s3_endpoint, failpoints):
    """A frozen diffusion actor (SIGSTOP: alive to Ray, doing nothing) stalls Ray Data for good; the
    engine notices that no shard completes, stops the pipeline and starts it again on the rest. The
    actor is frozen as it starts its first shard (held there by a fail point)."""
    cfg, url, _ = _failure_config("local", base, tmp_path, s3_endpoint)
    # the frozen pipeline is stopped after 24 s; the restarted one's new actors get 48 s to start and
    # store a shard: on a loaded two-core VM their start alone took 30 s (a window of 20 s stalled
    # the restart too, once in CI)
    cfg.synthesis.stall_timeout_s, cfg.synthesis.stall_restarts = 24.0, 1
    cfg.synthesis.num_inference_steps = 4  # the actor is frozen as it starts: no need of a slow run
    frozen: list[int] = []
    failpoints.arm("synthesis.generate")

    def freeze_the_first_diffusion_actor():  # as it starts its first shard
        pid = failpoints.wait("synthesis.generate", 120)["pid"]
        assert pid in set(_pids("DiffusionActor")) - earlier  # not a previous run's, on its way out
        os.kill(pid, signal.SIGSTOP)
        frozen.append(pid)
        failpoints.disarm("synthesis.generate")  # the restarted pipeline's actor goes on

    def log(line: str) -> None:
        lines.append(line)
        if "pipeline stalled" in line:  # Ray killed the frozen actor: let it take the kill (else each
            for pid in frozen:  # call of Ray's that asks every worker waits 60 s for it)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    lines, earlier = [], set(_pids("DiffusionActor"))
    freezer = threading.Thread(target=freeze_the_first_diffusion_actor, daemon=True)
    freezer.start()
    try:
        summary = synthesize(cfg, log=log)
        freezer.join(5)
        assert frozen, "no diffusion actor process was found to freeze"
        assert summary["written"] == 20 and summary["shards_complete"] == 10
        stalled = [line for line in lines if "pipeline stalled" in line]
        assert len(stalled) == 1 and "restart 1 of 1, waiting up to 48 s" in stalled[0], lines
        _exactly_once(url, slow_reference(cfg.synthesis.num_inference_steps))
    finally:
        for pid in frozen:  # gone if it took Ray's kill
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_pipeline_that_stalls_every_time_stops_with_the_complete_shards_kept(base, tmp_path, monkeypatch, capsys):
    """Out of restarts: `lgesynth synthesize` ends with one line that says what to do, exit 1. No Ray
    needed to see it: the pipeline run is replaced by one that never completes a shard."""
    import engine.synthesis.pipeline as pipeline
    import engine.training.distributed as distributed
    from engine.cli import main

    config = tmp_path / "run.yaml"
    dump_config(tiny_config(base, tmp_path, [*SLOW, "synthesis.stall_timeout_s=1", "synthesis.stall_restarts=1"]),
                config)
    runs = []

    def never_done(self, todo, log):
        runs.append(list(todo))
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(distributed, "connect", lambda address="": None)
    monkeypatch.setattr(pipeline, "check_pools_fit", lambda syn: None)
    monkeypatch.setattr(pipeline.SynthesisJob, "_run_ray_once", never_done)
    assert main(["synthesize", "--config", str(config)]) == 1
    assert runs == [list(range(10))] * 2
    out, err = capsys.readouterr()
    assert out.count("the Ray pipeline stalled; starting it again") == 1
    assert err.startswith("lgesynth synthesize: error: ") and err.count("\n") == 1, err
    assert "(restart 1 of 1, waiting up to 2 s for a shard)" in out  # twice the first window
    assert re.search(r"stalled 2 time\(s\), the last with no shard completing for 2 s; 10 shard\(s\) missing.*re-run",
                     err), err


def _writes(url: str, shards, storage_options) -> dict:
    """How often the objects of ``shards`` were written: their number of versions in the versioned
    bucket (a rewrite adds one)."""
    import boto3

    bucket, prefix = url[len("s3://"):].split("/", 1)
    client = boto3.client("s3", endpoint_url=storage_options["endpoint_url"])
    versions: dict[str, int] = {}
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        for version in page.get("Versions", []):
            if shard_of_object(version["Key"][len(prefix) + 1:]) in shards:
                versions[version["Key"]] = versions.get(version["Key"], 0) + 1
    return versions


def test_killed_driver_then_rerun_writes_only_what_is_missing(ray_cluster, base, slow_reference, tmp_path, s3_endpoint,
                                                              failpoints):
    cfg, url, options = _failure_config("s3", base, tmp_path, s3_endpoint)
    # killed once 2 of the 10 shards are complete and a third one's writer is held before its flag
    cfg.synthesis.num_inference_steps = 4
    config = tmp_path / "run.yaml"
    dump_config(cfg, config)
    # The killed driver's Ray Data resource request (which keeps the cluster's CPUs from the re-run)
    # lapses 6 s after its last renewal, renewed every 2 s, instead of 30 s after one every 10 s
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"], "PYTHONPATH": str(Path(__file__).parents[1]),
           "RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S": "6", "RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS": "2"}
    seen = _when_held_and_complete(failpoints, "store.shard_complete", 3, url, 2,
                                   lambda held: os.killpg(driver.pid, signal.SIGKILL) or True, storage_options=options)
    log = tmp_path / "driver.log"
    with open(log, "wb") as out:
        driver = subprocess.Popen([sys.executable, "-m", "engine.cli", "synthesize", "--config", str(config)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        driver.wait(timeout=300)
        seen["thread"].join(5)
        assert seen.get("result"), (f"the driver was not killed (exit {driver.returncode}, watcher saw {seen}); "
                                    f"its output:\n{log.read_text()[-4000:]}")
        failpoints.disarm("store.shard_complete")
        group = open_store(url, "r", options)
        done = completed_shards(group)
        assert 2 <= done.sum() < done.size
        kept = set(np.flatnonzero(done).tolist())
        before = _writes(url, kept, options)
        # every object of a complete shard written once, its flag among them
        assert set(before.values()) == {1} and sum("shard_complete/" in key for key in before) == len(kept)
        summary = synthesize(cfg, log=QUIET)
        # Ray kills the dead driver's tasks, but a write task may finish its shard first, after the
        # look above: the re-run writes exactly the shards incomplete when it opened the store
        assert summary["shards_already_complete"] >= len(kept)
        assert summary["written"] == 2 * (10 - summary["shards_already_complete"])
        assert summary["shards_complete"] == 10
        assert _writes(url, kept, options) == before  # the complete shards were not rewritten
        _exactly_once(url, slow_reference(cfg.synthesis.num_inference_steps), options)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)


def test_a_read_call_without_kept_samples_leaves_the_columns_typed(ray_cluster, reference, tmp_path, monkeypatch):
    """A Ray Data read call whose shards kept nothing (common at a pass rate of a few percent) adds
    no rows rather than an empty batch, which Ray Data would type as pickled objects and null texts:
    where it is the first block, that became the dataset's schema."""
    import shutil

    import engine.synthesis.store as store

    url = str(tmp_path / "copy.zarr")
    shutil.copytree(reference.store_path.store.root, url)
    group = open_store(url, "r+")
    passed = np.asarray(group["passed"][:], bool)
    passed[:4] = False  # shard 0 (shards of 4) keeps nothing
    group["passed"][:] = passed
    monkeypatch.setattr(store, "SHARDS_PER_READ_TASK", 1)  # one shard a read call
    dataset = read_store_dataset(url).materialize()
    assert dataset.count() == passed.sum() == 8
    schema = dataset.schema()
    types = dict(zip(schema.names, schema.types, strict=True))
    assert types["image"].extension_name == "ray.data.arrow_tensor_v2", schema
    assert types["image"].shape == (1, 64, 64) and str(types["caption"]) == "string", schema
    # the same store in memory://, which only this process sees: read here, the same rows and types
    import fsspec

    in_memory = f"memory://read-call-{tmp_path.name}/copy.zarr"
    fsspec.filesystem("memory").put(url, in_memory, recursive=True)
    copied = read_store_dataset(in_memory).materialize()
    assert dict(zip(copied.schema().names, copied.schema().types, strict=True)) == types
    assert sorted(r["sample_id"] for r in copied.take_all()) == sorted(r["sample_id"] for r in dataset.take_all())
    batch = next(iter(dataset.select_columns(["image", "dice"]).iter_torch_batches(batch_size=8)))
    assert batch["image"].shape == (8, 1, 64, 64)
    from engine.synthesis.store import SyntheticDataset

    samples = SyntheticDataset(url)  # the same samples, value for value, as the torch Dataset's
    rows = {row["sample_id"]: row for row in dataset.take_all()}
    assert sorted(rows) == sorted(samples[i]["sample_id"] for i in range(len(samples)))
    for i in range(len(samples)):
        row = rows[samples[i]["sample_id"]]
        for key, value in samples[i].items():
            assert np.array_equal(np.asarray(row[key]), np.asarray(value)), key
            assert np.asarray(row[key]).dtype == np.asarray(value).dtype, key
