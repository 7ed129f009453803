"""engine.failpoints on its own: the N-th reach across processes pauses, the others pass; a paused
process goes on when released or disarmed; unset or unarmed, a point does nothing."""

import json
import subprocess
import sys
import time

import pytest

from engine import failpoints

_REACH = ("import sys; from engine import failpoints; failpoints.reach('synthesis.generate', shard=int(sys.argv[1])); "
          "print('passed', sys.argv[1], flush=True)")


def _reacher(folder, shard: int) -> subprocess.Popen:
    env = {**__import__("os").environ, failpoints.ENV: str(folder)}
    return subprocess.Popen([sys.executable, "-c", _REACH, str(shard)], env=env, stdout=subprocess.PIPE, text=True)


def test_the_armed_reach_across_processes_pauses_until_released(tmp_path):
    failpoints.arm(tmp_path, "synthesis.generate", at=2)
    first = _reacher(tmp_path, 0)
    assert first.communicate(timeout=60)[0].strip() == "passed 0"  # reach 1 passes
    second = _reacher(tmp_path, 1)
    held = failpoints.wait_paused(tmp_path, "synthesis.generate", 60, alive=lambda: second.poll() is None)
    assert held["pid"] == second.pid and held["shard"] == 1 and held["at"] == 2
    third = _reacher(tmp_path, 2)  # reach 3 passes while 2 is held
    assert third.communicate(timeout=60)[0].strip() == "passed 2"
    time.sleep(0.2)
    assert second.poll() is None  # still held
    failpoints.release(tmp_path, "synthesis.generate")
    assert second.communicate(timeout=60)[0].strip() == "passed 1"


def test_disarming_lets_a_held_process_go_and_forgets_the_reaches(tmp_path):
    failpoints.arm(tmp_path, "synthesis.generate")
    held = _reacher(tmp_path, 0)
    failpoints.wait_paused(tmp_path, "synthesis.generate", 60, alive=lambda: held.poll() is None)
    failpoints.disarm(tmp_path, "synthesis.generate")
    assert held.communicate(timeout=60)[0].strip() == "passed 0"
    assert not list(tmp_path.glob("synthesis.generate.*"))
    assert not failpoints.armed("synthesis.generate")


def test_an_unarmed_point_passes_and_a_run_ending_unheld_is_said(tmp_path, monkeypatch):
    monkeypatch.delenv(failpoints.ENV, raising=False)
    failpoints.reach("train.checkpoint", step=1)  # unset: nothing
    monkeypatch.setenv(failpoints.ENV, str(tmp_path))
    failpoints.reach("train.checkpoint", step=1)  # not armed: nothing, no reach counted
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="unknown fail point 'nowhere'"):
        failpoints.reach("nowhere")
    with pytest.raises(ValueError, match="at must be >= 1"):
        failpoints.arm(tmp_path, "train.checkpoint", at=0)
    failpoints.arm(tmp_path, "train.checkpoint", at=5)
    ended = _reacher(tmp_path, 0)  # reaches another point, and ends
    ended.communicate(timeout=60)
    with pytest.raises(TimeoutError, match="the run ended after 0 reach"):
        failpoints.wait_paused(tmp_path, "train.checkpoint", 5, alive=lambda: ended.poll() is None)
    assert json.loads((tmp_path / "train.checkpoint.arm").read_text())["at"] == 5
