"""Continuous fuzzing: the atheris entry point (``fuzz.entry``) under libFuzzer, with a resumable
corpus, a time budget and live stats.

libFuzzer's own fork mode (``-fork=N -ignore_crashes=1``) runs the workers,
even for one job: a sanitizer abort or a hang in the kernel code ends only
that worker, whose input libFuzzer keeps (``crash-*``/``timeout-*`` in the
work directory ``<corpus>.work``, listed in ``FuzzStats.crash_inputs``), and
every worker's corpus is merged back into the corpus directory. Divergences
never end a worker: the entry point saves them itself, atomically, so an
interrupted run loses nothing.

Nothing outlives the run (``conformance.processes``): libFuzzer and its
workers form one supervised process group, stopped together however the
run ends, even by SIGKILL; libFuzzer's temporary directories (``TMPDIR``),
the build bundle the workers load and half-written findings live in
directories the run owns and removes.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from conformance.compare.triage import load_known
from conformance.corpus import seeds_dir
from conformance.errors import KhoConformError
from conformance.native.build import build, save_bundle
from conformance.native.sanitizer import SANITIZER_ENV, sanitizer_preload
from conformance.processes import Terminated, supervised, temp_dir
from conformance.source import KernelSource
from conformance.source.identity import handover_label

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


def _libfuzzer(seconds: int, artifacts: Path) -> list[str]:
    """The entry point under libFuzzer, as every run starts it.

    ``-entropic_scale_per_exec_time``: an input that keeps the kernel code
    at its CPU budget (a range of 2^60 pages) costs as much as a hundred
    ordinary ones, and its mutants are as slow; libFuzzer then picks faster
    inputs more often (up to 30x), which multiplies the programs a run
    compares. Such inputs stay in the corpus and are still mutated."""
    return [sys.executable, str(ENTRY), f"-max_total_time={seconds}", f"-max_len={MAX_LEN}", "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/", "-entropic_scale_per_exec_time=1",
            *([f"-dict={DICTIONARY}"] if DICTIONARY.exists() else [])]


def worker_env(bundle: Path, flavor: str, crashes_dir: Path | None, launcher: Path,
               staging: Path | None = None, next_bundle: Path | None = None) -> dict[str, str]:
    """The workers' environment: they load the runner's own build (the
    bundle; and ``next_bundle``, the next kernel's, for a handover across
    versions), so every worker fuzzes exactly the libraries the run reports;
    findings are written in ``staging`` (a directory the run owns, beside
    ``crashes_dir``) and renamed into place."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("KHO_FUZZ_SOURCE", "KHO_FUZZ_KERNEL", "KHO_FUZZ_NEXT_SOURCE", "KHO_FUZZ_NEXT_KERNEL",
                        "KHO_FUZZ_NEXT_BUNDLE")}
    preload = sanitizer_preload(flavor)
    if preload:
        env.update(SANITIZER_ENV, LD_PRELOAD=preload)
    env.update(
        KHO_FUZZ_BUNDLE=str(bundle), KHO_FUZZ_ARGV0=str(launcher),
        PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")])),
    )
    if crashes_dir is not None:
        env["KHO_FUZZ_CRASHES"] = str(crashes_dir.resolve())
    if staging is not None:
        env["KHO_FUZZ_STAGING"] = str(staging)
    if next_bundle is not None:
        env["KHO_FUZZ_NEXT_BUNDLE"] = str(next_bundle)
    return env


def _launcher(directory: Path) -> Path:
    """The command libFuzzer's fork mode re-runs for each worker: this
    Python, whatever ``python3`` the PATH would pick."""
    path = directory / "kho-fuzz-entry"
    path.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{ENTRY}' \"$@\"\n")
    path.chmod(0o755)
    return path


def _make_dirs(dirs: dict[str, Path]) -> None:
    """Create the run's directories (named for the user as the key says);
    one line for a path that cannot be one."""
    for flag, path in dirs.items():
        if path.exists() and not path.is_dir():
            raise KhoConformError(f"{flag} {path} is a file, not a directory; give a directory (it is created if missing)")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KhoConformError(f"{flag} {path}: cannot create it ({e.strerror}); give a writable directory") from None


def _inputs(corpus_dir: Path) -> int:
    """Inputs libFuzzer reads from a corpus directory (it recurses)."""
    return sum(1 for p in corpus_dir.rglob("*") if p.is_file())


def _seed(corpus_dir: Path, scratch: Path) -> int:
    """Copy the seeds into an empty corpus; each file appears whole (written
    in ``scratch``, on the same file system, and renamed). How many."""
    if any(corpus_dir.iterdir()) or not seeds_dir().is_dir():
        return 0
    seeds = sorted(seeds_dir().glob("*.bin"))
    for seed in seeds:
        shutil.copy2(seed, scratch / seed.name)
        shutil.move(scratch / seed.name, corpus_dir / seed.name)
    return len(seeds)


def _artifacts(work: Path) -> list[Path]:
    return [p for pattern in ("crash-*", "timeout-*", "oom-*", "leak-*") for p in work.glob(pattern)]


def _table(stats: FuzzStats, label: str) -> Table:
    t = Table(title=f"kho-conform fuzz: {label}", show_header=False)
    for name, value in (("time", f"{stats.seconds:.0f} s"), ("execs", str(stats.execs)),
                        ("exec/s", f"{stats.exec_per_s:.0f}"), ("coverage", f"{stats.coverage} edges, {stats.features} features"),
                        ("corpus", f"{stats.corpus} (started from {stats.started_from})"), ("findings", f"{stats.findings} ({len(stats.new_findings)} new)"),
                        ("worker crashes", str(len(stats.crash_inputs)))):
        t.add_row(name, value)
    return t


def run_fuzz(source: KernelSource, page_shift: int = 12, *, corpus_dir: Path, jobs: int = 1, seconds: int = 60,
             crashes_dir: Path = Path("corpus/crashes"), flavor: str = "fuzz", live: bool = True,
             extra_args: tuple[str, ...] = (), return_on_interrupt: bool = True,
             next_source: KernelSource | None = None) -> FuzzStats:
    """Fuzz ``source`` (handing over to ``next_source``'s next kernel, if
    given) at ``page_shift`` for ``seconds`` with ``jobs`` workers; findings
    go to ``crashes_dir``. Ctrl-C stops early and still
    returns the stats (``return_on_interrupt``; else it propagates, as
    SIGTERM and SIGHUP always do, once libFuzzer is stopped)."""
    if seconds <= 0:
        raise KhoConformError(f"fuzzing time {seconds} s: give a positive number of seconds")
    if jobs < 1:
        raise KhoConformError(f"{jobs} jobs: give 1 or more workers")
    load_known()  # a broken known-finding record: one error here, not one per worker
    # libFuzzer runs in the work directory: hand it absolute paths
    corpus_dir, crashes_dir = Path(corpus_dir).resolve(), Path(crashes_dir).resolve()
    work = corpus_dir.with_name(corpus_dir.name + ".work")  # libFuzzer's crash-*/timeout-* inputs are kept here
    _make_dirs({"CORPUS_DIR": corpus_dir, "--crashes": crashes_dir, "the work directory beside CORPUS_DIR": work})
    b = build(source, page_shift, flavor)  # here, so that workers only load it and errors show once
    new = build(next_source, page_shift, flavor) if next_source is not None else None
    kernels = handover_label(source.version, next_source.version) if next_source is not None else source.version
    label = f"{kernels} ps{page_shift} {flavor}, {jobs} job{'s' if jobs > 1 else ''}"
    console = Console(stderr=True)
    # The run's own directories: beside the corpus (not /tmp, which may be
    # noexec: the launcher is run from there) and beside the findings (a
    # finding is renamed into place, within one file system).
    with temp_dir(work, prefix=".run-") as tmp, temp_dir(crashes_dir, prefix=".saving-") as staging:
        stats = FuzzStats(started_from=_inputs(corpus_dir))
        seeded = _seed(corpus_dir, tmp)
        if live:
            console.print(f"{corpus_dir}: resuming from {stats.started_from} inputs" if stats.started_from
                          else f"{corpus_dir}: new corpus, {seeded} seed inputs", highlight=False)
        stats.started_from += seeded
        (tmp / "tmp").mkdir()
        next_bundle = save_bundle(new, tmp / "next-target") if new is not None else None
        env = {**worker_env(save_bundle(b, tmp / "target"), flavor, crashes_dir, _launcher(tmp), staging, next_bundle),
               "TMPDIR": str(tmp / "tmp")}  # libFuzzer's FuzzWithFork directories, removed with tmp
        cmd = [*_libfuzzer(seconds, work), f"-fork={jobs}", "-ignore_crashes=1", "-ignore_timeouts=1", "-ignore_ooms=1",
               *extra_args, str(corpus_dir)]
        display = Live(_table(stats, label), console=console, refresh_per_second=4) if live else None
        try:
            rc, tail = _supervise(cmd, env, work, stats, crashes_dir, display, label, return_on_interrupt)
        finally:
            if display:
                display.stop()
                console.line()  # what follows starts on a line of its own, terminal or not
    # Fork mode exits non-zero after ignored worker crashes; those are in the stats.
    if rc != 0 and not stats.interrupted and not stats.crash_inputs:
        detail = " | ".join(ln.strip() for ln in tail[-3:])
        raise KhoConformError(f"the fuzzer exited with status {rc}: {detail} (see {work})")
    return stats


_FINAL = re.compile(r"^stat::(number_of_executed_units|average_exec_per_sec):\s+(\d+)")


def run_entry(source: KernelSource, page_shift: int = 12, *, corpus_dir: Path, crashes_dir: Path, seconds: int,
              flavor: str = "fuzz") -> FuzzStats:
    """The entry point in one libFuzzer process (no fork: one core) for
    ``seconds``, from the seeds: how many programs it compared, by
    libFuzzer's own count. For measuring; ``run_fuzz`` is for fuzzing."""
    corpus_dir, crashes_dir = Path(corpus_dir).resolve(), Path(crashes_dir).resolve()
    _make_dirs({"CORPUS_DIR": corpus_dir, "--crashes": crashes_dir})
    b = build(source, page_shift, flavor)
    stats = FuzzStats()
    with temp_dir(corpus_dir.parent, prefix=".run-") as tmp, temp_dir(crashes_dir, prefix=".saving-") as staging:
        stats.started_from = _seed(corpus_dir, tmp) or _inputs(corpus_dir)
        (tmp / "tmp").mkdir()
        env = {**worker_env(save_bundle(b, tmp / "target"), flavor, crashes_dir, _launcher(tmp), staging),
               "TMPDIR": str(tmp / "tmp")}
        cmd = [*_libfuzzer(seconds, tmp), str(corpus_dir)]
        start = time.monotonic()
        with supervised(cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        errors="replace") as proc:
            output, _ = proc.communicate()
        stats.seconds = time.monotonic() - start
    final = dict(m.groups() for line in output.splitlines() if (m := _FINAL.match(line)))
    if "number_of_executed_units" not in final:
        tail = " | ".join(output.strip().splitlines()[-3:])
        raise KhoConformError(f"the fuzzer exited with status {proc.returncode} before its final stats: {tail}")
    stats.execs = int(final["number_of_executed_units"])
    stats.exec_per_s = float(final["average_exec_per_sec"])
    return stats


def _supervise(cmd: list[str], env: dict[str, str], work: Path, stats: FuzzStats, crashes_dir: Path,
               display: Live | None, label: str, return_on_interrupt: bool) -> tuple[int, list[str]]:
    """Run libFuzzer and follow its output into ``stats`` until it ends or
    Ctrl-C; (its exit status, the last lines of its output)."""
    before = set(iter_findings(crashes_dir))
    artifacts_before = set(_artifacts(work))
    lines: queue.Queue[str | None] = queue.Queue()
    tail: list[str] = []
    start = time.monotonic()

    def refresh() -> None:
        stats.seconds = time.monotonic() - start
        found = set(iter_findings(crashes_dir))
        stats.findings, stats.new_findings = len(found), sorted(found - before)
        stats.crash_inputs = sorted(set(_artifacts(work)) - artifacts_before)
        stats.timeline.append(FuzzPoint(round(stats.seconds, 1), stats.execs, stats.exec_per_s, stats.coverage,
                                        stats.corpus, stats.findings))
        if display:
            display.update(_table(stats, label))

    # Its own process group: Ctrl-C reaches the runner only, which then stops
    # libFuzzer and all its workers together (conformance.processes), with
    # SIGTERM: fork mode ignores SIGINT while its jobs run (glibc's system()).
    with supervised(cmd, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                    errors="replace") as proc:

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

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
        except KeyboardInterrupt as e:
            stats.interrupted = True
            if isinstance(e, Terminated) or not return_on_interrupt:
                raise  # the cleanup runs on the way out
    refresh()  # with what the workers saved while they were stopped
    return proc.returncode, tail


def _next_line(lines: queue.Queue[str | None]) -> str | None:
    """The next output line, "" after a quiet quarter second, None at the end."""
    try:
        return lines.get(timeout=0.25)
    except queue.Empty:
        return ""
