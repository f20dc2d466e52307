"""Continuous fuzzing: the atheris entry point (``fuzz.entry``) under libFuzzer, with a resumable
corpus, a time budget and live stats.

libFuzzer's own fork mode (``-fork=N -ignore_crashes=1``) runs the workers,
even for one job: a sanitizer abort or a hang in the kernel code ends only
that worker, whose input libFuzzer keeps (``crash-*``/``timeout-*`` in the
work directory, listed in ``FuzzStats.crash_inputs``), and every worker's
corpus is merged back into the corpus directory. Divergences never end a
worker: the entry point saves them itself, atomically, so an interrupted run
loses nothing.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from conformance.corpus import seeds_dir
from conformance.errors import KhoConformError
from conformance.native.build import build, save_bundle
from conformance.native.sanitizer import SANITIZER_ENV, sanitizer_preload
from conformance.source import KernelSource

from .findings import iter_findings
from .stats import FuzzPoint, FuzzStats

FUZZ_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = FUZZ_DIR.parent
ENTRY = FUZZ_DIR / "entry.py"
DICTIONARY = FUZZ_DIR / "kho.dict"
MAX_LEN = 1024  # bytes: the decoder reads ~20 per op, so this covers the longest programs
TAIL = 40  # lines of libFuzzer output kept for error messages

# "#1234 NEW cov: 12 ft: 34 corp: 5/67b lim: 8 exec/s: 90 ..." (in-process) and
# "#1234: cov: 12 ft: 34 corp: 5 exec/s 90 oom/timeout/crash: ..." (fork mode).
_STATS = re.compile(r"^#(\d+):?\s+(?:\w+\s+)?cov: (\d+) ft: (\d+) corp: (\d+)\S*.*?exec/s:? (\d+)")


def worker_env(bundle: Path, flavor: str, crashes_dir: Path | None, launcher: Path) -> dict[str, str]:
    """The workers' environment: they load the runner's own build (the
    bundle), so every worker fuzzes exactly the library the run reports."""
    env = {k: v for k, v in os.environ.items() if k not in ("KHO_FUZZ_SOURCE", "KHO_FUZZ_KERNEL")}
    preload = sanitizer_preload(flavor)
    if preload:
        env.update(SANITIZER_ENV, LD_PRELOAD=preload)
    env.update(
        KHO_FUZZ_BUNDLE=str(bundle), KHO_FUZZ_ARGV0=str(launcher),
        PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")])),
    )
    if crashes_dir is not None:
        env["KHO_FUZZ_CRASHES"] = str(crashes_dir.resolve())
    return env


def _launcher(directory: Path) -> Path:
    """The command libFuzzer's fork mode re-runs for each worker: this
    Python, whatever ``python3`` the PATH would pick."""
    path = directory / "kho-fuzz-entry"
    path.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{ENTRY}' \"$@\"\n")
    path.chmod(0o755)
    return path


def _seed(corpus_dir: Path) -> None:
    corpus_dir.mkdir(parents=True, exist_ok=True)
    if not any(corpus_dir.iterdir()) and seeds_dir().is_dir():
        for seed in seeds_dir().glob("*.bin"):
            shutil.copy2(seed, corpus_dir / seed.name)


def _artifacts(work: Path) -> list[Path]:
    return [p for pattern in ("crash-*", "timeout-*", "oom-*", "leak-*") for p in work.glob(pattern)]


def _table(stats: FuzzStats, label: str) -> Table:
    t = Table(title=f"kho-conform fuzz: {label}", show_header=False)
    for name, value in (("time", f"{stats.seconds:.0f} s"), ("execs", str(stats.execs)),
                        ("exec/s", f"{stats.exec_per_s:.0f}"), ("coverage", f"{stats.coverage} edges, {stats.features} features"),
                        ("corpus", str(stats.corpus)), ("findings", f"{stats.findings} ({len(stats.new_findings)} new)"),
                        ("worker crashes", str(len(stats.crash_inputs)))):
        t.add_row(name, value)
    return t


def run_fuzz(source: KernelSource, page_shift: int = 12, *, corpus_dir: Path, jobs: int = 1, seconds: int = 60,
             crashes_dir: Path = Path("corpus/crashes"), flavor: str = "fuzz", live: bool = True,
             extra_args: tuple[str, ...] = ()) -> FuzzStats:
    """Fuzz ``source`` at ``page_shift`` for ``seconds`` with ``jobs``
    workers; findings go to ``crashes_dir``. Ctrl-C stops early and still
    returns the stats."""
    b = build(source, page_shift, flavor)  # here, so that workers only load it and errors show once
    # libFuzzer runs in the work directory: hand it absolute paths
    corpus_dir, crashes_dir = Path(corpus_dir).resolve(), Path(crashes_dir).resolve()
    _seed(corpus_dir)
    work = corpus_dir.with_name(corpus_dir.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    before = set(iter_findings(crashes_dir))
    artifacts_before = set(_artifacts(work))
    cmd = [sys.executable, str(ENTRY), f"-max_total_time={seconds}", f"-max_len={MAX_LEN}", "-print_final_stats=1",
           f"-artifact_prefix={work}/"]
    if DICTIONARY.exists():
        cmd.append(f"-dict={DICTIONARY}")
    cmd += [f"-fork={jobs}", "-ignore_crashes=1", "-ignore_timeouts=1", "-ignore_ooms=1", *extra_args, str(corpus_dir)]
    env = worker_env(save_bundle(b, work / "target"), flavor, crashes_dir, _launcher(work))

    stats = FuzzStats()
    lines: queue.Queue[str | None] = queue.Queue()
    tail: list[str] = []
    start = time.monotonic()
    # Its own process group: Ctrl-C reaches the runner only, which then stops
    # libFuzzer and all its workers together.
    proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    label = f"{b.source.version} ps{page_shift} {flavor}, {jobs} job{'s' if jobs > 1 else ''}"
    display = Live(_table(stats, label), console=Console(stderr=True), refresh_per_second=4) if live else None

    def refresh() -> None:
        stats.seconds = time.monotonic() - start
        found = set(iter_findings(crashes_dir))
        stats.findings, stats.new_findings = len(found), sorted(found - before)
        stats.crash_inputs = sorted(set(_artifacts(work)) - artifacts_before)
        stats.timeline.append(FuzzPoint(round(stats.seconds, 1), stats.execs, stats.exec_per_s, stats.coverage,
                                        stats.corpus, stats.findings))
        if display:
            display.update(_table(stats, label))

    threading.Thread(target=pump, daemon=True).start()
    if display:
        display.start()
    try:
        next_point = 0.0
        while (line := _next_line(lines)) is not None:
            if line:
                tail = (tail + [line.rstrip()])[-TAIL:]
                if m := _STATS.match(line):
                    stats.execs, stats.coverage, stats.features, stats.corpus, rate = map(int, m.groups())
                    stats.exec_per_s = float(rate)
            if time.monotonic() - start >= next_point:
                refresh()
                next_point = stats.seconds + 1.0
    except KeyboardInterrupt:
        stats.interrupted = True
        _stop(proc)
    finally:
        refresh()
        if display:
            display.stop()
    rc = proc.wait()
    # Fork mode exits non-zero after ignored worker crashes; those are in the stats.
    if rc != 0 and not stats.interrupted and not stats.crash_inputs:
        detail = " | ".join(ln.strip() for ln in tail[-3:])
        raise KhoConformError(f"the fuzzer exited with status {rc}: {detail} (see {work})")
    return stats


def _next_line(lines: queue.Queue[str | None]) -> str | None:
    """The next output line, "" after a quiet quarter second, None at the end."""
    try:
        return lines.get(timeout=0.25)
    except queue.Empty:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to libFuzzer and its workers (they print final stats and exit); kill after 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
