"""The planted-bug test: a one-line bug in the 7.2 radix tree must be found by
a one-minute fuzz run, saved minimized, and reproduced by replay.

The patch is generated here from the cached kernel file and lives in
tmp_path: no kernel source text is part of this repository.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime

from conftest import REPO, child_env, get_build
from planted import planted_patch

from conformance.compare.diff import compare
from conformance.compare.target import target_for
from conformance.source import resolve
from fuzz.findings import load_finding
from fuzz.runner import run_fuzz
from reference.program import parse_program

# Replays each finding on the patched plain build in a fresh process (the test
# process already has the unpatched 7.2 library loaded).
_REPLAY = r"""
import json, sys
from pathlib import Path
from conformance.native.build import build
from conformance.compare.target import target_for
from conformance.source import resolve
from fuzz.minimize import replay
patch, dirs = sys.argv[1], sys.argv[2:]
target = target_for(build(resolve("7.2", None, None, Path(patch)), 12, "plain"))
out = {}
for d in dirs:
    text, diverged = replay(Path(d), target)
    out[d] = {"diverged": diverged, "reproduced": text.rstrip().endswith("reproduced")}
print(json.dumps(out))
"""


def test_planted_bug_is_found_minimized_and_replayed(tmp_path):
    patch = planted_patch(tmp_path)
    patched = resolve("7.2", None, None, patch)
    assert patched.provider.endswith(f"+patch:{patch.name}")
    crashes = tmp_path / "crashes"
    start = time.time()
    stats = run_fuzz(patched, 12, corpus_dir=tmp_path / "corpus", jobs=1, seconds=60, crashes_dir=crashes, live=False)
    assert stats.execs > 0 and stats.timeline and stats.new_findings, stats

    proc = subprocess.run([sys.executable, "-c", _REPLAY, str(patch), *map(str, stats.new_findings)],
                          capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    on_patched = json.loads(proc.stdout)
    unpatched = target_for(get_build("7.2", 12))
    planted = []
    for path in stats.new_findings:
        meta = load_finding(path)
        program = parse_program((path / "program.txt").read_text())
        first = compare(program, unpatched).first
        if on_patched[str(path)]["reproduced"] and (first is None or first.signature != meta["signature"]):
            planted.append((meta, program))
    assert planted, f"no finding is due to the planted bug among {len(stats.new_findings)}"
    meta, program = min(planted, key=lambda mp: len(mp[1].steps))
    assert len(program.steps) <= 4, program.text()
    assert meta["source"]["provider"] == patched.provider and meta["flavor"] == "fuzz"
    found_after = min(datetime.fromisoformat(m["created"]).timestamp() for m, _ in planted) - start
    print(f"planted bug: {len(planted)} signatures, first after {found_after:.0f} s; "
          f"{stats.execs} execs, {stats.mean_exec_per_s:.0f} exec/s\n{program.text()}")
