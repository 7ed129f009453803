"""Shared Ray fixtures: one real two-node Ray cluster on loopback for the whole test session.

The cluster is a head on 127.0.0.2 and a worker node on 127.0.0.3 (127.0.0.1 is silently replaced
by the machine's address, see /work/shared/ENVIRONMENT.md), one CPU each, so a two-worker Ray Train
run spans two nodes. Each node is a ``ray start --block`` process this fixture owns, in its own
process group; teardown stops exactly those groups (SIGTERM: ``ray start --block`` then stops the
raylet/GCS it started; SIGKILL after a grace period) and never runs ``ray stop``, which would kill
every Ray process of the user.

Mark Ray tests with ``@pytest.mark.ray`` and a ``@pytest.mark.timeout(...)``: a failed Train run can
keep both CPUs held, and without a timeout the next test would wait forever.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
# The session's own Ray auth token, set before anything imports ray (Ray's token loader caches what
# it first finds, e.g. a stale ~/.ray/auth_token left by an earlier local ray.init()).
# The nodes, this process and the workers share it through the environment, so token auth is on
# and consistent whatever the machine's home folder holds.
TEST_TOKEN = secrets.token_hex(32)
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TEST_TOKEN)
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
# Fake S3 credentials for the moto endpoint, set before the nodes start so Ray workers inherit them
# (credentials come from the environment, never from configs); real ones never reach a test.
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
for _name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_name, None)
# Ray Train's controller polls its workers every 2 s by default: a finished or dead worker group is
# noticed up to 2 s late, on each of the suite's ~20 training runs.
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
# Ray Train starts a PreemptionWatcher actor with every run (a new process: ~3 s of a core here) to
# drain workers of nodes a cloud provider is about to reclaim; two loopback nodes are never reclaimed.
os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
# The session's fail point folder (engine.failpoints), in the environment before the nodes start, so
# that this process, the drivers the tests start and every Ray worker of the session cluster read it:
# a test arms a point there (fixture `failpoints`) to hold a run where an interrupt must land.
FAILPOINTS_DIR = Path(tempfile.mkdtemp(prefix="lgesynth-failpoints-"))
os.environ["LGESYNTH_FAILPOINTS_DIR"] = str(FAILPOINTS_DIR)
NODE_MEMORY = 2 * 1024**3  # logical memory per node; each node would otherwise claim the whole machine
NODE_OBJECT_STORE = 200 * 1024**2
START_TIMEOUT_S = 90


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: needs the session's real two-node Ray cluster (fixture ray_cluster)")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_for_port(host: str, port: int, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}; log:\n{log.read_text()[-4000:]}")
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.25)
    raise TimeoutError(f"Ray head did not open {host}:{port} within {timeout:.0f}s; log:\n{log.read_text()[-4000:]}")


def _start_node(args: list[str], log: Path) -> subprocess.Popen:
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    # No drain on SIGTERM (default: up to 30 s per node, meant for Serve replicas on Kubernetes).
    # The GCS declares a node dead after 5 failed health checks, every 1 s here instead of 3 s (a
    # killed worker node is noticed in ~5 s, not ~15 s).
    # Idle workers kept as long as the engine's clusters keep them.
    from engine.training.distributed import IDLE_WORKER_KEEP_MS

    env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_health_check_period_ms": "1000",
           "RAY_health_check_failure_threshold": "5",
           "RAY_idle_worker_killing_time_threshold_ms": str(IDLE_WORKER_KEEP_MS)}
    # Ports Ray otherwise takes by fixed default (dashboard agent 52365, client server 10001): free
    # ones, so the test cluster starts beside any other Ray instance on the machine.
    ip = next(a.split("=", 1)[1] for a in args if a.startswith("--node-ip-address="))
    ports = [f"--dashboard-agent-listen-port={_free_port(ip)}", f"--metrics-export-port={_free_port(ip)}"]
    if "--head" in args:
        ports.append(f"--ray-client-server-port={_free_port(ip)}")
    with open(log, "wb") as out:
        return subprocess.Popen(
            # No log monitor: the workers' output stays in the node's log folder and does not reach the
            # test's output. A monitor globs that folder twice a second or more: ~12 s of a core over
            # the suite each (59 s for the five of a whole run, test_cluster's two included).
            [ray_cli, "start", "--block", *args, *ports, "--include-log-monitor=false",
             "--num-cpus=1", f"--memory={NODE_MEMORY}", f"--object-store-memory={NODE_OBJECT_STORE}"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,  # own process group
        )


def _stop_nodes(processes: list[subprocess.Popen], grace_s: float = 15.0) -> None:
    """SIGTERM each node's process group, SIGKILL whatever is left after ``grace_s``."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # children that outlived their parent
        process.wait(timeout=10)


_session_nodes: list[subprocess.Popen] = []  # the ray_cluster fixture's `ray start` processes


def in_session_cluster(pid: int) -> bool:
    """Whether process ``pid`` runs in this test process's ray_cluster: each node starts in a session
    of its own and every process Ray starts on it (raylet, workers, actors) keeps that session. A test
    that kills an actor by its process title must not kill another Ray instance's (a second test
    process, a user's own cluster on the machine)."""
    try:
        return os.getsid(pid) in {node.pid for node in _session_nodes}
    except OSError:  # gone
        return False


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node local Ray cluster; the test process is connected to it.

    Yields:
        dict with ``address`` ("127.0.0.2:<port>"), ``node_ips`` ({head, worker}) and ``temp_dir``.
    """
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in the test process; the ray_cluster fixture must connect it")
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: unix socket paths are limited to 107 chars
    port = _free_port(HEAD_IP)
    address = f"{HEAD_IP}:{port}"
    nodes = _session_nodes
    try:
        head_log, worker_log = temp_dir / "head.log", temp_dir / "worker.log"
        nodes.append(_start_node(
            ["--head", f"--node-ip-address={HEAD_IP}", f"--port={port}", "--include-dashboard=false",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            head_log,
        ))
        _wait_for_port(HEAD_IP, port, nodes[0], head_log, START_TIMEOUT_S)
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)

        def start_worker() -> None:
            """Start the worker node (again, after kill_worker) and wait until it is alive: a node of
            the worker's address that Ray did not know before (a count of live nodes would be fooled
            by the killed node, still counted alive until the GCS declares it dead)."""
            known = {n["NodeID"] for n in ray.nodes()}
            nodes.append(_start_node([f"--address={address}", f"--node-ip-address={WORKER_IP}"], worker_log))
            deadline = time.monotonic() + START_TIMEOUT_S
            while not any(n["Alive"] and n["NodeID"] not in known and n["NodeManagerAddress"] == WORKER_IP
                          for n in ray.nodes()):
                if nodes[-1].poll() is not None:
                    raise RuntimeError(f"worker node exited with {nodes[-1].returncode}; log:\n{worker_log.read_text()[-4000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker node did not join within {START_TIMEOUT_S}s; log:\n{worker_log.read_text()[-4000:]}")
                time.sleep(0.25)

        def kill_worker() -> None:
            """SIGKILL the worker node's whole process group (raylet and its workers): a node failure."""
            with contextlib.suppress(ProcessLookupError):
                os.killpg(nodes[-1].pid, signal.SIGKILL)
            nodes[-1].wait(timeout=30)

        start_worker()
        yield {"address": address, "node_ips": {HEAD_IP, WORKER_IP}, "temp_dir": str(temp_dir),
               "kill_worker": kill_worker, "start_worker": start_worker}
    finally:
        ray.shutdown()
        _stop_nodes(nodes)
        shutil.rmtree(temp_dir, ignore_errors=True)



# A non-interactive shell starts a background command with SIGINT ignored, and an ignored signal
# stays ignored across exec: a suite started that way (as a CI runner may start it) hands every child
# a Ctrl-C it never sees, and a test's SIGINT changes nothing (the run goes on to its end). Children a
# test interrupts are started through this, which takes Ctrl-C back as a foreground process does.
_INTERRUPTIBLE = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                  "sys.argv = [sys.argv[1], *sys.argv[2:]]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")


def interruptible_module(module: str, *args: str) -> list[str]:
    """The command line of ``python -m module args...`` whose process takes Ctrl-C (SIGINT) whatever
    this process ignores (see above)."""
    return [sys.executable, "-c", _INTERRUPTIBLE, module, *args]


INTERRUPTIBLE_PREAMBLE = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"


def sigint_ignored(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGINT (its /proc status' ignored-signal mask)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        mask = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn:"))
        return bool(int(mask.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    return False


class FailPoints:
    """The test side of :mod:`engine.failpoints` in the session's folder: ``arm(point, at=1)``, then
    ``wait(point, timeout_s, alive=None)`` for the paused process's record (``pid``, the point's
    info), ``release(point)``; every point is disarmed after the test."""

    def __init__(self, folder: Path):
        self.folder = folder

    def arm(self, point: str, at: int = 1) -> None:
        from engine import failpoints

        failpoints.arm(self.folder, point, at)

    def wait(self, point: str, timeout_s: float, alive=None) -> dict:
        from engine import failpoints

        return failpoints.wait_paused(self.folder, point, timeout_s, alive)

    def release(self, point: str) -> None:
        from engine import failpoints

        failpoints.release(self.folder, point)

    def disarm(self, point: str) -> None:
        from engine import failpoints

        failpoints.disarm(self.folder, point)

    def disarm_all(self) -> None:
        from engine import failpoints

        for point in failpoints.POINTS:
            failpoints.disarm(self.folder, point)


@pytest.fixture
def failpoints():
    """Fail points to hold a run where a test's interrupt, kill or freeze must land (see FailPoints)."""
    points = FailPoints(FAILPOINTS_DIR)
    points.disarm_all()
    try:
        yield points
    finally:
        points.disarm_all()


@pytest.fixture(scope="session", autouse=True)
def _failpoints_folder_removed():
    yield
    shutil.rmtree(FAILPOINTS_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint: moto in server mode on loopback (credentials: the fake ones above).

    Yields:
        the endpoint URL, e.g. ``http://127.0.0.2:PORT``; create buckets with :func:`make_bucket`.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port(HEAD_IP)
    server = ThreadedMotoServer(ip_address=HEAD_IP, port=port, verbose=False)
    server.start()
    try:
        yield f"http://{HEAD_IP}:{port}"
    finally:
        server.stop()


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)


def files_holding(token: bytes, *roots: Path) -> list[str]:
    """The files under ``roots`` (folders or files) whose bytes hold ``token``: a planted secret must
    reach none."""
    hits = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file() and not path.is_symlink() and token in path.read_bytes():
                    hits.append(str(path))
    return hits


def cluster_holders() -> str:
    """What the session cluster holds: CPU free per node, its live actors, its placement groups not
    removed and the Ray worker processes of each node (the state API needs the dashboard, which
    the session cluster runs without: the GCS's tables and /proc)."""
    import ray
    from ray._private import state

    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    free = {ips.get(node, node[:8]): r.get("CPU", 0.0) for node, r in state.available_resources_per_node().items()}
    actors = [f"{a['ActorClassName']} {a['State']} on {ips.get(a['Address'].get('NodeID'), '?')} (pid {a['Pid']})"
              for a in state.actors().values() if a["State"] != "DEAD"]
    groups = [f"{g['name'] or g['placement_group_id'][:8]} {g['state']} {list(g['bundles'].values())} on "
              f"{sorted({ips.get(n, n[:8]) for n in g['bundles_to_node_id'].values()})}"
              for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
    node_ip = {node.pid: next((a.split("=", 1)[1] for a in node.args if a.startswith("--node-ip-address=")), "?")
               for node in _session_nodes}
    workers = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and os.getsid(int(entry)) in node_ip:
                title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                if title.startswith("ray::") and not title.endswith(("DashboardAgent", "RuntimeEnvAgent")):
                    workers.append(f"{title} on {node_ip[os.getsid(int(entry))]} (pid {entry})")
    return f"CPU free {free}; live actors {actors}; placement groups {groups}; worker processes {sorted(workers)}"


def cpu_held() -> dict[str, float]:
    """CPU held per node of the session cluster (by node ID)."""
    from ray._private import state

    total, free = state.total_resources_per_node(), state.available_resources_per_node()
    return {node: r.get("CPU", 0.0) - free.get(node, {}).get("CPU", 0.0) for node, r in total.items()}


def cpu_released(before: dict[str, float], timeout: float) -> bool:
    """Whether, within ``timeout`` s, no node of the session cluster holds more CPU than ``before``
    (:func:`cpu_held` at an earlier time)."""
    deadline = time.monotonic() + timeout
    while any(cpu > before.get(node, 0.0) + 1e-6 for node, cpu in cpu_held().items()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


@pytest.fixture(autouse=True)
def _cluster_cpu_released(request):
    """After each test on the session cluster: a warning, naming what the cluster holds, when the
    test left more CPU held than it found, 5 s after it ended. CPU a test leaves held fails a later
    test that needs a whole node, far from its cause (once in CI, the lost-worker-node tests could not
    start: the Ctrl-C sweep test, long before, had left a placement group of 0.5 CPU on the head)."""
    if "ray_cluster" not in request.fixturenames:
        yield
        return
    import ray

    request.getfixturevalue("ray_cluster")  # started before the first look
    before = cpu_held()
    yield
    if not ray.is_initialized():
        return
    if not cpu_released(before, 5.0):
        import warnings

        warnings.warn(f"{request.node.nodeid} left CPU held 5 s after it ended: {cluster_holders()}", stacklevel=1)
