"""Every saved finding (corpus/crashes/<signature>/) is a regression test,
replayed exactly as it was saved (source, page shift, flavor, model profile),
in-process and through the CLI:

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

from conformance.compare.target import target_for
from conformance.compare.triage import load_known
from conformance.native.build import build
from conformance.native.sanitizer import SANITIZER_ENV, sanitizer_preload
from fuzz.findings import FINDING_FILES, iter_findings, load_finding
from fuzz.minimize import finding_source, replay

CRASHES = REPO / "corpus" / "crashes"
FINDINGS = list(iter_findings(CRASHES))
OWNERS = {r: k for k in load_known() for r in k.reproducers}

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
    """Still showing the divergence it was saved for, with the verdict its
    record gives; or passing where corpus/known/ marks the bug fixed. Always
    on the saved flavor and profile."""
    assert record["kernel"]["flavor"] == finding["flavor"] and record["profile"] == finding["profile"]
    owner = OWNERS.get(finding["signature"])
    signatures = {d["signature"] for d in record["divergences"]}
    if owner is not None and not owner.affects(record["kernel"]["version"]):
        assert finding["signature"] not in signatures, f"{owner.id} is marked fixed in {owner.fixed_in}, still diverges"
        return
    assert record["reproduced"], (record["signature"], json.dumps(finding["first"]))
    if owner is None:
        assert record["verdict"] == "fail", f"{finding['signature']} is no known finding's reproducer: {record['verdict']}"
    else:
        assert record["verdict"] == "known" and owner.id in record["known"], f"{owner.id} not confirmed by its cause"


def test_every_reproducer_a_record_names_is_saved():
    saved = {p.name for p in FINDINGS}
    assert {r for k in load_known() for r in k.reproducers} <= saved


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
