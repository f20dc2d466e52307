"""Continuous fuzzing: the atheris entry point (``fuzz.entry``) under libFuzzer, with a resumable
corpus, a time budget and live stats.

The runner keeps ``jobs`` libFuzzer processes fuzzing in-process, one core
each, for the whole run. A sanitizer abort, a libFuzzer timeout or an
out-of-memory in the kernel code ends only that worker: libFuzzer keeps its
input (``crash-*``/``timeout-*``/``oom-*`` in the work directory
``<corpus>.work``, listed in ``FuzzStats.crash_inputs``) and the runner
starts the worker again for the time left, without that input if it came
from the corpus, so that one bad input cannot stop a run. libFuzzer's crash
handler is not async-signal-safe: a signal that lands while the worker
holds its allocator's lock leaves the handler waiting on that lock forever.
A worker silent that long in its crash report is killed, and the input it
had printed is kept for it; a worker still running past the deadline is
killed too, so a run ends on time whatever its workers do. (libFuzzer's fork
mode restarts every worker every few seconds, each re-running a sample of
the corpus first; in a 60 s run that was a third of the time.)

The corpus directory's inputs are dealt out among the workers, each input
to one, so that a run replays the corpus once whatever its number of jobs
(a corpus's few runaway inputs hold a worker at its CPU budget for seconds
each; every worker replaying all of them took most of a 30 s run). Workers
write the inputs they find into a directory of the run, where the
other workers pick them up (libFuzzer's ``-reload``); the runner copies each
into the corpus directory once it is whole (libFuzzer names an input by its
SHA-1), by rename, so the corpus only ever gains complete files. Divergences
never end a worker: the entry point saves them itself, atomically, so an
interrupted run loses nothing.

Nothing outlives the run (``conformance.processes``): every worker is a
supervised process group, stopped however the run ends, even by SIGKILL;
the inputs found, the build bundle the workers load and half-written
findings live in directories the run owns and removes.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from conformance.compare.triage import load_known
from conformance.corpus import seeds_dir
from conformance.errors import KhoConformError
from conformance.native.build import build, save_bundle
from conformance.native.sanitizer import SANITIZER_ENV, sanitizer_preload
from conformance.processes import Terminated, stop, supervised, temp_dir
from conformance.source import KernelSource
from conformance.source.identity import handover_label

from .findings import iter_findings
from .stats import FuzzPoint, FuzzStats

FUZZ_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = FUZZ_DIR.parent
ENTRY = FUZZ_DIR / "entry.py"
DICTIONARY = FUZZ_DIR / "kho.dict"
MAX_LEN = 1024  # bytes: the decoder reads ~20 per op, so this covers the longest programs
TAIL = 300  # lines of a worker's output kept: for error messages, and the report beside an input it ended on
RESTART_MIN = 2  # seconds left below which a worker that ended early is not started again
REPORT_GRACE = 10.0  # seconds of silence after which a worker's crash report counts as hung
DEADLINE_GRACE = 5.0  # seconds past the deadline a worker gets to finish its last input

# "#1234\tNEW cov: 12 ft: 34 corp: 5/67b lim: 8 exec/s: 90 ..."
_STATS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)\S*.*?exec/s: (\d+)")
_FINAL = re.compile(r"^stat::number_of_executed_units:\s+(\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
_PROGRESS = re.compile(r"^KHO-PROGRESS (\d+)")  # fuzz.entry's own count, between libFuzzer's lines
_INPUT_NAME = re.compile(r"[0-9a-f]{40}")
_HUNG_REPORT, _PAST_DEADLINE = "its crash report hung", "it ran past the deadline"  # why a worker was killed
# "==1234== ERROR: libFuzzer: deadly signal": a crash report begins; the
# input it ends on goes to a file named after its kind and SHA-1.
_REPORT = re.compile(r"^==\d+== ERROR: libFuzzer: (.*)")
_ANY_REPORT = re.compile(r"^==\d+== ?ERROR: ")  # libFuzzer's, or a sanitizer's that ends the worker
_BASE_UNIT = re.compile(r"; base unit: [0-9a-f]{40}$")
_HEX_UNIT = re.compile(r"(?:0x[0-9a-f]{1,2},)*")  # the input, printed up to 256 bytes long


def _libfuzzer(seconds: int, artifacts: Path) -> list[str]:
    """The entry point under libFuzzer, as every worker starts it.

    ``-entropic_scale_per_exec_time``: an input that keeps the kernel code
    at its CPU budget (a range of 2^60 pages) costs as much as a hundred
    ordinary ones, and its mutants are as slow; libFuzzer then picks faster
    inputs more often (up to 30x), which multiplies the programs a run
    compares. Such inputs stay in the corpus and are still mutated."""
    return [sys.executable, str(ENTRY), f"-max_total_time={seconds}", f"-max_len={MAX_LEN}", "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/", "-entropic_scale_per_exec_time=1",
            *([f"-dict={DICTIONARY}"] if DICTIONARY.exists() else [])]


def worker_env(bundle: Path, flavor: str, crashes_dir: Path | None, staging: Path | None = None,
               next_bundle: Path | None = None) -> dict[str, str]:
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
    env.update(KHO_FUZZ_BUNDLE=str(bundle),
               PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")])))
    if crashes_dir is not None:
        env["KHO_FUZZ_CRASHES"] = str(crashes_dir.resolve())
    if staging is not None:
        env["KHO_FUZZ_STAGING"] = str(staging)
    if next_bundle is not None:
        env["KHO_FUZZ_NEXT_BUNDLE"] = str(next_bundle)
    return env


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


def _corpus_files(corpus_dir: Path) -> list[Path]:
    """The inputs libFuzzer reads from a corpus directory (it recurses)."""
    return sorted(p for p in corpus_dir.rglob("*") if p.is_file())


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
    """The inputs that ended a worker, as libFuzzer names them (not their reports, ``.log``)."""
    return [p for pattern in ("crash-*", "timeout-*", "oom-*", "leak-*") for p in work.glob(pattern)
            if p.suffix != ".log"]


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha1(path.read_bytes()).hexdigest()
    except OSError:  # removed meanwhile
        return None


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
    SIGTERM and SIGHUP always do, once the workers are stopped)."""
    if seconds <= 0:
        raise KhoConformError(f"fuzzing time {seconds} s: give a positive number of seconds")
    if jobs < 1:
        raise KhoConformError(f"{jobs} jobs: give 1 or more workers")
    load_known()  # a broken known-finding record: one error here, not one per worker
    # libFuzzer runs in the work directory: hand it absolute paths
    corpus_dir, crashes_dir = Path(corpus_dir).resolve(), Path(crashes_dir).resolve()
    if "," in str(corpus_dir):
        raise KhoConformError(f"CORPUS_DIR {corpus_dir}: libFuzzer's list of inputs cannot hold a path with a ','; "
                              "give a directory without one")
    work = corpus_dir.with_name(corpus_dir.name + ".work")  # libFuzzer's crash-*/timeout-* inputs are kept here
    _make_dirs({"CORPUS_DIR": corpus_dir, "--crashes": crashes_dir, "the work directory beside CORPUS_DIR": work})
    b = build(source, page_shift, flavor)  # here, so that workers only load it and errors show once
    new = build(next_source, page_shift, flavor) if next_source is not None else None
    kernels = handover_label(source.version, next_source.version) if next_source is not None else source.version
    label = f"{kernels} ps{page_shift} {flavor}, {jobs} job{'s' if jobs > 1 else ''}"
    console = Console(stderr=True)
    # The run's own directories: beside the corpus (an input is renamed into
    # it, within one file system) and beside the findings (likewise).
    with temp_dir(work, prefix=".run-") as tmp, temp_dir(crashes_dir, prefix=".saving-") as staging:
        stats = FuzzStats(started_from=len(_corpus_files(corpus_dir)))
        seeded = _seed(corpus_dir, tmp)
        if live:
            console.print(f"{corpus_dir}: resuming from {stats.started_from} inputs" if stats.started_from
                          else f"{corpus_dir}: new corpus, {seeded} seed inputs", highlight=False)
        stats.started_from += seeded
        (tmp / "tmp").mkdir()
        next_bundle = save_bundle(new, tmp / "next-target") if new is not None else None
        env = {**worker_env(save_bundle(b, tmp / "target"), flavor, crashes_dir, staging, next_bundle),
               "TMPDIR": str(tmp / "tmp")}
        workers = _Workers(env, work, corpus_dir, tmp, extra_args, stats, time.monotonic() + seconds)
        display = Live(_table(stats, label), console=console, refresh_per_second=4) if live else None
        try:
            workers.run(jobs, crashes_dir, display, label, return_on_interrupt)
        finally:
            if display:
                display.stop()
                console.line()  # what follows starts on a line of its own, terminal or not
    return stats


@dataclass
class _Worker:
    """One libFuzzer process, and what its output has said so far."""

    proc: subprocess.Popen
    share: int  # which of the corpus's inputs it was dealt: every jobs-th from this one
    execs: int = 0
    coverage: int = 0
    features: int = 0
    exec_per_s: float = 0.0
    artifact: Path | None = None  # the input it ended on, as libFuzzer wrote it
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL))
    last_output: float = field(default_factory=time.monotonic)
    report: str | None = None  # the artifact kind ("crash", "timeout", "oom") once a crash report began
    unit: bytes | None = None  # the input that report printed
    killed: str | None = None  # why the runner killed it

    def read(self, line: str) -> None:
        self.last_output = time.monotonic()
        after_base_unit = bool(self.tail) and _BASE_UNIT.search(self.tail[-1]) is not None
        self.tail.append(line.rstrip())
        if self.report is not None and after_base_unit and line.endswith("\n") \
                and _HEX_UNIT.fullmatch(line.rstrip("\n")):
            self.unit = bytes(int(h, 16) for h in line.rstrip(",\n").split(",") if h)
        elif m := _REPORT.match(line):
            what = m[1]
            self.report = "timeout" if what.startswith("timeout") else "oom" if what.startswith("out-of-memory") else "crash"
        elif m := _STATS.match(line):
            execs, self.coverage, self.features, _, rate = map(int, m.groups())
            self.execs, self.exec_per_s = max(self.execs, execs), float(rate)
        elif m := _PROGRESS.match(line):
            self.execs = max(self.execs, int(m[1]))
        elif m := _FINAL.match(line):
            self.execs = int(m[1])  # libFuzzer's own total, at its end
        elif m := _ARTIFACT.search(line):
            self.artifact = Path(m[1])


class _Workers:
    """The run's libFuzzer processes: started, followed, restarted."""

    def __init__(self, env: dict[str, str], work: Path, corpus_dir: Path, tmp: Path, extra_args: tuple[str, ...],
                 stats: FuzzStats, deadline: float) -> None:
        self.env, self.work, self.corpus_dir, self.tmp, self.extra_args = env, work, corpus_dir, tmp, extra_args
        self.stats, self.deadline = stats, deadline
        self.found = tmp / "found"  # the workers' output corpus, shared by them
        self.found.mkdir()
        self.kept: set[str] = set()  # inputs of ``found`` already in the corpus directory
        self.excluded: set[str] = set()  # SHA-1s of inputs a worker ended on: a restart leaves them out
        self.lines: queue.Queue[tuple[_Worker, str | None]] = queue.Queue()
        self.live: list[_Worker] = []
        self.ended_execs = 0  # programs run by workers that have ended
        self.listings = 0  # seed-input lists written
        self.jobs = 1

    def run(self, jobs: int, crashes_dir: Path, display: Live | None, label: str, return_on_interrupt: bool) -> None:
        """Run ``jobs`` workers until the deadline, or Ctrl-C."""
        stats = self.stats
        self.jobs = jobs
        before = set(iter_findings(crashes_dir))
        artifacts_before = set(_artifacts(self.work))
        start = time.monotonic()

        def refresh() -> None:
            self._keep_found()
            stats.seconds = time.monotonic() - start
            stats.execs = self.ended_execs + sum(w.execs for w in self.live)
            stats.exec_per_s = float(sum(w.exec_per_s for w in self.live)) if self.live else stats.exec_per_s
            # Each worker counts the edges it has seen; no one sees the union.
            stats.coverage = max([stats.coverage, *(w.coverage for w in self.live)])
            stats.features = max([stats.features, *(w.features for w in self.live)])
            stats.corpus = len(_corpus_files(self.corpus_dir))
            found = set(iter_findings(crashes_dir))
            stats.findings, stats.new_findings = len(found), sorted(found - before)
            # Whole ones only: a crash report that hung may have left its file empty.
            stats.crash_inputs = sorted(p for p in set(_artifacts(self.work)) - artifacts_before
                                        if _digest(p) == p.name.rsplit("-", 1)[1])
            stats.timeline.append(FuzzPoint(round(stats.seconds, 1), stats.execs, stats.exec_per_s, stats.coverage,
                                            stats.corpus, stats.findings))
            if display:
                display.update(_table(stats, label))

        # Each worker in its own process group: Ctrl-C reaches the runner
        # only, which then stops them all (conformance.processes).
        with ExitStack() as stack:
            for share in range(jobs):
                self._start(stack, share)
            if display:
                display.start()
            try:
                next_point = 0.0
                while self.live:
                    try:
                        worker, line = self.lines.get(timeout=0.25)
                    except queue.Empty:
                        worker, line = None, ""
                    if worker is not None and line is None:
                        self._ended(worker, stack)
                    elif worker is not None and line:
                        worker.read(line)
                    self._kill_stuck()
                    if time.monotonic() - start >= next_point:
                        refresh()
                        next_point = stats.seconds + 1.0
            except KeyboardInterrupt as e:
                stats.interrupted = True
                if isinstance(e, Terminated) or not return_on_interrupt:
                    raise  # the cleanup runs on the way out
        refresh()  # with what the workers found and saved until they ended

    def _start(self, stack: ExitStack, share: int) -> None:
        seconds = max(1, int(self.deadline - time.monotonic()))
        cmd = [*_libfuzzer(seconds, self.work), *self._seed_inputs(share), *self.extra_args, str(self.found)]
        proc = stack.enter_context(supervised(cmd, env=self.env, cwd=self.work, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True, errors="replace"))
        worker = _Worker(proc, share)
        self.live.append(worker)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.put((worker, line))
            self.lines.put((worker, None))

        threading.Thread(target=pump, daemon=True).start()

    def _seed_inputs(self, share: int) -> list[str]:
        """A worker's share of the corpus directory's inputs (every jobs-th,
        from ``share`` on) as libFuzzer's list of seed inputs, except those a
        worker ended on; those also leave the workers' output directory,
        which libFuzzer reads as well (never the corpus)."""
        files = _corpus_files(self.corpus_dir)[share :: self.jobs]
        if self.excluded:
            files = [p for p in files if _digest(p) not in self.excluded]
            for digest in self.excluded:
                (self.found / digest).unlink(missing_ok=True)
        if not files:
            return []
        if bad := next((p for p in files if "," in str(p)), None):
            raise KhoConformError(f"corpus input {bad}: libFuzzer's list of inputs cannot hold a path with a ','; "
                                  "rename the file")
        self.listings += 1
        listing = self.tmp / f"seed-inputs-{self.listings}"
        listing.write_text(",".join(map(str, files)))
        return [f"-seed_inputs=@{listing}"]

    def _kill_stuck(self) -> None:
        """Kill a worker whose crash report has hung, or that runs past the
        deadline; its output then ends (``_ended``)."""
        now = time.monotonic()
        for worker in self.live:
            if worker.killed is not None or worker.proc.poll() is not None:
                continue
            if worker.report is not None and now - worker.last_output >= REPORT_GRACE:
                worker.killed = _HUNG_REPORT
            elif now >= self.deadline + DEADLINE_GRACE:
                worker.killed = _PAST_DEADLINE
            else:
                continue
            stop(worker.proc, signal.SIGKILL, 0)

    def _ended(self, worker: _Worker, stack: ExitStack) -> None:
        """A worker's output ended: done at the deadline, or ended early on an
        input (started again without it), or broken (the run stops, saying
        why)."""
        rc = worker.proc.wait()
        self.live.remove(worker)
        self.ended_execs += worker.execs
        if rc == 0 or worker.killed == _PAST_DEADLINE:
            return
        if worker.killed == _HUNG_REPORT:
            if worker.unit is None:  # longer than libFuzzer prints
                self.stats.lost_crash_inputs += 1
            else:
                worker.artifact = self._keep_unit(worker.report, worker.unit)
        elif worker.artifact is None or not worker.artifact.is_file():
            detail = " | ".join(ln.strip() for ln in list(worker.tail)[-3:])
            raise KhoConformError(f"a fuzzer worker exited with status {rc}: {detail} (see {self.work})")
        if worker.artifact is not None:
            self._keep_report(worker)
            if digest := _digest(worker.artifact):
                self.excluded.add(digest)
        if self.deadline - time.monotonic() >= RESTART_MIN:
            self._start(stack, worker.share)

    def _keep_report(self, worker: _Worker) -> None:
        """Write what the worker printed from its last crash report on (its
        last lines if none began) beside the input it ended on, as
        ``<input>.log``."""
        assert worker.artifact is not None
        lines = list(worker.tail)
        # The last report: the one that ended it (a sanitizer's that did not may come before).
        start = max((i for i, ln in enumerate(lines) if _ANY_REPORT.match(ln)), default=0)
        self._write_whole(worker.artifact.with_name(worker.artifact.name + ".log"),
                          ("\n".join(lines[start:]) + "\n").encode())

    def _keep_unit(self, kind: str | None, unit: bytes) -> Path:
        """Write the input of a crash report (of ``kind``) that hung where
        libFuzzer would have, replacing any half-written file."""
        path = self.work / f"{kind}-{hashlib.sha1(unit).hexdigest()}"
        self._write_whole(path, unit)
        return path

    def _write_whole(self, path: Path, data: bytes) -> None:
        """Write ``path`` so that it only ever appears whole: in the run's
        directory (the same file system), then by rename."""
        scratch = self.tmp / f".{path.name}"
        scratch.write_bytes(data)
        os.replace(scratch, path)

    def _keep_found(self) -> None:
        """Copy the inputs the workers found that are whole (named by their
        SHA-1) into the corpus directory, each by rename."""
        for path in self.found.iterdir():
            name = path.name
            if name in self.kept or not _INPUT_NAME.fullmatch(name) or _digest(path) != name:
                continue  # kept already, or still being written
            scratch = self.tmp / f".{name}"
            try:
                shutil.copyfile(path, scratch)
            except FileNotFoundError:  # replaced by a smaller input meanwhile
                continue
            os.replace(scratch, self.corpus_dir / name)
            self.kept.add(name)
