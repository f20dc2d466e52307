"""conformance.processes: whatever ends a process, what it started ends too
and its temporary directories go."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, child_env

from conformance import processes

# A process that starts a guarded family: a child in a session of its own,
# a grandchild that leaves that session too (as libFuzzer's workers could),
# and a registered temporary directory; then it waits to be killed.
_FAMILY = r"""
import subprocess, sys, time
from conformance import processes
cm = processes.temp_dir(prefix="guarded-")
path = cm.__enter__()
child = subprocess.Popen(["sh", "-c", "setsid sleep 300 & echo $!; exec sleep 300"], stdout=subprocess.PIPE,
                         text=True, start_new_session=True)
print(path, child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_until(condition, timeout: float = 10.0) -> float:
    """Seconds until ``condition()`` held; fails the test after ``timeout``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_guard_kills_the_family_and_removes_its_dirs(tmp_path, sig):
    env = {**child_env(), "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", _FAMILY], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    path, child, grandchild = proc.stdout.readline().split()
    pids = [proc.pid, int(child), int(grandchild)]
    assert Path(path).is_dir() and all(map(alive, pids))
    wait_until(lambda: processes.group_members(int(child)) == [int(child)])  # the grandchild left the group
    proc.send_signal(sig)
    proc.wait(10)
    wait_until(lambda: not any(map(alive, pids)) and not Path(path).exists(), timeout=5)
    assert not list(tmp_path.iterdir())


def test_tagged_finds_descendants_by_token(tmp_path):
    token = "t" + os.urandom(4).hex()
    env = {**child_env(), processes.GUARDS_ENV: processes.with_token(os.environ.get(processes.GUARDS_ENV, ""), token)}
    proc = subprocess.Popen(["sh", "-c", "setsid sleep 300 & exec sleep 300"], env=env, start_new_session=True)
    wait_until(lambda: len(processes.tagged(token)) == 2)
    assert proc.pid in processes.tagged(token)
    processes.kill_tagged(token)
    assert processes.tagged(token) == []
    proc.wait(5)


def test_supervised_stops_the_whole_group():
    cmd = ["sh", "-c", "sleep 300 & sleep 300 & wait"]
    with processes.supervised(cmd) as proc:
        wait_until(lambda: len(processes.group_members(proc.pid)) == 3)
    assert proc.returncode is not None and processes.group_members(proc.pid) == []


def test_supervised_kills_after_the_grace_period():
    # ignores SIGTERM: stopped by SIGKILL once the grace period is over
    cmd = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); "
                                 "time.sleep(300)"]
    start = time.monotonic()
    with processes.supervised(cmd, grace=0.5, stdout=subprocess.PIPE) as proc:
        proc.stdout.readline()
    assert proc.returncode == -signal.SIGKILL and 0.5 <= time.monotonic() - start < 5


def test_supervised_stops_on_an_exception():
    with pytest.raises(RuntimeError), processes.supervised(["sleep", "300"]) as proc:
        raise RuntimeError
    assert proc.returncode == -signal.SIGTERM


def test_temp_dir_is_removed_on_an_exception(tmp_path):
    with pytest.raises(RuntimeError), processes.temp_dir(tmp_path, prefix=".x-") as path:
        (path / "f").write_text("x")
        raise RuntimeError
    assert not list(tmp_path.iterdir())


_TERMINATED = r"""
import signal, sys, time
from conformance import processes
processes.handle_termination()
try:
    print(signal.getsignal(signal.SIGHUP) == signal.SIG_IGN, flush=True)
    time.sleep(30)
except KeyboardInterrupt as e:
    print(type(e).__name__, processes.exit_code(e), flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_termination_is_an_interrupt(sig):
    proc = subprocess.Popen([sys.executable, "-c", _TERMINATED], stdout=subprocess.PIPE, text=True, cwd=REPO, env=child_env())
    assert proc.stdout.readline().strip() == "False"
    proc.send_signal(sig)
    assert proc.communicate(timeout=10)[0].split() == ["Terminated", str(128 + sig)]


def test_ignored_hangup_stays_ignored():
    proc = subprocess.Popen(["nohup", sys.executable, "-c", _TERMINATED], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=REPO, env=child_env())
    assert proc.stdout.readline().strip() == "True"
    proc.terminate()
    proc.communicate(timeout=10)
