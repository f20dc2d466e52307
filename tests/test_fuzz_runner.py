"""The fuzz runner's workers: one that crashes is started again for the
time left, without the input it crashed on if that came from the corpus;
the inputs they find reach the corpus directory whole."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from conformance.source import fetch
from fuzz.runner import _Workers, run_fuzz
from fuzz.stats import FuzzStats

SECONDS = 25  # the run's time: room for the crash's report and a restart on a busy machine


def _workers_of(pid: int) -> set[int]:
    """This process's children that run libFuzzer."""
    found = set()
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid \
                    and b"-max_total_time=" in Path(f"/proc/{name}/cmdline").read_bytes():
                found.add(int(name))
        except (OSError, IndexError):
            pass
    return found


def _wait_for(condition, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    return None


def test_a_crashed_worker_is_started_again_for_the_time_left(tmp_path):
    corpus, crashes = tmp_path / "corpus", tmp_path / "crashes"
    out: dict[str, object] = {}

    def fuzz() -> None:
        try:
            # Inputs short enough for libFuzzer to print: a crash report that
            # hangs (see below) still gives its input.
            out["stats"] = run_fuzz(fetch("7.2"), 12, corpus_dir=corpus, crashes_dir=crashes, seconds=SECONDS, live=False,
                                    extra_args=("-max_len=256",))
        except Exception as e:  # shown by the assertion below
            out["error"] = e

    run = threading.Thread(target=fuzz)
    start = time.monotonic()
    run.start()
    try:
        # Fuzzing, past the seeds: the runner has copied a new input into the corpus.
        assert _wait_for(lambda: any(len(p.name) == 40 for p in corpus.iterdir()) if corpus.is_dir() else False, 30)
        (first,) = _workers_of(os.getpid())
        # As an abort() would. (Not SIGSEGV: the runtime takes a fault in the
        # kernel code for the kernel's, an outcome compared like any other.)
        # Landing anywhere, it may find the worker holding its allocator's
        # lock: then the crash report hangs, and the runner kills the worker.
        os.kill(first, signal.SIGABRT)
        again = _wait_for(lambda: _workers_of(os.getpid()) - {first} or not run.is_alive(), SECONDS)
        assert again is not True and again, f"no worker was started after the crash: {out}"
    finally:
        run.join(SECONDS + 60)
    assert "stats" in out, out
    stats = out["stats"]
    assert time.monotonic() - start >= SECONDS and stats.seconds >= SECONDS - 1, "the run ended before its time"
    # Hung before it printed its input, the report leaves none.
    assert len(stats.crash_inputs) + stats.lost_crash_inputs == 1, stats
    for crash in stats.crash_inputs:
        assert crash.parent == corpus.with_name("corpus.work") and crash.name.startswith("crash-")
        assert hashlib.sha1(crash.read_bytes()).hexdigest() == crash.name.removeprefix("crash-")
        assert "ERROR: libFuzzer: deadly signal" in crash.with_name(crash.name + ".log").read_text()
    assert stats.execs > 0 and not stats.interrupted
    for path in corpus.iterdir():  # the inputs found reached the corpus whole
        assert len(path.name) != 40 or hashlib.sha1(path.read_bytes()).hexdigest() == path.name


def test_workers_are_dealt_the_corpus_and_a_restart_leaves_out_the_inputs_workers_crashed_on(tmp_path):
    corpus, tmp, work = tmp_path / "corpus", tmp_path / "run", tmp_path / "work"
    for d in (corpus / "sub", tmp, work):
        d.mkdir(parents=True)
    inputs = {name: name.encode() * 3 for name in ("a", "b", "c")}
    for name, data in inputs.items():
        (corpus / ("sub" if name == "c" else "") / name).write_bytes(data)
    workers = _Workers({}, work, corpus, tmp, (), FuzzStats(), time.monotonic() + 60)
    crashed = hashlib.sha1(inputs["b"]).hexdigest()
    (workers.found / crashed).write_bytes(inputs["b"])  # a worker's copy of it too
    (workers.found / "other").write_bytes(b"x")

    def listed(share: int = 0) -> list[str]:
        flags = workers._seed_inputs(share)
        if not flags:
            return []
        (flag,) = flags
        assert flag.startswith("-seed_inputs=@")
        return [Path(p).name for p in Path(flag.split("@", 1)[1]).read_text().split(",")]

    assert listed() == ["a", "b", "c"]
    workers.jobs = 2  # each input dealt to one worker: the corpus is replayed once
    assert (listed(0), listed(1)) == (["a", "c"], ["b"])
    workers.jobs = 4
    assert [listed(share) for share in range(4)] == [["a"], ["b"], ["c"], []]
    workers.jobs = 2
    workers.excluded.add(crashed)
    assert (listed(0), listed(1)) == (["a", "c"], [])  # a restart keeps its share, without the input
    workers.jobs = 1
    assert listed() == ["a", "c"]
    assert sorted(p.name for p in workers.found.iterdir()) == ["other"]
    assert sorted(p.name for p in corpus.rglob("*") if p.is_file()) == ["a", "b", "c"]  # the corpus keeps it


# A stand-in for libFuzzer: the n-th start of a worker plays the n-th part.
# 1: its crash report hangs after printing its input (a corpus input), as
# when a signal lands while it holds its allocator's lock; 2: the same with
# an input too long for libFuzzer to print; 3: it never ends.
_FAKE_WORKER = """
import hashlib, sys, time
from pathlib import Path
work, starts = Path(sys.argv[1]), Path(sys.argv[2])
n = len(list(starts.iterdir())) + 1
(starts / str(n)).write_text(" ".join(sys.argv[3:]))
print("#8\\tpulse  cov: 5 ft: 6 corp: 1/3b lim: 4 exec/s: 8 rss: 40Mb", flush=True)
if n < 3:
    unit = b"kho" if n == 1 else bytes(300)
    print("==42==ERROR: AddressSanitizer: heap-buffer-overflow (reported, the run goes on)", flush=True)
    print("==42== ERROR: libFuzzer: deadly signal", flush=True)
    print("MS: 1 ChangeByte-; base unit: " + "0" * 40, flush=True)
    if len(unit) <= 256:
        print("".join(f"0x{b:x}," for b in unit), flush=True)
    (work / f"crash-{hashlib.sha1(unit).hexdigest()}").touch()  # fopen'd, never written
time.sleep(3600)
"""


def test_hung_crash_reports_and_workers_past_the_deadline_are_killed(tmp_path, monkeypatch):
    corpus, work, tmp, starts, crashes = (tmp_path / d for d in ("corpus", "work", "run", "starts", "crashes"))
    for d in (corpus, work, tmp, starts, crashes):
        d.mkdir()
    (corpus / "kho").write_bytes(b"kho")
    (corpus / "other").write_bytes(b"other")
    script = tmp_path / "fake_libfuzzer.py"
    script.write_text(_FAKE_WORKER)
    monkeypatch.setattr("fuzz.runner._libfuzzer", lambda seconds, artifacts: [sys.executable, str(script), str(artifacts), str(starts)])
    monkeypatch.setattr("fuzz.runner.REPORT_GRACE", 1.0)
    monkeypatch.setattr("fuzz.runner.DEADLINE_GRACE", 1.0)
    stats = FuzzStats()
    seconds = 8
    start = time.monotonic()
    workers = _Workers(dict(os.environ), work, corpus, tmp, (), stats, start + seconds)
    workers.run(1, crashes, None, "fake", True)
    took = time.monotonic() - start

    assert seconds + 1 <= took < seconds + 30, f"the run took {took:.1f} s"  # not the fake worker's hour
    assert sorted(p.name for p in starts.iterdir()) == ["1", "2", "3"]
    kept = work / f"crash-{hashlib.sha1(b'kho').hexdigest()}"
    assert stats.crash_inputs == [kept] and kept.read_bytes() == b"kho"
    # Its report beside it, from the report that ended the worker on.
    assert kept.with_name(kept.name + ".log").read_text().splitlines() == [
        "==42== ERROR: libFuzzer: deadly signal", "MS: 1 ChangeByte-; base unit: " + "0" * 40, "0x6b,0x68,0x6f,"]
    assert stats.lost_crash_inputs == 1  # the 300-byte one, left out of crash_inputs (its file is empty)
    assert hashlib.sha1(b"kho").hexdigest() in workers.excluded
    # The restarts' seed inputs leave out the input the first worker hung on.
    for n in ("2", "3"):
        (flag,) = [a for a in (starts / n).read_text().split() if a.startswith("-seed_inputs=@")]
        assert [Path(p).name for p in Path(flag.split("@", 1)[1]).read_text().split(",")] == ["other"]
    assert stats.execs == 3 * 8 and not workers.live
