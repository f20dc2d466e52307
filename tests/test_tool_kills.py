"""Fault injection for the tool itself: ``kho-conform fuzz`` is killed at
random moments (while its library is built, while findings are minimized
and saved, while libFuzzer merges into the corpus, at any time) with every
signal that ends a run in practice. After each kill: no process of the run
is left, no temporary directory is left, every finding directory is complete
and unchanged, every corpus file is intact and none is lost; at the end
every finding replays with its signature.

The planted bug (tests/planted.py) makes findings appear within a second,
so kills land while they are saved. One round kills once per signal and
moment (24 kills, about a minute and a half on two cores); KHO_KILL_ROUNDS=N
runs N rounds (``make kill-campaign``), KHO_KILL_SEED=S repeats a campaign.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, child_env
from planted import planted_tree

from conformance import processes
from conformance.corpus import seeds_dir
from conformance.native.sanitizer import SANITIZER_ENV, sanitizer_preload
from fuzz.findings import FINDING_FILES, iter_findings, load_finding
from reference.program import parse_program

ROUNDS = int(os.environ.get("KHO_KILL_ROUNDS", "1"))
SEED = int(os.environ.get("KHO_KILL_SEED", str(random.randrange(1 << 32))))
# How a run ends: a signal to the runner; SIGKILL to its process group (its
# parent shell with it); its parent dying, which had asked for SIGKILL then.
SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGKILL", "SIGKILL-group", "parent-death")
MOMENTS = ("build", "save", "merge", "random")
GONE_WITHIN = 10.0  # seconds for the whole family to be gone after the kill

# The runner's parent: starts it (asking for SIGKILL when the parent dies, as
# a CI agent would), says its pid, waits.
_PARENT = r"""
import ctypes, os, signal, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
child = subprocess.Popen(sys.argv[1:], stdout=sys.stderr, preexec_fn=lambda: libc.prctl(1, signal.SIGKILL))  # PR_SET_PDEATHSIG
print(child.pid, flush=True)
sys.exit(child.wait())
"""

# Replays findings as saved, in one process started with the fuzz flavor's
# sanitizer runtime (they are all from one build); prints name -> reproduced.
_REPLAY = r"""
import json, sys
from pathlib import Path
from conformance.compare.target import target_for
from conformance.native.build import build
from fuzz.findings import load_finding
from fuzz.minimize import finding_source, replay
out = {}
for path in map(Path, sys.argv[1:]):
    finding = load_finding(path)
    target = target_for(build(finding_source(finding), finding["page_shift"], finding["flavor"]))
    out[str(path)] = json.loads(replay(path, target, as_json=True)[0])["reproduced"]
print(json.dumps(out))
"""


@dataclass
class Lab:
    """One campaign's world: a planted tree, a private cache, one corpus
    shared by all runs, and what must never change once written."""

    root: Path
    tree: Path
    cache: Path
    corpus: Path
    tmp: Path  # TMPDIR of every run: must be empty after each
    seen_corpus: dict[str, str] = field(default_factory=dict)  # name -> sha1 of files ever seen
    seen_findings: dict[Path, str] = field(default_factory=dict)  # finding dir -> digest of its files

    def env(self, token: str) -> dict[str, str]:
        env = {**child_env(), "KHO_CONFORM_CACHE": str(self.cache), "TMPDIR": str(self.tmp)}
        env[processes.GUARDS_ENV] = processes.with_token(env.get(processes.GUARDS_ENV, ""), token)
        return env

    def runner(self, crashes: Path, seconds: int = 60, jobs: int = 2) -> list[str]:
        return [sys.executable, "-m", "conformance.cli", "fuzz", "--kernel-tree", str(self.tree), "--jobs", str(jobs),
                "--time", str(seconds), "--crashes", str(crashes), str(self.corpus)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Lab:
    root = tmp_path_factory.mktemp("kills")
    lab = Lab(root, planted_tree(root / "tree"), root / "cache", root / "corpus", root / "tmp")
    lab.tmp.mkdir()
    return lab


@dataclass
class Kill:
    signal: str
    moment: str
    landed: str  # what was going on when the signal was sent
    seconds_to_gone: float


def family_alive(token: str) -> list[int]:
    return processes.tagged(token)


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def dot_entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) if directory.is_dir() else []


def builds_dir(lab: Lab) -> Path:
    return lab.cache / "builds"


def corpus_size(lab: Lab) -> int:
    return sum(1 for _ in lab.corpus.iterdir()) if lab.corpus.is_dir() else 0


def work_dir(lab: Lab) -> Path:
    return lab.corpus.with_name(lab.corpus.name + ".work")


def finding_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def check_invariants(lab: Lab, crashes_dirs: list[Path]) -> None:
    """What must hold whenever no run is going on."""
    assert not list(lab.tmp.iterdir()), f"left in TMPDIR: {sorted(p.name for p in lab.tmp.iterdir())}"
    for directory in (*crashes_dirs, work_dir(lab), builds_dir(lab)):
        assert not dot_entries(directory), f"temporary directories left in {directory}: {dot_entries(directory)}"
    seeds = {p.name: p.read_bytes() for p in seeds_dir().glob("*.bin")}
    for path in lab.corpus.rglob("*"):
        data = path.read_bytes()
        if re.fullmatch("[0-9a-f]{40}", path.name):  # libFuzzer names inputs by their sha1
            assert hashlib.sha1(data).hexdigest() == path.name, f"corpus file {path.name} is damaged ({len(data)} bytes)"
        else:
            assert seeds.get(path.name) == data, f"corpus file {path.name} is neither a seed nor a libFuzzer input"
        lab.seen_corpus.setdefault(path.name, hashlib.sha1(data).hexdigest())
    missing = set(lab.seen_corpus) - {p.name for p in lab.corpus.rglob("*")}
    assert not missing, f"corpus inputs lost: {sorted(missing)[:5]}"
    for crashes in crashes_dirs:
        entries = sorted(crashes.iterdir()) if crashes.is_dir() else []
        assert entries == list(iter_findings(crashes)), f"incomplete finding directories in {crashes}"
        for path in entries:
            finding = load_finding(path)
            assert finding["signature"] == path.name and finding["flavor"] == "fuzz"
            assert {p.name for p in path.iterdir()} >= set(FINDING_FILES)
            parse_program((path / "program.txt").read_text())
            digest = lab.seen_findings.setdefault(path, finding_digest(path))
            assert digest == finding_digest(path), f"{path} changed after it was saved"


def moment_reached(lab: Lab, moment: str, crashes: Path, started: float, corpus_before: int, rng: random.Random):
    """A condition that holds once the run is at ``moment``; then the kill
    is delayed by a random fraction of that moment's usual length."""
    if moment == "build":
        return lambda: bool(dot_entries(builds_dir(lab))), rng.uniform(0, 1.2)
    if moment == "save":  # a worker minimizes a new finding (then saves it)
        return lambda: bool(in_progress(crashes)), rng.uniform(0, 0.5)
    if moment == "merge":  # the runner copying the workers' new inputs into the corpus
        return lambda: corpus_size(lab) > corpus_before or time.monotonic() - started > 15, rng.uniform(0, 0.05)
    at = rng.uniform(0, 5)
    return lambda: time.monotonic() - started > at, 0.0


def in_progress(crashes: Path) -> list[Path]:
    """The findings workers are minimizing or saving (their scratch
    directories in the run's staging directory)."""
    try:
        return [d for staging in crashes.glob(".saving-*") for d in staging.iterdir()]
    except OSError:  # removed meanwhile
        return []


def what_is_going_on(lab: Lab, crashes: Path, token: str) -> str:
    """What the run was doing at the kill, as far as files show it."""
    going = []
    if dot_entries(builds_dir(lab)):
        going.append("building")
    scratch = in_progress(crashes)
    if any(next(d.glob("*"), None) for d in scratch):
        going.append("writing a finding")
    elif scratch:
        going.append("minimizing a finding")
    if any(work_dir(lab).glob(".run-*/seed-inputs-*")):  # a worker was started
        going.append("fuzzing")
    return "+".join(going) or f"starting ({len(family_alive(token))} processes)"


def kill_once(lab: Lab, how: str, moment: str, crashes: Path, rng: random.Random) -> Kill:
    if moment == "build":  # the library is built afresh by this run
        for build in builds_dir(lab).glob("*-fuzz"):
            shutil.rmtree(build)
    reached, delay = moment_reached(lab, moment, crashes, time.monotonic(), corpus_size(lab), rng)
    landed, seconds = run_and_kill(lab, lab.runner(crashes), how, lambda token: reached(), delay,
                                   lambda token: what_is_going_on(lab, crashes, token))
    return Kill(how, moment, landed, seconds)


def run_and_kill(lab: Lab, command: list[str], how: str, ready: Callable[[str], bool], delay: float,
                 describe: Callable[[str], str]) -> tuple[str, float]:
    """Run ``command`` under a parent, end it ``how`` once ``ready(token)``
    holds and ``delay`` more seconds passed; (what was going on then, seconds
    until every process of the run was gone)."""
    token = "kill" + os.urandom(6).hex()
    log = lab.root / "runner.log"
    with open(log, "w") as out:
        parent = subprocess.Popen([sys.executable, "-c", _PARENT, *command], env=lab.env(token), cwd=lab.root,
                                  stdout=subprocess.PIPE, stderr=out, text=True, start_new_session=True)
    try:
        runner = int(parent.stdout.readline())
        # Armed once the runner's main() runs (its watchdog is up): a signal
        # during interpreter start-up is Python's business, not the tool's.
        assert wait_for(lambda: len(family_alive(token)) >= 3, 30), "the runner did not start"
        assert wait_for(lambda: ready(token), 60), f"{command[3]}: the moment to kill never came"
        time.sleep(delay)
        landed = describe(token)
        sent = time.monotonic()
        if how == "SIGKILL-group":
            os.killpg(parent.pid, signal.SIGKILL)
        elif how == "parent-death":
            parent.kill()
        else:
            os.kill(runner, getattr(signal, how))
        gone = wait_for(lambda: not family_alive(token), GONE_WITHIN)
        seconds = time.monotonic() - sent
        parent.wait(10)
        assert gone, f"{how} while {landed}: still running after {GONE_WITHIN} s: {family_alive(token)}"
    finally:  # a failed test leaves no run behind to disturb the next
        processes.kill_tagged(token)
    output = log.read_text()
    assert "Traceback" not in output, output[-3000:]
    return landed, round(seconds, 2)


def fuzzing(token: str) -> bool:
    """Whether libFuzzer runs in the family of ``token``."""
    def cmdline(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_text()
        except OSError:
            return ""
    return any("-max_total_time=" in cmdline(pid) for pid in family_alive(token))


def test_kills_leave_nothing_behind(lab):
    rng = random.Random(SEED)
    plan = [(how, moment) for _ in range(ROUNDS) for how in SIGNALS for moment in MOMENTS]
    rng.shuffle(plan)
    kills: list[Kill] = []
    crashes_dirs: list[Path] = []
    for i, (how, moment) in enumerate(plan):
        crashes = lab.root / f"crashes-{i}"  # fresh: the seeds' divergences are found (and saved) again
        crashes_dirs.append(crashes)
        kills.append(kill_once(lab, how, moment, crashes, rng))
        check_invariants(lab, crashes_dirs)
    findings = [p for c in crashes_dirs for p in iter_findings(c)]
    assert findings, "no finding was saved in the whole campaign"
    assert all(replay_all(lab, findings).values()), "a finding does not replay with its signature"
    landed = sorted({k.landed for k in kills})
    print(f"\nkill campaign (seed {SEED}): {len(kills)} kills = {ROUNDS} round(s) x {len(SIGNALS)} signals x "
          f"{len(MOMENTS)} moments; all invariants held; {len(findings)} findings replayed; "
          f"family gone within {max(k.seconds_to_gone for k in kills)} s at most")
    for state in landed:
        print(f"  {sum(k.landed == state for k in kills):3} kills while {state}")


def replay_all(lab: Lab, findings: list[Path]) -> dict[str, bool]:
    env = {**lab.env("replay"), **SANITIZER_ENV, "LD_PRELOAD": sanitizer_preload("fuzz")}
    proc = subprocess.run([sys.executable, "-c", _REPLAY, *map(str, findings)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_two_runs_share_a_corpus_and_findings(lab):
    """Two runs at once on one corpus and one crashes directory: nothing
    lost, one copy of each signature, and each run's summary on a line of
    its own after its table."""
    crashes = lab.root / "crashes-shared"
    token = "pair" + os.urandom(6).hex()
    runs = [subprocess.Popen(lab.runner(crashes, seconds=8, jobs=1), env=lab.env(token), cwd=lab.root,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outputs = [run.communicate(timeout=120)[0] for run in runs]
    finally:
        processes.kill_tagged(token)
    for run, output in zip(runs, outputs):
        assert run.returncode == 0, output[-3000:]
        assert re.search(r"^\d+ execs, .* \(started from \d+\), \d+ new findings$", output, re.M), output[-1500:]
    assert wait_for(lambda: not family_alive(token), GONE_WITHIN)
    reported = {Path(p) for output in outputs for p in re.findall(r"kho-conform replay (\S+)", output)}
    saved = list(iter_findings(crashes))
    assert reported and reported == set(saved)
    signatures = [load_finding(p)["signature"] for p in saved]
    assert len(signatures) == len(set(signatures)) == len(saved)
    check_invariants(lab, [crashes])
    for path in saved:  # fresh fuzz-flavor findings replay through the CLI as saved
        proc = subprocess.run([sys.executable, "-m", "conformance.cli", "replay", "--json", str(path)], capture_output=True,
                              text=True, cwd=REPO, env=lab.env("replay"), timeout=300)
        record = json.loads(proc.stdout)
        assert record["reproduced"] and record["same_source"] and record["kernel"]["flavor"] == "fuzz", proc.stderr[-2000:]


@pytest.mark.parametrize("command,how", [("check", "SIGKILL"), ("bench", "SIGTERM")])
def test_check_and_bench_leave_nothing_behind(lab, command, how):
    """check and bench start libFuzzer too (and bench its measuring
    processes): ended while it fuzzes, they leave nothing either."""
    out = lab.root / command
    args = {"check": ["--page-shift", "12", "--flavor", "plain", "--examples", "1", "--fuzz-time", "30",
                      "--crashes", str(out / "crashes"), "--out", str(out)],
            "bench": ["--quick"]}[command]
    run_and_kill(lab, [sys.executable, "-m", "conformance.cli", command, "--kernel-tree", str(lab.tree), *args], how,
                 fuzzing, random.uniform(0, 1), lambda token: "fuzzing")
    assert not list(lab.tmp.iterdir()), sorted(p.name for p in lab.tmp.iterdir())
    assert not list(out.rglob(".*")), "temporary directories left"
