#!/usr/bin/env python3
"""Start, inspect and stop a real multi-node Ray cluster on this machine.

A head node on 127.0.0.2 and N worker nodes on 127.0.0.3, 127.0.0.4, ... (all loopback; 127.0.0.1
as a node IP is silently replaced by the machine's own address), each a ``ray start --block``
process in its own process group, with bounded memory, object store and CPUs per node. The
dashboard (and the job submission API behind it) listens on 127.0.0.1 only; every other port Ray
would take by fixed default (GCS 6379, client server 10001, dashboard agent 52365, worker ports
10002-19999) is a free one, so the cluster starts beside any other Ray instance on the machine.
Token authentication is on unless ``--auth disabled`` (or ``RAY_AUTH_MODE=disabled``) says
otherwise.

Everything ``start`` launched is recorded in ``<state>/cluster.json`` (pids, process groups,
addresses, the dashboard URL, Ray's temp dir), and ``stop`` stops exactly that: SIGTERM to the
recorded process groups, SIGKILL after a grace period, then any process that still carries this
cluster's marker in its environment. It never runs ``ray stop``, which would kill every Ray process
of the user.

    python cluster/local_cluster.py start --workers 1 --cpus-per-node 1 --memory-gb 4 --state runs/cluster
    export RAY_AUTH_MODE=token   # the job client sends the token (~/.ray/auth_token or RAY_AUTH_TOKEN)
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/synthesize.py --config ...
    python cluster/local_cluster.py status --state runs/cluster
    python cluster/local_cluster.py stop --state runs/cluster

Linux routes all of 127.0.0.0/8 to the loopback interface; on macOS add the aliases first
(``sudo ifconfig lo0 alias 127.0.0.2 up``, and so on for each node).
"""

from __future__ import annotations

import argparse
import contextlib
import json
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

STATE_FILE = "cluster.json"
STATE_FORMAT = "lgesynth-local-cluster"
HEAD_IP = "127.0.0.2"
FIRST_WORKER_OCTET = 3  # workers on 127.0.0.3, 127.0.0.4, ...
MAX_WORKERS = 254 - FIRST_WORKER_OCTET + 1
DASHBOARD_HOST = "127.0.0.1"  # the HTTP server that accepts jobs (runs code): loopback only
DEFAULT_DASHBOARD_PORT = 8265
# Every process of a cluster carries this variable (value: the cluster id) in its environment;
# Ray passes the node's environment on to its workers and job drivers.
MARKER_ENV = "LGESYNTH_LOCAL_CLUSTER"
MIN_OBJECT_STORE_BYTES = 80 * 1024**2  # Ray refuses less than 75 MiB
GiB = 1024**3


class ClusterError(Exception):
    """A user-facing error: printed as one message, exit code 1."""


# ------------------------------------------------------------------------------------------------
# small helpers


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_bindable(host: str, port: int = 0, what: str = "") -> None:
    """Raise ClusterError unless ``host:port`` can be bound now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            if port:
                raise ClusterError(f"{host}:{port} is in use ({err.strerror}){what}") from None
            raise ClusterError(
                f"cannot bind {host} ({err.strerror}): this system does not route 127.0.0.0/8 to loopback; "
                f"on macOS add an alias first: sudo ifconfig lo0 alias {host} up") from None


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def _ray_cli() -> str:
    """The ``ray`` executable of this Python (the cluster runs the interpreter that runs this script)."""
    ray_cli = Path(sys.executable).parent / "ray"
    if not ray_cli.is_file():
        raise ClusterError(f"no `ray` next to {sys.executable}: run this script with the project's virtualenv "
                           "(pip install -e . installs ray[default,train,data,tune])")
    return str(ray_cli)


def _tail(path: str | Path, chars: int = 3000) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-chars:]


def _state_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / STATE_FILE


def _write_state(state: dict) -> None:
    path = _state_path(state["state_dir"])
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_state(state_dir: str | Path) -> dict:
    path = _state_path(state_dir)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClusterError(f"{path}: no cluster state here (nothing was started with --state {state_dir})") from None
    except (OSError, ValueError) as err:
        raise ClusterError(f"{path}: unreadable cluster state ({err})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("nodes"), list):
        raise ClusterError(f"{path}: not a state file written by {Path(__file__).name}")
    return state


# ------------------------------------------------------------------------------------------------
# processes of a cluster


def _leader_alive(node: dict) -> bool:
    """Whether the node's ``ray start --block`` process is the one we started and still running."""
    import psutil

    try:
        process = psutil.Process(node["pid"])
        if abs(process.create_time() - node["create_time"]) > 1.0:
            return False  # the pid was reused by something else
        return process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def cluster_processes(cluster_id: str) -> list:
    """Every live process (psutil.Process) whose environment carries this cluster's marker."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.pid == os.getpid() or process.status() == psutil.STATUS_ZOMBIE:
                continue
            if process.environ().get(MARKER_ENV) == cluster_id:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def _signal_cluster(state: dict, sig: int) -> None:
    """Send ``sig`` to the recorded process groups that still hold a process of this cluster, and to
    each process of the cluster outside them (e.g. a job driver Ray started in a session of its own)."""
    ours = cluster_processes(state["cluster_id"])
    groups = {node["pgid"] for node in state["nodes"]}
    for node in reversed(state["nodes"]):  # workers before the head
        if _leader_alive(node) or any(_pgid(p.pid) == node["pgid"] for p in ours):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node["pgid"], sig)
    for process in ours:
        if _pgid(process.pid) not in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(process.pid, sig)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _alive(state: dict) -> list:
    """The cluster's live processes: those carrying its marker, and its recorded ``ray start``
    processes (found even where another user's environment cannot be read)."""
    import psutil

    found = {p.pid: p for p in cluster_processes(state["cluster_id"])}
    for node in state["nodes"]:
        if node["pid"] not in found and _leader_alive(node):
            with contextlib.suppress(psutil.Error):
                found[node["pid"]] = psutil.Process(node["pid"])
    return list(found.values())


def _wait_gone(state: dict, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while True:
        left = _alive(state)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.25)


def _stop_processes(state: dict, grace_s: float) -> list:
    """SIGTERM the cluster's processes, SIGKILL what outlives ``grace_s``; what is left, if anything."""
    _signal_cluster(state, signal.SIGTERM)
    left = _wait_gone(state, grace_s)
    if left:
        _signal_cluster(state, signal.SIGKILL)
        left = _wait_gone(state, 10.0)
    return left


# ------------------------------------------------------------------------------------------------
# start


def _auth_env(mode: str) -> dict[str, str]:
    """The RAY_AUTH_MODE the nodes get; with token auth, make sure a token exists (Ray refuses to
    start a token-auth head without one)."""
    if mode == "disabled":
        return {"RAY_AUTH_MODE": "disabled"}
    if os.environ.get("RAY_AUTH_TOKEN"):
        return {"RAY_AUTH_MODE": "token"}
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token_path:
        if not (os.path.isfile(token_path) and os.path.getsize(token_path) > 0):
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={token_path}: no token there (Ray refuses to start without it)")
        return {"RAY_AUTH_MODE": "token"}
    default = Path.home() / ".ray" / "auth_token"
    if not (default.is_file() and default.stat().st_size > 0):
        # Ray's own CLI writes a new random token to ~/.ray/auth_token (never printed here)
        done = subprocess.run([_ray_cli(), "get-auth-token", "--generate"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_AUTH_MODE": "token"})
        if done.returncode != 0 or not default.is_file():
            raise ClusterError(f"could not create a Ray auth token with `ray get-auth-token --generate`: {done.stderr.strip()}")
        print(f"created a Ray auth token in {default} (ray get-auth-token --generate)", file=sys.stderr)
    return {"RAY_AUTH_MODE": "token"}


def _node_command(ray_cli: str, *, head: bool, ip: str, gcs_address: str, cpus: int, gpus: int,
                  memory: int, object_store: int, dashboard_port: int, temp_dir: str) -> list[str]:
    command = [ray_cli, "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
               f"--memory={memory}", f"--object-store-memory={object_store}",
               # free ports instead of Ray's fixed defaults, which collide with any other Ray on the machine
               f"--dashboard-agent-listen-port={_free_port(ip)}", f"--metrics-export-port={_free_port(ip)}",
               "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats"]
    if head:
        command += ["--head", f"--port={gcs_address.rsplit(':', 1)[1]}", "--include-dashboard=true",
                    f"--dashboard-host={DASHBOARD_HOST}", f"--dashboard-port={dashboard_port}",
                    f"--ray-client-server-port={_free_port(ip)}", f"--temp-dir={temp_dir}"]
    else:
        command += [f"--address={gcs_address}"]
    return command


def _launch(command: list[str], log: Path, env: dict[str, str]) -> dict:
    import psutil

    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)  # its own session and process group
    try:
        create_time = psutil.Process(process.pid).create_time()
    except psutil.NoSuchProcess:
        create_time = 0.0
    return {"pid": process.pid, "pgid": process.pid, "create_time": create_time, "log": str(log),
            "command": command, "_popen": process}


def _public(node: dict) -> dict:
    return {k: v for k, v in node.items() if not k.startswith("_")}


def _alive_ray_nodes(dashboard_url: str) -> list[str]:
    """Node IPs the cluster reports alive, through the dashboard's state API."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=dashboard_url, filters=[("state", "=", "ALIVE")], timeout=10,
                       raise_on_missing_output=False)
    return sorted(n.node_ip for n in nodes)


def _wait_until_up(state: dict, nodes: list[dict], timeout_s: float) -> None:
    expected = sorted(n["ip"] for n in nodes)
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while True:
        for node in nodes:
            if node["_popen"].poll() is not None:
                raise ClusterError(f"the {node['role']} node ({node['ip']}) exited with {node['_popen'].returncode}; "
                                   f"its log ({node['log']}):\n{_tail(node['log'])}")
        try:
            alive = _alive_ray_nodes(state["dashboard_url"])
            if alive == expected:
                return
            last_error = f"alive: {alive or 'none'}"
        except Exception as err:  # the dashboard is still starting
            last_error = f"{type(err).__name__}: {err}"
        if time.monotonic() > deadline:
            raise ClusterError(f"the cluster did not come up within {timeout_s:.0f} s (expected nodes {expected}; "
                               f"{last_error}); logs in {Path(state['state_dir']) / 'logs'} and {state['temp_dir']}")
        time.sleep(0.5)


def start(args: argparse.Namespace) -> int:
    if not 0 <= args.workers <= MAX_WORKERS:
        raise ClusterError(f"--workers must be between 0 and {MAX_WORKERS}, got {args.workers}")
    head_cpus = args.cpus_per_node if args.head_cpus is None else args.head_cpus
    if args.cpus_per_node < 1 or head_cpus < 0 or args.gpus_per_node < 0:
        raise ClusterError("--cpus-per-node must be >= 1, --head-cpus and --gpus-per-node >= 0")
    if not args.memory_gb > 0:
        raise ClusterError(f"--memory-gb must be > 0, got {args.memory_gb}")
    memory = int(args.memory_gb * GiB)
    object_store = int((args.object_store_gb if args.object_store_gb is not None else 0.3 * args.memory_gb) * GiB)
    if object_store < MIN_OBJECT_STORE_BYTES:
        raise ClusterError(f"the object store must hold at least {MIN_OBJECT_STORE_BYTES / GiB:.2f} GiB per node "
                           "(raise --object-store-gb or --memory-gb)")
    if not 0 <= args.dashboard_port <= 65535 or not 0 <= args.port <= 65535:
        raise ClusterError("ports must be between 0 (a free one) and 65535")

    state_dir = Path(args.state).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    if _state_path(state_dir).exists():
        old = _read_state(state_dir)
        if _alive(old):
            raise ClusterError(f"a cluster started with --state {args.state} is still running "
                               f"(dashboard {old.get('dashboard_url')}); stop it first: "
                               f"python {sys.argv[0]} stop --state {args.state}")
    ray_cli = _ray_cli()
    ips = [HEAD_IP] + [f"127.0.0.{FIRST_WORKER_OCTET + i}" for i in range(args.workers)]
    for ip in ips:
        _check_bindable(ip)
    dashboard_port = args.dashboard_port or _free_port(DASHBOARD_HOST)
    _check_bindable(DASHBOARD_HOST, dashboard_port,
                    " (another Ray dashboard?): pass --dashboard-port with a free port, or 0 for any free one")
    gcs_port = args.port or _free_port(HEAD_IP)
    _check_bindable(HEAD_IP, gcs_port, ": pass another --port, or 0 for a free one")

    auth = _auth_env(args.auth)
    cluster_id = secrets.token_hex(8)
    env = {**os.environ, **auth, MARKER_ENV: cluster_id,
           # `python` in job entrypoints is the interpreter (and virtualenv) that runs the cluster
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           # stop promptly: no draining on SIGTERM (meant for Serve replicas on Kubernetes)
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           # idle task workers kept a minute, not 1 s, on nodes running actors (README, "Running on a cluster")
           "RAY_idle_worker_killing_time_threshold_ms": "60000"}
    # short: Ray's unix socket paths under it are limited to 107 characters
    temp_dir = tempfile.mkdtemp(prefix="lgc-", dir="/tmp" if os.path.isdir("/tmp") else None)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    gcs_address = f"{HEAD_IP}:{gcs_port}"
    state = {"format": STATE_FORMAT, "version": 1, "cluster_id": cluster_id, "status": "starting",
             "address": gcs_address, "dashboard_url": f"http://{DASHBOARD_HOST}:{dashboard_port}",
             "dashboard_port": dashboard_port, "temp_dir": temp_dir, "state_dir": str(state_dir),
             "auth": auth["RAY_AUTH_MODE"], "cpus_per_node": args.cpus_per_node, "head_cpus": head_cpus,
             "gpus_per_node": args.gpus_per_node, "memory_bytes": memory, "object_store_bytes": object_store,
             "python": sys.executable, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "nodes": []}
    nodes: list[dict] = []
    started = time.monotonic()
    try:
        for i, ip in enumerate(ips):
            head = i == 0
            command = _node_command(ray_cli, head=head, ip=ip, gcs_address=gcs_address,
                                    cpus=head_cpus if head else args.cpus_per_node, gpus=args.gpus_per_node,
                                    memory=memory, object_store=object_store, dashboard_port=dashboard_port,
                                    temp_dir=temp_dir)
            node = {"role": "head" if head else "worker", "ip": ip,
                    **_launch(command, logs / ("head.log" if head else f"worker-{i}.log"), env)}
            nodes.append(node)
            state["nodes"] = [_public(n) for n in nodes]
            _write_state(state)  # recorded at once: `stop` can clean up even if this script dies now
            if head:  # workers register with the GCS: wait for it to listen
                deadline = time.monotonic() + args.timeout
                while not _port_open(HEAD_IP, gcs_port):
                    if node["_popen"].poll() is not None or time.monotonic() > deadline:
                        raise ClusterError(f"the head node did not start (exit code {node['_popen'].poll()}); "
                                           f"its log ({node['log']}):\n{_tail(node['log'])}")
                    time.sleep(0.2)
        os.environ.update(auth)  # this process asks the dashboard below, as a client
        _wait_until_up(state, nodes, max(1.0, args.timeout - (time.monotonic() - started)))
    except BaseException as err:
        print(f"start failed, stopping what was started: {err}", file=sys.stderr)
        left = _stop_processes(state, grace_s=5.0) if nodes else []
        if not left:
            shutil.rmtree(temp_dir, ignore_errors=True)
            _state_path(state_dir).unlink(missing_ok=True)
        raise
    state["status"] = "running"
    _write_state(state)
    print(f"local Ray cluster up in {time.monotonic() - started:.0f} s: head {HEAD_IP} + {args.workers} worker "
          f"node(s) ({', '.join(ips[1:]) or 'none'}); {args.cpus_per_node} CPU, {args.memory_gb:g} GiB memory, "
          f"{object_store / GiB:.2f} GiB object store per node; token auth {'on' if state['auth'] == 'token' else 'OFF'}")
    print(f"address: {gcs_address}")
    print(f"dashboard: {state['dashboard_url']}")
    print(f"state: {_state_path(state_dir)}")
    print(f"submit: {'RAY_AUTH_MODE=token ' if state['auth'] == 'token' else ''}ray job submit --address "
          f"{state['dashboard_url']} --working-dir . -- python jobs/<stage>.py --config CONFIG [key=value ...]")
    print(f"stop: python {sys.argv[0]} stop --state {args.state}")
    return 0


# ------------------------------------------------------------------------------------------------
# status and stop


def status(args: argparse.Namespace) -> int:
    state = _read_state(args.state)
    processes = _alive(state)
    nodes = [{**n, "running": _leader_alive(n)} for n in state["nodes"]]
    ray_alive: list[str] | str = "not asked (head not running)"
    if nodes and nodes[0]["running"]:
        os.environ.setdefault("RAY_AUTH_MODE", state.get("auth", "token"))
        try:
            ray_alive = _alive_ray_nodes(state["dashboard_url"])
        except Exception as err:
            ray_alive = f"unreachable ({type(err).__name__}: {err})"
    healthy = bool(nodes) and all(n["running"] for n in nodes) and ray_alive == sorted(n["ip"] for n in nodes)
    if args.json:
        print(json.dumps({**state, "nodes": nodes, "processes": len(processes), "ray_alive_nodes": ray_alive,
                          "healthy": healthy}, indent=1, sort_keys=True))
        return 0 if healthy else 1
    print(f"cluster {state['cluster_id']} ({state['status']}): {'healthy' if healthy else 'NOT healthy'}")
    print(f"address: {state['address']}")
    print(f"dashboard: {state['dashboard_url']}")
    for node in nodes:
        print(f"  {node['role']:6} {node['ip']:10} pid {node['pid']:>7}  {'running' if node['running'] else 'gone'}"
              f"  log {node['log']}")
    print(f"processes of this cluster: {len(processes)}; nodes alive according to Ray: {ray_alive}")
    return 0 if healthy else 1


def stop(args: argparse.Namespace) -> int:
    state = _read_state(args.state)
    before = len(_alive(state))
    left = _stop_processes(state, args.grace_s) if before else []
    if left:
        listed = ", ".join(f"{p.pid}" for p in left[:10])
        raise ClusterError(f"{len(left)} process(es) of the cluster survived SIGKILL: {listed}; state kept in "
                           f"{_state_path(args.state)}")
    if not args.keep_temp:
        shutil.rmtree(state["temp_dir"], ignore_errors=True)
    _state_path(args.state).unlink(missing_ok=True)
    what = f"stopped {len(state['nodes'])} node(s), {before} process(es)" if before else "nothing was running"
    print(f"{what}; Ray temp dir {state['temp_dir']} {'kept' if args.keep_temp else 'removed'}; "
          f"node logs in {Path(state['state_dir']) / 'logs'}")
    return 0


# ------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="local_cluster.py",
        description="Start, inspect and stop a multi-node Ray cluster on this machine (loopback addresses, "
                    "dashboard on 127.0.0.1, token auth); stop touches only what start launched.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("start", help="start a head and N worker nodes; wait until all are alive",
                       description="Start a head node (127.0.0.2) and --workers worker nodes (127.0.0.3, ...), each "
                                   "a `ray start --block` process in its own process group; record them in "
                                   "STATE/cluster.json; wait until Ray reports every node alive. Prints the GCS "
                                   "address and the dashboard URL (for `ray job submit --address`).")
    p.add_argument("--workers", type=int, default=1, help="worker nodes besides the head (default 1)")
    p.add_argument("--cpus-per-node", type=int, default=1, help="logical CPUs each node offers (default 1)")
    p.add_argument("--head-cpus", type=int, default=None,
                   help="CPUs of the head node (default: --cpus-per-node; 0 keeps work off the head)")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs each node offers (default 0; nodes on one machine share the same devices)")
    p.add_argument("--memory-gb", type=float, default=2.0,
                   help="logical memory per node in GiB for tasks and actors (default 2; without it each node "
                        "would claim the whole machine)")
    p.add_argument("--object-store-gb", type=float, default=None,
                   help="object store per node in GiB (default 0.3 x --memory-gb)")
    p.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT,
                   help=f"dashboard / job API port on {DASHBOARD_HOST} (default {DEFAULT_DASHBOARD_PORT}; 0: a free one)")
    p.add_argument("--port", type=int, default=0, help="GCS port on the head (default 0: a free one)")
    p.add_argument("--auth", choices=("token", "disabled"),
                   default="disabled" if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" else "token",
                   help="Ray token authentication (default token, unless RAY_AUTH_MODE=disabled); the token is "
                        "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (created when missing)")
    p.add_argument("--state", required=True, help="folder for cluster.json and the node logs (created)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for all nodes (default 120)")
    p.set_defaults(handler=start)

    p = sub.add_parser("status", help="show the recorded nodes and whether Ray reports them alive",
                       description="Show the cluster recorded in STATE/cluster.json: its nodes, whether their "
                                   "processes run, and the nodes Ray reports alive. Exit 0 when healthy, 1 otherwise.")
    p.add_argument("--state", required=True, help="the folder given to start")
    p.add_argument("--json", action="store_true", help="print the state and liveness as JSON")
    p.set_defaults(handler=status)

    p = sub.add_parser("stop", help="stop exactly the processes start launched (never `ray stop`)",
                       description="SIGTERM the recorded process groups, SIGKILL whatever is left after --grace-s, "
                                   "then any process still carrying this cluster's marker; remove Ray's temp dir and "
                                   "the state file. Other Ray instances on the machine are not touched.")
    p.add_argument("--state", required=True, help="the folder given to start")
    p.add_argument("--grace-s", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL (default 15)")
    p.add_argument("--keep-temp", action="store_true", help="keep Ray's temp dir (session logs) after stopping")
    p.set_defaults(handler=stop)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.name != "posix":
        print("local_cluster.py: error: needs a POSIX system (process groups, loopback aliases)", file=sys.stderr)
        return 1
    try:
        return int(args.handler(args))
    except ClusterError as err:
        print(f"local_cluster.py {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"local_cluster.py {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
