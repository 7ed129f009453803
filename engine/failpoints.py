"""Fail points: named places in the engine where a test (or an operator reproducing a failure) can
hold a run, so that what it does next (a Ctrl-C, a killed actor, node or driver, a frozen process)
lands at a point the run has certainly reached and not yet passed, whatever the machine's speed.

The protocol is a folder named by ``LGESYNTH_FAILPOINTS_DIR``, shared by every process of the run
(the driver, its Ray workers on every node: one machine, or a shared filesystem). Unset, every fail
point is a dictionary lookup and nothing else.

* ``<dir>/<point>.arm`` (JSON ``{"at": N, "id": ...}``) arms ``point``: the N-th time any process
  reaches it, that process pauses there; every other reach passes.
* The paused process first writes ``<dir>/<point>.paused`` (JSON: ``point``, ``at``, ``pid``, ``host``
  and what the point adds, e.g. the shard or the training step), atomically, then waits until
  ``<dir>/<point>.release`` exists or the arming it paused under is gone (disarmed, or armed anew);
  a test that kills the paused process never releases it.
* Each reach takes a number by creating ``<dir>/<point>.reach.<k>`` exclusively, so the N-th reach is
  the N-th across processes.

The points:

| point | reached | info |
|---|---|---|
| ``store.shard_complete`` | by a shard's writer, its objects stored, just before its completion flag | ``shard`` |
| ``synthesis.generate`` | by a diffusion (or paste, SPADE, ControlNet) actor, as it starts a shard | ``shard`` |
| ``train.checkpoint`` | by rank 0 of a Ray Train run (or the in-process run), once a checkpoint it reported is committed | ``run``, ``step`` |

:func:`arm`, :func:`wait_paused`, :func:`release` and :func:`disarm` are the test side.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable

ENV = "LGESYNTH_FAILPOINTS_DIR"
POINTS = ("store.shard_complete", "synthesis.generate", "train.checkpoint")
POLL_S = 0.02


def _folder() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


def _check(point: str) -> None:
    if point not in POINTS:
        raise ValueError(f"unknown fail point {point!r}; the engine's are {', '.join(POINTS)}")


def armed(point: str) -> bool:
    """Whether ``point`` is armed (cheap: an environment lookup, and one ``stat`` when the folder is set)."""
    folder = _folder()
    return folder is not None and (folder / f"{point}.arm").exists()


def _take_number(folder: Path, point: str) -> int:
    """This reach's number among all processes' reaches of ``point`` (1, 2, ...)."""
    k = 1
    while True:
        try:
            os.close(os.open(folder / f"{point}.reach.{k}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return k
        except FileExistsError:
            k += 1


def reach(point: str, before_pause: Callable[[], None] | None = None, **info: Any) -> None:
    """Mark that this process reached ``point``; pause here if it is the armed reach (see the module
    docstring). ``before_pause`` runs first when this reach pauses (e.g. waiting until a checkpoint
    is committed, so that whoever acts on the pause sees it)."""
    _check(point)
    folder = _folder()
    if folder is None:
        return
    arm = folder / f"{point}.arm"
    if not arm.exists():
        return
    arming = _arming(arm)
    if arming is None:  # disarmed just now
        return
    at = int(arming.get("at", 1))
    number = _take_number(folder, point)
    if number != at:
        return
    if before_pause is not None:
        before_pause()
    paused = folder / f"{point}.paused"
    partial = folder / f".{point}.paused.{os.getpid()}"
    record = {"point": point, "at": at, "pid": os.getpid(), "host": socket.gethostname(), **info}
    partial.write_text(json.dumps(record))
    os.replace(partial, paused)
    release_file = folder / f"{point}.release"
    while not release_file.exists() and _arming(arm) == arming:
        time.sleep(POLL_S)


def _arming(arm: Path) -> dict[str, Any] | None:
    """The content of an arm file; None when there is none."""
    try:
        text = arm.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError as err:
        raise ValueError(f"{arm}: not a fail point arm file ({err})") from None


# ---------------------------------------------------------------------------------------- test side
def arm(folder: str | Path, point: str, at: int = 1) -> None:
    """Arm ``point`` in ``folder`` (the ``LGESYNTH_FAILPOINTS_DIR`` of the processes to hold): its
    ``at``-th reach pauses. Clears what an earlier arming of the point left."""
    _check(point)
    if at < 1:
        raise ValueError(f"at must be >= 1, got {at}")
    disarm(folder, point)
    Path(folder, f"{point}.release").unlink(missing_ok=True)
    partial = Path(folder, f".{point}.arm.{os.getpid()}")
    partial.write_text(json.dumps({"at": at, "id": uuid.uuid4().hex}))
    os.replace(partial, Path(folder, f"{point}.arm"))


def wait_paused(folder: str | Path, point: str, timeout_s: float,
                alive: Callable[[], bool] | None = None) -> dict[str, Any]:
    """The record of the process paused at ``point`` once one is (see the module docstring).

    Raises:
        TimeoutError: nothing paused there within ``timeout_s`` (or ``alive()`` turned false first:
            the run ended without reaching it).
    """
    paused = Path(folder, f"{point}.paused")
    deadline = time.monotonic() + timeout_s
    while not paused.exists():
        reaches = len(list(Path(folder).glob(f"{point}.reach.*")))
        if alive is not None and not alive():
            raise TimeoutError(f"fail point {point}: the run ended after {reaches} reach(es), none paused")
        if time.monotonic() > deadline:
            raise TimeoutError(f"fail point {point}: nothing paused within {timeout_s:g} s ({reaches} reach(es))")
        time.sleep(POLL_S)
    return json.loads(paused.read_text())


def release(folder: str | Path, point: str) -> None:
    """Let the process paused at ``point`` go on (and any that pause there later)."""
    _check(point)
    Path(folder, f"{point}.release").touch()


def disarm(folder: str | Path, point: str) -> None:
    """Disarm ``point`` and forget its reaches; a process paused there goes on."""
    _check(point)
    folder = Path(folder)
    (folder / f"{point}.arm").unlink(missing_ok=True)
    for path in folder.glob(f"{point}.reach.*"):
        path.unlink(missing_ok=True)
    (folder / f"{point}.paused").unlink(missing_ok=True)


__all__ = ["ENV", "POINTS", "arm", "armed", "disarm", "reach", "release", "wait_paused"]
