"""Every saved finding (corpus/crashes/<signature>/) is a regression test: on
the kernel it names it must still diverge with its signature while the bug
stands, and pass once corpus/known/ marks it fixed in that version."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, child_env

from conformance.compare.diff import compare
from conformance.compare.target import target_for
from conformance.compare.triage import load_known
from conformance.native.build import build
from conformance.native.sanitizer import SANITIZER_ENV, sanitizer_preload
from conformance.source import fetch
from fuzz.findings import FINDING_FILES, iter_findings, load_finding, needs_sanitizer
from reference.program import parse_program

CRASHES = REPO / "corpus" / "crashes"
FINDINGS = list(iter_findings(CRASHES))

# A sanitizer-only finding replays in a process started with the ASan runtime.
_ASAN_CHILD = r"""
import sys
from conformance.native.build import build
from conformance.compare.diff import compare
from conformance.compare.target import target_for
from conformance.source import fetch
from reference.program import parse_program
version, page_shift, program = sys.argv[1], int(sys.argv[2]), open(sys.argv[3]).read()
first = compare(parse_program(program), target_for(build(fetch(version), page_shift, "asan"))).first
print(first.signature if first else "")
"""


def fixed_in(signature: str, version: str) -> str | None:
    """The version that fixed this divergence, if corpus/known/ says
    ``version`` has the fix."""
    for known in load_known():
        if signature in known.signatures and known.fixed_in and not known.affects(version):
            return known.fixed_in
    return None


def first_signature(finding: dict, path: Path) -> str:
    version, page_shift = finding["kernel_version"], finding["page_shift"]
    if needs_sanitizer(finding):
        env = {**child_env(), **SANITIZER_ENV, "LD_PRELOAD": sanitizer_preload("asan")}
        proc = subprocess.run([sys.executable, "-c", _ASAN_CHILD, version, str(page_shift), str(path / "program.txt")],
                              capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.strip()
    first = compare(parse_program((path / "program.txt").read_text()), target_for(build(fetch(version), page_shift))).first
    return first.signature if first else ""


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


@pytest.mark.parametrize("path", FINDINGS, ids=[p.name for p in FINDINGS])
def test_finding_replays(path):
    finding = load_finding(path)
    assert finding["signature"] == path.name
    version = fetch(finding["kernel_version"]).version  # a version gone from the mirror falls back in its series
    signature = first_signature({**finding, "kernel_version": version}, path)
    if (fixed := fixed_in(finding["signature"], version)) is not None:
        assert signature != finding["signature"], f"marked fixed in {fixed}, still diverges on {version}"
    else:
        assert signature == finding["signature"], json.dumps(finding["first"])
