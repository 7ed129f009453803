"""cluster/: the local multi-node cluster script end to end (start, jobs submitted with the `ray job
submit` CLI, a synthesis job whose driver is killed and which, submitted again, writes only what is
missing, stop touching only its own processes), its command line, and the KubeRay and
cluster-launcher manifests (what they must hold: GPU workers, secrets by reference only, nothing
exposed outside the cluster, entrypoints that are this repository's jobs)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local_cluster.py"
KUBERAY = ROOT / "cluster" / "kuberay"
BIN = Path(sys.executable).parent  # the virtualenv's ray and lgesynth
MARKER_ENV = "LGESYNTH_LOCAL_CLUSTER"  # cluster/local_cluster.py puts it in every process of a cluster

# ---------------------------------------------------------------------------------------------------
# manifests: parsed with yaml.safe_load, checked for what a deployment relies on

# literal secrets that must never sit in a manifest: AWS key ids, private keys, inline secret values
LITERAL_SECRET = re.compile(r"\bA(KIA|SIA)[A-Z0-9]{16}\b|-----BEGIN [A-Z ]*PRIVATE KEY-----|"
                            r"(?i:(secret|password|token|access_key)[a-z_]*\s*[=:]\s*)[A-Za-z0-9/+=]{12,}")
CREDENTIAL_NAME = re.compile(r"(?i)(secret|password|token|credential|access_key|session)")


def _load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _strings(obj):
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)
    elif isinstance(obj, str):
        yield obj


def _pod_specs(cluster_spec: dict) -> dict[str, dict]:
    pods = {"head": cluster_spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in cluster_spec.get("workerGroupSpecs", [])})
    return pods


def _check_ray_cluster_spec(spec: dict) -> None:
    """What every RayCluster spec of this repository must hold (also a RayJob's rayClusterSpec)."""
    assert spec["rayVersion"].startswith("2.") and spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head does no work
    # reachable inside the Kubernetes cluster only: no NodePort / LoadBalancer Service, no Ingress
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and head.get("enableIngress", False) is False
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"] and group["maxReplicas"] > group["minReplicas"]
        for container in group["template"]["spec"]["containers"]:
            assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
    images = set()
    for role, pod in _pod_specs(spec).items():
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), role
        for container in pod["containers"]:
            images.add(container["image"])
            if role == "head":
                assert "nvidia.com/gpu" not in container["resources"].get("limits", {}), "the head has no GPU"
            assert not any(p.get("hostPort") for p in container.get("ports", [])), role
            # object-storage credentials only by reference to a Secret, never inline
            assert any("secretRef" in source for source in container.get("envFrom", [])), role
            for env in container.get("env", []):
                if CREDENTIAL_NAME.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), env["name"]
    # one image, built from this repository (cluster/Dockerfile), not a stock Ray image
    assert len(images) == 1 and "lgesynth" in images.pop()


def _check_no_literal_secrets(path: Path, docs: list[dict]) -> None:
    assert not LITERAL_SECRET.search(path.read_text()), path
    for text in _strings(docs):
        assert not LITERAL_SECRET.search(text), text


def test_the_raycluster_has_a_cpu_head_autoscaled_gpu_workers_secrets_by_reference_and_no_public_endpoint():
    [cluster] = _load(KUBERAY / "raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    _check_ray_cluster_spec(cluster["spec"])
    _check_no_literal_secrets(KUBERAY / "raycluster.yaml", [cluster])
    claims = {d["metadata"]["name"] for d in _load(KUBERAY / "storage.yaml") if d["kind"] == "PersistentVolumeClaim"}
    for pod in _pod_specs(cluster["spec"]).values():
        assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v} <= claims
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert "COPY" in dockerfile and " engine " in dockerfile and " jobs " in dockerfile
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    assert {c["workingDir"] for p in _pod_specs(cluster["spec"]).values() for c in p["containers"]} == {workdir}


def test_every_node_keeps_idle_task_workers_as_the_local_instance_does():
    """Ray's 1 s idle-worker limit restarts the synthesis pipeline's per-shard task workers on any
    node running actors: every way the project starts a node raises it to the engine's minute."""
    from engine.training.distributed import IDLE_WORKER_KEEP_MS

    setting = f"RAY_idle_worker_killing_time_threshold_ms={IDLE_WORKER_KEEP_MS}"
    [cluster] = _load(KUBERAY / "raycluster.yaml")
    for pod in _pod_specs(cluster["spec"]).values():
        for container in pod["containers"]:
            assert {f"{e['name']}={e['value']}" for e in container.get("env", [])} >= {setting}, container["name"]
    assert f"ENV {setting}" in (ROOT / "cluster" / "Dockerfile").read_text()
    aws = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in aws[key] if "ray start" in c]
    assert len(starts) == 2 and all(setting in c for c in starts)
    local = f'"RAY_idle_worker_killing_time_threshold_ms": "{IDLE_WORKER_KEEP_MS}"'
    assert local in (ROOT / "cluster" / "local_cluster.py").read_text()


def _set(path: str, value):
    def mutate(spec: dict) -> None:
        *parents, last = path.split("/")
        node = spec
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return mutate


HEAD_CONTAINER = "headGroupSpec/template/spec/containers/0"
GPU_CONTAINER = "workerGroupSpecs/0/template/spec/containers/0"


@pytest.mark.parametrize("mutate", [
    _set("headGroupSpec/serviceType", "LoadBalancer"),
    _set("headGroupSpec/enableIngress", True),
    _set("headGroupSpec/template/spec/hostNetwork", True),
    _set("headGroupSpec/rayStartParams/num-cpus", "4"),
    _set(f"{GPU_CONTAINER}/resources/limits", {"cpu": "8"}),
    _set(f"{HEAD_CONTAINER}/env", [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]),
    _set(f"{HEAD_CONTAINER}/envFrom", []),
    _set(f"{HEAD_CONTAINER}/image", "rayproject/ray:2.60.0"),
    _set("authOptions/mode", "disabled"),
], ids=["load-balancer", "ingress", "host-network", "head-cpus", "no-gpu", "inline-secret", "no-secret-ref",
        "stock-image", "no-auth"])
def test_the_manifest_checks_catch_what_they_guard_against(mutate):
    [cluster] = _load(KUBERAY / "raycluster.yaml")
    mutate(cluster["spec"])
    with pytest.raises((AssertionError, KeyError)):
        _check_ray_cluster_spec(cluster["spec"])


@pytest.mark.parametrize("text, literal", [
    ("aws_secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", True),
    ("- {name: AWS_ACCESS_KEY_ID, value: AKIAIOSFODNN7EXAMPLE}", True),
    ("RAY_AUTH_TOKEN=9f2c4e1b7a8d6c5e", True),
    ("secretName: lgesynth-ray-token", False),
    ("--from-file=auth_token=$HOME/.ray/auth_token", False),
])
def test_the_literal_secret_pattern(text, literal):
    assert bool(LITERAL_SECRET.search(text)) == literal


@pytest.mark.parametrize("name", ["rayjob-synthesize.yaml", "rayjob-stage.yaml"])
def test_rayjobs_run_a_job_script_of_this_repository_with_a_valid_config_and_no_credentials(name):
    from engine.config import load_config
    from engine.settings import EngineConfig

    [job] = _load(KUBERAY / name)
    [cluster] = _load(KUBERAY / "raycluster.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    _check_no_literal_secrets(KUBERAY / name, [job])
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[0] == "python" and command[1].startswith("jobs/") and (ROOT / command[1]).is_file()
    assert command[2] == "--config" and (ROOT / command[3]).is_file()
    load_config(EngineConfig, ROOT / command[3], command[4:])  # the overrides name real keys with valid values
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    assert not [k for k in runtime_env.get("env_vars", {}) if CREDENTIAL_NAME.search(k)]  # shown on the dashboard
    if "rayClusterSpec" in job["spec"]:  # its own cluster: the same as raycluster.yaml, removed when done
        assert job["spec"]["shutdownAfterJobFinishes"] is True
        assert job["spec"]["rayClusterSpec"] == cluster["spec"]
        _check_ray_cluster_spec(job["spec"]["rayClusterSpec"])
    else:  # the long-lived cluster
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    if name == "rayjob-synthesize.yaml":
        assert command[1] == "jobs/synthesize.py" and any(a.startswith("synthesis.store=s3://") for a in command)


def test_the_aws_launcher_config_uses_instance_profiles_a_gpu_worker_type_and_a_loopback_dashboard():
    path = ROOT / "cluster" / "aws.yaml"
    [config] = _load(path)
    _check_no_literal_secrets(path, [config])
    assert not re.search(r"(?i)aws_(secret_)?access_key", path.read_text())  # no keys, not even empty ones
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu)
    assert all("Arn" in t["node_config"]["IamInstanceProfile"] for t in types.values())
    assert any("pip install" in c and "lgesynth" in c for c in config["setup_commands"])
    assert config["file_mounts"] == {"~/lgesynth": "."}
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "0.0.0.0" not in " ".join(_strings(config))
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "ray start" in c)


# ---------------------------------------------------------------------------------------------------
# the script's command line (no cluster started)


def _script(*args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


@pytest.mark.parametrize("args, code, message", [
    (["--help"], 0, "stop exactly the processes start launched"),
    (["start", "--help"], 0, "--cpus-per-node"),
    (["status", "--help"], 0, "--state"),
    (["stop", "--help"], 0, "--grace-s"),
    (["start", "--workers", "-1", "--state", "{tmp}"], 1, "--workers must be between 0 and"),
    (["start", "--memory-gb", "0", "--state", "{tmp}"], 1, "--memory-gb must be > 0"),
    (["start", "--memory-gb", "0.1", "--state", "{tmp}"], 1, "the object store must hold at least"),
    (["status", "--state", "{tmp}"], 1, "no cluster state here"),
    (["stop", "--state", "{tmp}"], 1, "no cluster state here"),
])
def test_the_script_has_help_on_each_subcommand_and_refuses_bad_input_in_one_line(tmp_path, args, code, message):
    done = _script(*[a.format(tmp=tmp_path) for a in args])
    assert done.returncode == code, done.stderr
    assert message in (done.stdout + done.stderr)
    if code:
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_stop_refuses_a_state_file_it_did_not_write(tmp_path):
    (tmp_path / "cluster.json").write_text('{"nodes": []}')
    done = _script("stop", "--state", str(tmp_path))
    assert done.returncode == 1 and "not a state file written by" in done.stderr


def _state(state_dir: Path, process: subprocess.Popen, temp_dir: Path) -> None:
    import psutil

    node = {"role": "head", "ip": "127.0.0.2", "pid": process.pid, "pgid": process.pid,
            "create_time": psutil.Process(process.pid).create_time(), "log": str(state_dir / "head.log"), "command": []}
    (state_dir / "cluster.json").write_text(json.dumps({
        "format": "lgesynth-local-cluster", "version": 1, "cluster_id": secrets.token_hex(8), "status": "running",
        "address": "127.0.0.2:1", "dashboard_url": "http://127.0.0.1:1", "temp_dir": str(temp_dir),
        "state_dir": str(state_dir), "auth": "token", "nodes": [node]}))


def test_start_refuses_a_busy_dashboard_port_and_a_state_whose_cluster_still_runs(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = _script("start", "--dashboard-port", str(busy.getsockname()[1]), "--state", str(tmp_path / "a"))
    assert done.returncode == 1 and "is in use" in done.stderr and "--dashboard-port" in done.stderr
    assert not (tmp_path / "a" / "cluster.json").exists()
    # a recorded node that still runs (its pid and start time match): refused, nothing started
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        _state(tmp_path, sleeper, tmp_path / "ray-tmp")
        done = _script("start", "--state", str(tmp_path))
        assert done.returncode == 1 and "still running" in done.stderr and "stop --state" in done.stderr
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)


def test_stop_of_a_cluster_that_is_gone_cleans_up_and_touches_no_reused_pid(tmp_path):
    # the recorded head pid now belongs to another process (other start time): not signalled
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        _state(tmp_path, bystander, tmp_path / "ray-tmp")
        state = json.loads((tmp_path / "cluster.json").read_text())
        state["nodes"][0]["create_time"] -= 1000.0
        (tmp_path / "cluster.json").write_text(json.dumps(state))
        (tmp_path / "ray-tmp").mkdir()
        done = _script("stop", "--state", str(tmp_path), "--grace-s", "1")
        assert done.returncode == 0 and "nothing was running" in done.stdout, done.stderr
        assert bystander.poll() is None  # alive
        assert not (tmp_path / "cluster.json").exists() and not (tmp_path / "ray-tmp").exists()
    finally:
        bystander.kill()
        bystander.wait(timeout=10)


# ---------------------------------------------------------------------------------------------------
# a real two-node cluster: a tiny synthesis submitted as a Ray job, its driver killed, then submitted
# again (tests/test_sweep.py plants a secret in a Tune sweep's driver)

# 10 shards of 2 candidates, all kept, slow enough that the driver dies with shards still to make
SYNTHESIS = ["synthesis.threshold=-1.0", "synthesis.max_candidates=20", "synthesis.shard_size=2",
             "synthesis.num_inference_steps=6"]


def _cluster_pids(cluster_id: str) -> list[int]:
    import psutil

    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if process.status() != psutil.STATUS_ZOMBIE and process.environ().get(MARKER_ENV) == cluster_id:
                found.append(process.pid)
    return found


def _other_ray_daemons() -> dict[int, float]:
    """This session's own long-lived Ray processes (the ray_cluster fixture's nodes, when it is up):
    pid -> create time."""
    import psutil

    daemons = {}
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if process.name() in ("gcs_server", "raylet") or "start" in process.cmdline()[2:4]:
                daemons[process.pid] = process.create_time()
    return daemons


def _submit(dashboard: str, submission_id: str, entrypoint: list[str], timeout: float, wait: bool = True) -> str:
    """``ray job submit`` (blocking, logs streamed); the job must end SUCCEEDED. Returns its output.
    Without ``wait``: submitted, not waited for (``--no-wait``)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    # the killed driver's Ray Data resource request lapses 6 s after its last renewal, renewed every
    # 2 s, instead of 30 s after one every 10 s (engine/__init__.py): the job submitted again gets the
    # cluster's CPUs sooner
    runtime_env = json.dumps({"env_vars": {"RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S": "6",
                                           "RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS": "2"}})
    done = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", dashboard, "--submission-id", submission_id,
                           "--runtime-env-json", runtime_env, *([] if wait else ["--no-wait"]), "--", *entrypoint],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if not wait:
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        return done.stdout + done.stderr
    client = JobSubmissionClient(dashboard)
    status = client.get_job_status(submission_id)
    assert done.returncode == 0 and status == JobStatus.SUCCEEDED, (
        f"{submission_id}: {status}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr + client.get_job_logs(submission_id)


def _kill_driver_when_held_and_complete(failpoints, store: Path, count: int, driver_marker: str,
                                       timeout: float = 240.0) -> dict:
    """Once a writer of the job is held before a shard's completion flag (fail point
    ``store.shard_complete``, armed by the caller at a reach after ``count``: the run cannot end
    while it is held, and the earlier reaches complete their shards) and ``count`` shards of the local store are
    complete: SIGKILL the job's driver (the process group Ray's job supervisor started the entrypoint
    in) and return what the store held then: ``{"kept": complete shard indices, "objects": their
    object files -> (inode, mtime_ns)}``."""
    import numpy as np
    import psutil

    from engine.synthesis.store import completed_shards, open_store

    deadline = time.monotonic() + timeout
    failpoints.wait("store.shard_complete", timeout)
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # the store does not exist yet or is being created
            done = completed_shards(open_store(str(store), "r"))
            if done.sum() >= count:
                break
        time.sleep(0.1)
    else:
        raise AssertionError(f"{count} shards of {store} were not complete within {timeout:.0f} s")
    drivers = [p for p in psutil.process_iter(["cmdline"]) if driver_marker in " ".join(p.info["cmdline"] or [])]
    assert drivers, f"no driver process holds {driver_marker!r}"
    for driver in drivers:
        with contextlib.suppress(ProcessLookupError):  # its group is killed already
            os.killpg(os.getpgid(driver.pid), signal.SIGKILL)
    kept = set(np.flatnonzero(completed_shards(open_store(str(store), "r"))).tolist())
    return {"kept": kept, "total": int(done.size), "objects": _shard_objects(store, kept)}


def _shard_objects(store: Path, shards: set[int]) -> dict[str, tuple[int, int]]:
    """The object files of ``shards`` in a local store (``<array>/c/<shard>...``): path -> (inode,
    mtime_ns). The store writes an object as a temporary file renamed over it: a rewrite is a new inode."""
    from tests.synth_helpers import shard_of_object

    objects = {}
    for path in store.rglob("*"):
        key = path.relative_to(store).as_posix()
        if path.is_file() and shard_of_object(key) in shards:
            stat = path.stat()
            objects[key] = (stat.st_ino, stat.st_mtime_ns)
    return objects


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_local_two_node_cluster_runs_submitted_jobs_and_stops_only_itself(tmp_path_factory, failpoints):
    import psutil

    from engine.config import to_dict
    from tests.conftest import files_holding
    from tests.synth_helpers import make_tiny_run, tiny_config

    work = tmp_path_factory.mktemp("cluster")
    state_dir, run_dir = work / "state", work / "run"
    secret = secrets.token_hex(24)  # planted in the cluster's environment: must reach no file
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": secret, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    # a process `ray stop` would kill (it matches default_worker.py): stop must leave it alone
    canary = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)", "default_worker.py"])
    starting = subprocess.Popen([sys.executable, str(SCRIPT), "start", "--workers", "1", "--cpus-per-node", "1",
                                 "--memory-gb", "1.5", "--object-store-gb", "0.2", "--dashboard-port", "0",
                                 "--state", str(state_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    state: dict = {}
    t0 = time.monotonic()

    def phase(what: str) -> None:  # phase timings, shown with -s or on failure
        print(f"[{time.monotonic() - t0:6.1f} s] {what}", flush=True)

    try:
        base = make_tiny_run(work / "tiny")  # while the nodes start
        config = work / "tiny.yaml"
        cfg = tiny_config(base, run_dir, SYNTHESIS)
        config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        phase("tiny run and config written")
        out, err = starting.communicate(timeout=180)
        phase("cluster up")
        assert starting.returncode == 0, f"{out}\n{err}"
        state = json.loads((state_dir / "cluster.json").read_text())
        dashboard = state["dashboard_url"]
        assert f"dashboard: {dashboard}" in out and f"address: {state['address']}" in out
        assert [n["ip"] for n in state["nodes"]] == ["127.0.0.2", "127.0.0.3"]
        assert {n["pgid"] for n in state["nodes"]} == {n["pid"] for n in state["nodes"]}  # each its own group
        # the job API (it runs code) listens on loopback only
        port = int(dashboard.rsplit(":", 1)[1])
        listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
        assert listening == {"127.0.0.1"}
        status = _script("status", "--state", str(state_dir), "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["ray_alive_nodes"] == ["127.0.0.2", "127.0.0.3"]

        # the synthesis job's driver is killed once 2 of its 10 shards are complete and the writer of
        # a third is held before its flag (the cluster's processes share the test session's fail
        # point folder); the job submitted again makes only the shards missing, and no object of a
        # complete shard is written again
        store = run_dir / "synthetic.zarr"
        synthesize = ["python", "jobs/synthesize.py", "--config", str(config)]
        killed_id = f"synthesize-killed-{state['cluster_id']}"
        failpoints.arm("store.shard_complete", at=3)
        logs = _submit(dashboard, killed_id, synthesize, 60, wait=False)
        at_kill = _kill_driver_when_held_and_complete(failpoints, store, 2, f"jobs/synthesize.py --config {config}")
        failpoints.disarm("store.shard_complete")
        phase(f"driver killed with {len(at_kill['kept'])} of {at_kill['total']} shards complete")
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(dashboard)
        deadline = time.monotonic() + 60
        while not client.get_job_status(killed_id).is_terminal():
            assert time.monotonic() < deadline, "the killed driver's job did not end"
            time.sleep(0.5)
        assert client.get_job_status(killed_id) == JobStatus.FAILED
        assert 2 <= len(at_kill["kept"]) < at_kill["total"] and at_kill["objects"]
        logs += _submit(dashboard, f"synthesize-{state['cluster_id']}", synthesize, 240)
        already = int(re.search(r'"shards_already_complete": (\d+)', logs).group(1))
        # Ray kills the dead driver's tasks, but a write task may finish its shard first, after the
        # look above: the job submitted again writes exactly the shards incomplete when it opened the store
        assert already >= len(at_kill["kept"]), logs[-3000:]
        assert re.search(rf'"written": {2 * (10 - already)}\b', logs), logs[-3000:]
        assert _shard_objects(store, at_kill["kept"]) == at_kill["objects"]  # not one rewritten
        phase("synthesize job done")
        check = subprocess.run([str(BIN / "lgesynth"), "check-store", str(store)], capture_output=True, text=True,
                               timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
        summary = json.loads(check.stdout.strip().splitlines()[-1])
        assert summary["problems"] == 0 and summary["rows"] == summary["unique_ids"] == 20, summary
        phase("check-store done")
        assert secret not in logs
    finally:
        canary_before = psutil.Process(canary.pid).create_time()
        others = _other_ray_daemons()
        if starting.poll() is None:
            starting.kill()
        stopped = _script("stop", "--state", str(state_dir), "--keep-temp", timeout=120)
    phase("stopped")
    try:
        assert stopped.returncode == 0, stopped.stderr
        assert not (state_dir / "cluster.json").exists()
        # nothing of that cluster survives: no process carries its marker, its process groups are gone
        assert _cluster_pids(state["cluster_id"]) == []
        deadline = time.monotonic() + 15  # the init process reaps the exited group leaders
        for node in state["nodes"]:
            while True:
                try:
                    os.killpg(node["pgid"], 0)
                except ProcessLookupError:
                    break
                assert time.monotonic() < deadline, f"process group {node['pgid']} ({node['role']}) still exists"
                time.sleep(0.2)
        # ... and nothing else was touched
        assert canary.poll() is None and psutil.Process(canary.pid).create_time() == canary_before
        for pid, created in others.items():
            assert psutil.pid_exists(pid) and psutil.Process(pid).create_time() == created, pid
        # the planted secret reached no output, store, checkpoint, node log or Ray session log
        assert files_holding(secret.encode(), run_dir, state_dir) == []
        temp_dir = Path(state["temp_dir"])
        assert temp_dir.is_dir() and any(temp_dir.glob("session_*/logs/job-driver-*.log"))
        assert files_holding(secret.encode(), temp_dir) == []
    finally:
        canary.send_signal(signal.SIGKILL)
        canary.wait(timeout=10)
        shutil.rmtree(state.get("temp_dir", work / "none"), ignore_errors=True)
