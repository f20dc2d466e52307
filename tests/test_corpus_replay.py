"""Every saved finding (corpus/crashes/<signature>/) is a regression test. On
the kernel it names, with the flavor it was saved with:

- while the bug stands, the divergence it was saved for is still there, and
  triage either reports it as new or credits the known finding whose record
  lists it as a reproducer: that finding's quirk (or sanitizer site) is what
  explains it, so every known finding stays confirmed by its cause on the
  unmodified kernels where it applies;
- once corpus/known/ marks it fixed in that version, it no longer diverges.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, child_env

from conformance.compare.triage import load_known
from conformance.native.sanitizer import SANITIZER_ENV, sanitizer_preload
from fuzz.findings import FINDING_FILES, iter_findings, load_finding, needs_sanitizer

CRASHES = REPO / "corpus" / "crashes"
FINDINGS = list(iter_findings(CRASHES))
OWNERS = {r: k for k in load_known() for r in k.reproducers}

# Replays in a child: a sanitizer finding needs the ASan runtime preloaded,
# and one process should not hold the libraries of several kernels.
_CHILD = r"""
import json, sys
from conformance.compare.diff import compare
from conformance.compare.target import target_for
from conformance.compare.triage import triage
from conformance.native.build import build
from conformance.source import fetch
from reference.program import parse_program
version, page_shift, flavor, program = sys.argv[1], int(sys.argv[2]), sys.argv[3], open(sys.argv[4]).read()
target = target_for(build(fetch(version), page_shift, flavor))
c = compare(parse_program(program), target)
v = triage(c, target)
print(json.dumps({"version": target.build.source.version, "signatures": [d.signature for d in c.divergences],
                  "status": v.status, "known": [k.id for k in v.known]}))
"""


def replay(finding: dict, path: Path) -> dict:
    flavor = "asan" if needs_sanitizer(finding) else "plain"
    env = child_env()
    if flavor == "asan":
        env.update(SANITIZER_ENV, LD_PRELOAD=sanitizer_preload("asan"))
    proc = subprocess.run([sys.executable, "-c", _CHILD, finding["kernel_version"], str(finding["page_shift"]), flavor,
                           str(path / "program.txt")], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_findings_directory_is_iterable(tmp_path):
    assert CRASHES.is_dir()
    assert all((p / f).is_file() for p in FINDINGS for f in FINDING_FILES)
    # only complete findings count: saves in progress and partial copies do not
    (tmp_path / ".0123.partial").mkdir()
    (tmp_path / "partial").mkdir()
    done = tmp_path / "abcdef012345"
    done.mkdir()
    for name in FINDING_FILES:
        (done / name).write_text("{}" if name.endswith(".json") else "")
    assert list(iter_findings(tmp_path)) == [done]


def test_every_reproducer_a_record_names_is_saved():
    saved = {p.name for p in FINDINGS}
    assert {r for k in load_known() for r in k.reproducers} <= saved


@pytest.mark.parametrize("path", FINDINGS, ids=[p.name for p in FINDINGS])
def test_finding_replays(path):
    finding = load_finding(path)
    assert finding["signature"] == path.name
    got = replay(finding, path)
    owner = OWNERS.get(path.name)
    if owner is not None and not owner.affects(got["version"]):
        assert path.name not in got["signatures"], f"{owner.id} is marked fixed in {owner.fixed_in}, still diverges"
        return
    assert path.name in got["signatures"], json.dumps(finding["first"])
    if owner is None:
        assert got["status"] == "fail", f"{path.name} is no known finding's reproducer but triage says {got}"
    else:
        assert got["status"] == "known" and owner.id in got["known"], f"{owner.id} is not confirmed by its cause: {got}"
