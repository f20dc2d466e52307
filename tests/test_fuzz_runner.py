"""The fuzz runner's workers: one that crashes is started again for the
time left, without the input it crashed on if that came from the corpus;
the inputs they find reach the corpus directory whole."""

from __future__ import annotations

import hashlib
import os
import signal
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
            out["stats"] = run_fuzz(fetch("7.2"), 12, corpus_dir=corpus, crashes_dir=crashes, seconds=SECONDS, live=False)
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
        os.kill(first, signal.SIGABRT)
        again = _wait_for(lambda: _workers_of(os.getpid()) - {first} or not run.is_alive(), SECONDS)
        assert again is not True and again, f"no worker was started after the crash: {out}"
    finally:
        run.join(SECONDS + 60)
    assert "stats" in out, out
    stats = out["stats"]
    assert time.monotonic() - start >= SECONDS and stats.seconds >= SECONDS - 1, "the run ended before its time"
    (crash,) = stats.crash_inputs
    assert crash.parent == corpus.with_name("corpus.work") and crash.name.startswith("crash-")
    assert stats.execs > 0 and not stats.interrupted
    for path in corpus.iterdir():  # the inputs found reached the corpus whole
        assert len(path.name) != 40 or hashlib.sha1(path.read_bytes()).hexdigest() == path.name


def test_a_restart_leaves_out_the_inputs_workers_crashed_on(tmp_path):
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

    def listed() -> list[str]:
        (flag,) = workers._seed_inputs()
        assert flag.startswith("-seed_inputs=@")
        return [Path(p).name for p in Path(flag.split("@", 1)[1]).read_text().split(",")]

    assert listed() == ["a", "b", "c"]
    workers.excluded.add(crashed)
    assert listed() == ["a", "c"]
    assert sorted(p.name for p in workers.found.iterdir()) == ["other"]
    assert sorted(p.name for p in corpus.rglob("*") if p.is_file()) == ["a", "b", "c"]  # the corpus keeps it
