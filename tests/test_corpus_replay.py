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

from conformance.compare.target import target_for
from conformance.compare.triage import load_known
from conformance.native.build import build
from conformance.native.sanitizer import SANITIZER_ENV, sanitizer_preload
from fuzz.findings import FINDING_FILES, iter_findings, load_finding
from fuzz.minimize import finding_source, replay

CRASHES = REPO / "corpus" / "crashes"
FINDINGS = list(iter_findings(CRASHES))

# Replays a finding exactly as it was saved (source, page shift, flavor,
# profile) and prints the JSON replay record; for the sanitizer flavors in a
# process started with their runtime.
_REPLAY = r"""
import sys
from pathlib import Path
from conformance.compare.target import target_for
from conformance.native.build import build
from fuzz.findings import load_finding
from fuzz.minimize import finding_source, replay
finding = load_finding(Path(sys.argv[1]))
target = target_for(build(finding_source(finding), finding["page_shift"], finding["flavor"]))
print(replay(Path(sys.argv[1]), target, as_json=True)[0])
"""


def fixed_in(signature: str, version: str) -> str | None:
    """The version that fixed this divergence, if corpus/known/ says
    ``version`` has the fix."""
    for known in load_known():
        if signature in known.signatures and known.fixed_in and not known.affects(version):
            return known.fixed_in
    return None


def replayed(path: Path) -> dict:
    """The JSON record of replaying the finding at ``path`` as saved."""
    finding = load_finding(path)
    if finding["flavor"] == "plain":
        target = target_for(build(finding_source(finding), finding["page_shift"]))
        return json.loads(replay(path, target, as_json=True)[0])
    env = {**child_env(), **SANITIZER_ENV, "LD_PRELOAD": sanitizer_preload(finding["flavor"])}
    proc = subprocess.run([sys.executable, "-c", _REPLAY, str(path)], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def check_replay(finding: dict, record: dict) -> None:
    """Still diverging with the recorded signature, or passing where
    corpus/known/ marks the bug fixed; always on the saved flavor and profile."""
    assert record["kernel"]["flavor"] == finding["flavor"] and record["profile"] == finding["profile"]
    version = record["kernel"]["version"]
    if (fixed := fixed_in(finding["signature"], version)) is not None:
        assert record["signature"] != finding["signature"], f"marked fixed in {fixed}, still diverges on {version}"
    else:
        assert record["reproduced"], (record["signature"], json.dumps(finding["first"]))


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
    check_replay(finding, replayed(path))


@pytest.mark.parametrize("path", FINDINGS, ids=[p.name for p in FINDINGS])
def test_finding_replays_from_the_cli(path):
    """``kho-conform replay DIR`` alone: it reads source, page shift, flavor
    and profile from finding.json."""
    proc = subprocess.run([sys.executable, "-m", "conformance.cli", "replay", "--json", str(path)], capture_output=True,
                          text=True, cwd=REPO, env=child_env(), timeout=300)
    assert proc.returncode in (0, 1) and not proc.stderr, proc.stderr[-2000:]
    check_replay(load_finding(path), json.loads(proc.stdout))
