"""Where the test suite's time goes: CPU seconds by process role, and each test file's wall time and idle CPU.

    python benchmarks/suite_cpu.py --out /tmp/suite [-- PYTEST ARGS]

Runs ``python -m pytest -q`` (or the given arguments) in a subprocess while a thread of this process
reads ``/proc`` every ``--interval`` seconds: the CPU seconds every process of the machine uses
from then on (a process that lives between two reads is not seen; one that dies loses at most one
interval), grouped by role (Ray sets an actor's title to ``ray::<class>``), and the machine's idle
share from ``/proc/stat``. A pytest plugin (this file, loaded with ``-p``) stamps each test's start
and end, so that the idle share is split by test file. Prints two tables and writes them to
``OUT/suite_cpu.json``. The suite's CI limit is wall time on two cores: a file with much idle CPU
waits (timeouts, polls); one with little is bound by the CPU of the processes it starts.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


# --- the pytest plugin (loaded in the pytest process with -p suite_cpu) ---------------------------

def pytest_runtest_logstart(nodeid, location):
    _stamp("start", nodeid)


def pytest_runtest_logfinish(nodeid, location):
    _stamp("end", nodeid)


def _stamp(kind: str, nodeid: str) -> None:
    with open(os.environ["SUITE_CPU_STAMPS"], "a") as f:
        f.write(json.dumps([time.time(), kind, nodeid]) + "\n")


# --- the sampler ------------------------------------------------------------------------------

def role(cmdline: str) -> str:
    """A process's role from its command line."""
    actor = re.search(r"ray::([\w().]+)", cmdline)
    if actor:
        return "ray::" + actor.group(1).split(".")[0]
    for needle, name in (("raylet", "raylet"), ("gcs_server", "gcs"), ("log_monitor", "log monitor"),
                         ("dashboard", "dashboard"), ("default_worker", "Ray worker starting"),
                         ("pytest", "pytest"), ("engine.cli", "lgesynth command"), ("bin/lgesynth", "lgesynth command"),
                         ("jobs/", "job entrypoint"),
                         ("moto", "moto")):
        if needle in cmdline:
            return name
    return "other: " + " ".join(cmdline.split()[:2])[:60] if cmdline.strip() else "kernel threads"


class Sampler(threading.Thread):
    """Reads every process's CPU time and the machine's idle time until :meth:`stop`."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.done = interval, threading.Event()
        self.processes: dict[str, list] = {}  # "pid:start" -> [cmdline, cpu now, cpu when first seen]
        self.idle: list[tuple[float, float]] = []  # (time, idle share of the interval before it)
        self.start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])

    @staticmethod
    def _cpu_times() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    def run(self) -> None:
        me, last = os.getpid(), self._cpu_times()
        while not self.done.wait(self.interval):
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or int(entry) == me:
                    continue
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                cpu, started = (int(stat[11]) + int(stat[12])) / TICK, int(stat[19])
                seen = self.processes.get(f"{entry}:{started}")
                if seen is None:  # a process older than the run counts from now on
                    seen = self.processes[f"{entry}:{started}"] = [cmdline, cpu, cpu if started < self.start_ticks else 0.0]
                seen[1] = cpu
                if cmdline:  # a zombie's is empty: keep its last title
                    seen[0] = cmdline
            now = self._cpu_times()
            total, idle = now[0] - last[0], now[1] - last[1]
            self.idle.append((time.time(), idle / total if total else 0.0))
            last = now

    def stop(self) -> None:
        self.done.set()
        self.join()


def by_role(processes: dict[str, list]) -> list[dict]:
    roles: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for cmdline, cpu, first in processes.values():
        if cpu - first > 0:
            roles[role(cmdline)][0] += cpu - first
            roles[role(cmdline)][1] += 1
    return [{"role": r, "cpu_s": round(c, 1), "processes": n} for r, (c, n) in sorted(roles.items(), key=lambda x: -x[1][0])]


def by_file(stamps: Path, idle: list[tuple[float, float]], cores: int) -> list[dict]:
    starts, files = {}, collections.defaultdict(lambda: [0.0, 0.0, 0])
    for line in stamps.read_text().splitlines():
        at, kind, nodeid = json.loads(line)
        if kind == "start":
            starts[nodeid] = at
            continue
        begin = starts.pop(nodeid)
        shares = [share for t, share in idle if begin <= t <= at]
        entry = files[nodeid.split("::")[0]]
        entry[0] += at - begin
        entry[1] += (sum(shares) / len(shares) if shares else 0.0) * (at - begin) * cores
        entry[2] += 1
    return [{"file": f, "wall_s": round(w, 1), "idle_core_s": round(i, 1), "idle_share": round(i / w / cores, 3) if w else 0.0,
             "tests": n} for f, (w, i, n) in sorted(files.items(), key=lambda x: -x[1][0])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between two reads of /proc")
    parser.add_argument("pytest_args", nargs="*", default=["-q"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stamps = args.out / "stamps.jsonl"
    stamps.unlink(missing_ok=True)
    env = {**os.environ, "SUITE_CPU_STAMPS": str(stamps),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    sampler = Sampler(args.interval)
    sampler.start()
    began = time.monotonic()
    code = subprocess.call([sys.executable, "-m", "pytest", "-p", "suite_cpu", *args.pytest_args], env=env)
    wall = time.monotonic() - began
    sampler.stop()
    cores = os.cpu_count() or 1
    roles, files = by_role(sampler.processes), by_file(stamps, sampler.idle, cores)
    cpu = sum(r["cpu_s"] for r in roles)
    idle = sum(share for _, share in sampler.idle) / max(1, len(sampler.idle))
    print(f"\npytest exit {code}; wall {wall:.0f} s on {cores} cores; CPU {cpu:.0f} s ({cpu / wall / cores:.0%} of "
          f"the cores' time); idle {idle:.0%}\n\n| role | CPU s | processes |\n|---|---|---|")
    for r in roles[:25]:
        print(f"| {r['role']} | {r['cpu_s']:.1f} | {r['processes']} |")
    print("\n| test file | wall s | idle share | idle core-s | tests |\n|---|---|---|---|---|")
    for f in files:
        if f["wall_s"] >= 1.0:
            print(f"| {f['file']} | {f['wall_s']:.1f} | {f['idle_share']:.0%} | {f['idle_core_s']:.1f} | {f['tests']} |")
    (args.out / "suite_cpu.json").write_text(json.dumps(
        {"exit": code, "wall_s": wall, "cores": cores, "cpu_s": cpu, "idle_share": idle, "roles": roles, "files": files},
        indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
