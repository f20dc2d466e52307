"""Process supervision: nothing a kho-conform process starts outlives it,
and none of its temporary directories either, however it ends.

- :func:`guard` starts, once per process, a watchdog in a session of its
  own. The watchdog holds the read end of a pipe whose write end only this
  process holds, so it sees end-of-file when this process ends or execs,
  SIGKILL included. It then kills every process started from this one and
  removes the temporary directories registered with it. Descendants are
  recognised by a token in their environment (``KHO_CONFORM_GUARDS``), which
  they inherit and keep even when they leave their process group or
  session.
- :func:`temp_dir`: a temporary directory, removed on exit or by the watchdog.
- :func:`supervised`: a child in a process group of its own (Ctrl-C on the
  terminal reaches only this process, which then stops the child's whole
  group: SIGTERM, a grace period, SIGKILL).
- :func:`handle_termination`: SIGTERM and SIGHUP raise :class:`Terminated`,
  a ``KeyboardInterrupt``, so the cleanup Ctrl-C gets runs for them too.

Linux only (``/proc``, pidfds). This module imports nothing of the project:
the watchdog runs it as a script.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

GUARDS_ENV = "KHO_CONFORM_GUARDS"  # ":"-separated tokens of the watchdogs a process is under
STOP_GRACE = 5.0  # seconds a stopped group gets to exit on its own before SIGKILL
KILL_WAIT = 10.0  # seconds to wait for killed processes to be gone


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: end the way Ctrl-C does, cleanup included."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def handle_termination() -> None:
    """Raise :class:`Terminated` on SIGTERM and SIGHUP (main thread only). A
    signal ignored at startup stays ignored (``nohup`` keeps working)."""

    def raise_terminated(signum: int, frame: object) -> None:
        raise Terminated(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, raise_terminated)


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal number."""
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


# ---- the watchdog ----------------------------------------------------------------

@dataclass(frozen=True)
class _Guard:
    owner: int  # the pid it watches (a forked child needs its own)
    token: str
    pipe: int  # the write end
    watchdog: subprocess.Popen


_lock = threading.Lock()
_guard: _Guard | None = None


def guard() -> str:
    """Start this process's watchdog if it has none yet; return its token.
    From now on every child inherits the token (``os.environ``). Call it
    after any re-exec (``sanitizer.ensure_process_for``): an exec closes the
    pipe, and the watchdog then does its work."""
    global _guard
    with _lock:
        if _guard is not None and _guard.owner == os.getpid():
            return _guard.token
        token = secrets.token_hex(8)
        read_end, write_end = os.pipe()  # not inheritable: only the watchdog gets the read end, as its stdin
        # Outer watchdogs' tokens stay: to them, this one is part of the family until it is done.
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}
        watchdog = subprocess.Popen([sys.executable, "-I", __file__, token, str(os.getpid())], stdin=read_end,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        os.close(read_end)
        _guard = _Guard(os.getpid(), token, write_end, watchdog)
        os.environ[GUARDS_ENV] = with_token(os.environ.get(GUARDS_ENV, ""), token)
        return token


def with_token(tokens: str, token: str) -> str:
    """A ``KHO_CONFORM_GUARDS`` value with ``token`` added."""
    return ":".join([*filter(None, tokens.split(":")), token])


def _tell(op: str, path: Path) -> None:
    guard()
    assert _guard is not None
    try:
        os.write(_guard.pipe, (json.dumps([op, str(path)]) + "\n").encode())
    except OSError:  # the watchdog is gone; nothing left to tell
        pass


def _watch(token: str, owner: int) -> None:
    """The watchdog: collect registered directories until the owner's pipe
    closes, then kill what the owner started and remove the directories."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    dirs: dict[str, None] = {}
    for line in sys.stdin:
        try:
            op, path = json.loads(line)
        except ValueError:
            continue
        if op == "+":
            dirs[path] = None
        else:
            dirs.pop(path, None)
    kill_tagged(token, exclude={owner})
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)


def tagged(token: str, exclude: set[int] = frozenset()) -> list[int]:
    """Live (not zombie) processes whose environment carries ``token``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude or int(name) == os.getpid():
            continue
        if _carries(int(name), token):
            found.append(int(name))
    return found


def _carries(pid: int, token: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    if (_stat(pid) or ["Z"])[0] == "Z":
        return False
    prefix = GUARDS_ENV.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return token in entry[len(prefix):].decode(errors="replace").split(":")
    return False


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: state, ppid,
    pgrp, ... (None: gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def kill_tagged(token: str, exclude: set[int] = frozenset(), timeout: float = KILL_WAIT) -> None:
    """SIGKILL every process carrying ``token`` until none is left (new ones
    may be forked meanwhile). A pidfd makes sure the pid still names the
    process that was checked."""
    deadline = time.monotonic() + timeout
    while (pids := tagged(token, exclude)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if _carries(pid, token):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(fd)
        time.sleep(0.02)


# ---- temporary directories ---------------------------------------------------------


@contextmanager
def temp_dir(parent: Path | None = None, prefix: str = "kho-conform-") -> Iterator[Path]:
    """A new directory under ``parent`` (default: the system's temporary
    directory), removed on exit; if this process dies first, its watchdog
    removes it. Registered before it exists, so no kill can leak it. The
    caller may rename it away (a finished build): then nothing is removed."""
    path = Path(parent or tempfile.gettempdir()).resolve() / f"{prefix}{secrets.token_hex(6)}"
    _tell("+", path)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        _tell("-", path)


# ---- supervised children -----------------------------------------------------------


@contextmanager
def supervised(cmd: list[str], *, stop_signal: int = signal.SIGTERM, grace: float = STOP_GRACE,
               env: dict[str, str] | None = None, **popen) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` in a new session (its own process group) for the duration
    of the ``with`` block; on exit, however the block ends, stop its whole
    group (:func:`stop`)."""
    token = guard()
    env = dict(os.environ if env is None else env)
    if token not in env.get(GUARDS_ENV, "").split(":"):  # an environment made before guard()
        env[GUARDS_ENV] = with_token(env.get(GUARDS_ENV, ""), token)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        stop(proc, stop_signal, grace)


def stop(proc: subprocess.Popen, stop_signal: int = signal.SIGTERM, grace: float = STOP_GRACE) -> int:
    """Stop ``proc`` and every process of its group: ``stop_signal`` to the
    group, ``grace`` seconds to exit, then SIGKILL for the leader and anyone
    left behind (workers outliving their parent); returns once the group is
    gone. The leader's exit status."""
    if proc.poll() is None:
        _signal_group(proc.pid, stop_signal)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc.pid, signal.SIGKILL)
    rc = proc.wait()
    deadline = time.monotonic() + KILL_WAIT
    while group_members(proc.pid) and time.monotonic() < deadline:
        _signal_group(proc.pid, signal.SIGKILL)
        time.sleep(0.02)
    return rc


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _stat(int(name))) and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(name))
    return members


if __name__ == "__main__":
    _watch(sys.argv[1], int(sys.argv[2]))
