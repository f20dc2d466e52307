"""Live update across versions: the old kernel of one kernel version hands
its image over to the next kernel of another (``conformance.compare.target.Pair``).

Expectations derived by hand from the ABI:
- 7.1 writes compatible "kho-v3", 7.2 and 7.3 write and require "kho-v4":
  across that bump the next kernel refuses the image (kexec -EINVAL, nothing
  restored, no subtree), in both directions;
- 7.2 and 7.3 share the ABI: each accepts the other's image and restores the
  same map as a handover within one version; only what the next kernel's
  own API does differs (7.3's walk reports the tree's node pages and marks
  the free 1 GiB blocks as scratch, 7.2's does neither);
- triage holds each kernel to its own version's known findings: a 7.3 next
  kernel's bug is credited across versions only where 7.3 boots, a 7.1 next
  kernel's never where 7.2 boots.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, child_env, get_build
from planted import NOINIT_DROPPED, planted_source

from conformance.check import Findings, comparison_result
from conformance.compare.diff import compare
from conformance.compare.target import Pair, Target, target_for
from conformance.compare.triage import triage
from conformance.native.build import build
from conformance.programs.machine import machine_for
from conformance.programs.scenarios import scenarios
from conformance.report import load_report
from conformance.source import fetch
from fuzz.findings import load_finding
from fuzz.runner import run_fuzz
from reference import model, quirks
from reference.outcome import EINVAL, ENOENT
from reference.program import parse_program

PROGRAM = parse_program("""page_shift 12
---
preserve_folio 0x100 2
preserve_pages 0x200 0x10
add_subtree blob 0x300000 0x80
kexec
restore_folio 0x100000
restore_pages 0x200000 0x10
retrieve_subtree blob
""")
KEXEC = 3


def kernel(series: str) -> Target:
    return target_for(get_build(series, 12))


def pair(old: str, new: str) -> Pair:
    return Pair(kernel(old), kernel(new))


def restored_map(outcome) -> tuple:
    n = outcome.next
    return n.walk, n.reserved, n.noinit, n.magic


@pytest.mark.parametrize("old,new", [("7.1", "7.2"), ("7.2", "7.1"), ("7.1", "7.3"), ("7.3", "7.1")])
def test_the_abi_bump_refuses_the_image(old, new):
    cmp = compare(PROGRAM, pair(old, new))
    assert cmp.ok, cmp.first.line()
    for outcome in (cmp.model, cmp.kernel):
        assert [r.rc for r in outcome.ops[:KEXEC]] == [0, 0, 0]  # the old kernel did its part
        assert not outcome.next.accepted and outcome.next.walk == () and outcome.next.reserved == ()
        assert outcome.ops[KEXEC].rc == -EINVAL
        assert [r.rc for r in outcome.ops[KEXEC + 1 :]] == [-1, -1, -ENOENT]  # NULL, NULL, no subtree
    required = kernel(new).profile.compatible
    assert required in cmp.model.next.reason and required in cmp.kernel.next.reason
    assert kernel(old).profile.compatible != required


@pytest.mark.parametrize("old,new", [("7.2", "7.3"), ("7.3", "7.2")])
def test_a_shared_abi_accepts_and_restores_the_same_map(old, new):
    across, own_old, own_new = compare(PROGRAM, pair(old, new)), compare(PROGRAM, kernel(old)), compare(PROGRAM, kernel(new))
    assert across.ok and own_old.ok and own_new.ok
    n = across.kernel.next
    assert n.accepted and {(0x100000, 2), (0x200000, 4)} <= set(n.walk)
    assert [(r.rc, r.value, r.value2) for r in across.kernel.ops[KEXEC:]] == [(0, 0, 0), (0, 0x100, 4), (0, 0x200, 16),
                                                                              (0, 0x300000, 0x80)]
    # The map comes from the old kernel's tree, whichever kernel reads it ...
    assert restored_map(across.kernel) == restored_map(own_old.kernel) == restored_map(own_new.kernel)
    # ... and what the next kernel's own API adds is the next kernel's.
    assert (n.walk_nodes, n.scratch_marks) == (own_new.kernel.next.walk_nodes, own_new.kernel.next.scratch_marks)
    assert bool(n.walk_nodes) == (new == "7.3") and bool(n.scratch_marks) == (new == "7.3")


def _verdicts(p: Pair) -> dict[str, object]:
    return {sc.name: triage(compare(sc.program, p), p) for sc in scenarios(12)}


@pytest.mark.parametrize("old,new", [("7.2", "7.3"), ("7.3", "7.2"), ("7.1", "7.2")])
def test_scenarios_across_versions_are_explained_side_by_side(old, new):
    verdicts = _verdicts(pair(old, new))
    assert all(v.status in ("pass", "known") for v in verdicts.values()), \
        {n: v.divergence.line() for n, v in verdicts.items() if v.status == "fail"}
    credited = {(n, k.id) for n, v in verdicts.items() for k in v.known}
    # 7.3's next kernel extends scratch per GiB (extend-scratch-per-gib): credited
    # where 7.3 boots, as the next kernel's quirk, and never where it does not.
    if new == "7.3":
        assert ("scenario.every-order", "extend-scratch-per-gib") in credited
        assert verdicts["scenario.every-order"].next_quirks == {"extend-scratch-per-gib"}
        assert not verdicts["scenario.every-order"].quirks
    else:
        assert not {k for _, k in credited} & {"extend-scratch-per-gib"}
    if old == "7.1":
        # 7.2 refuses 7.1's image: 7.1's next-kernel bug (reserve-size-int-overflow) and
        # every restore bug stay out of it; 7.1's old-kernel bugs do not.
        assert not {k for _, k in credited} & {"reserve-size-int-overflow", "restore-pages-numa-split",
                                               "restore-trusts-page-order", "next-kernel-trusts-tree"}
        assert verdicts["scenario.every-order"].status == "pass"
        assert ("scenario.highest-pfns", "unvalidated-domain") in credited


class TestHandover_7_2_to_7_3(machine_for(pair("7.2", "7.3")).TestCase):
    pass


class TestHandover_7_3_to_7_2(machine_for(pair("7.3", "7.2")).TestCase):
    pass


# A child process with both libraries loaded: a fault in the first-loaded
# library (its own next kernel booting on the corrupted image, while the
# pair runs its old kernel) and one in the second (the other version's next
# kernel) are each contained by the library they happen in.
_TWO_VERSIONS = r"""
import sys
from conformance.compare.diff import compare
from conformance.compare.target import Pair, target_for
from conformance.native.build import build
from conformance.source import fetch
from reference.program import parse_program
old, new = (target_for(build(fetch(v), 12)) for v in sys.argv[1:3])
bad = parse_program("page_shift 12\n---\npreserve_folio 0x10 0\npoke_arena 1 2 0x1000000000\nkexec\nrestore_folio 0x10000\n")
for _ in range(2):
    c = compare(bad, Pair(old, new))
print(c.kernel.events, c.kernel.event_ops, flush=True)
"""


@pytest.mark.parametrize("old,new", [("7.2", "7.3"), ("7.3", "7.2")])
def test_faults_in_either_library_are_contained(old, new):
    get_build(old, 12), get_build(new, 12)
    proc = subprocess.run([sys.executable, "-c", _TWO_VERSIONS, old, new], capture_output=True, text=True, cwd=REPO,
                          env=child_env(), timeout=120)
    assert proc.returncode == 0, f"the process died with {proc.returncode}: {proc.stderr[-1000:]}"
    assert "fault" in proc.stdout and "(2,)" in proc.stdout  # the next kernel's fault, at the kexec


# ---- a finding across versions: saved with both kernels, replayed as saved ----------

_FOLIO = parse_program("page_shift 12\n---\npreserve_folio 0x100 0\npreserve_pages 0x400 8\nkexec\nrestore_folio 0x100000\n")


def test_a_handover_finding_is_saved_and_replayed_exactly(tmp_path):
    """7.3 with a planted next-kernel bug (no noinit marks) boots from 7.2's
    image: the divergence is the next kernel's, the finding names both
    kernels, and ``replay DIR`` alone reruns the same handover."""
    planted = planted_source(tmp_path, "7.3", NOINIT_DROPPED)
    bad = Pair(kernel("7.2"), target_for(build(planted, 12)))
    assert compare(_FOLIO, pair("7.2", "7.3")).ok
    cmp = compare(_FOLIO, bad)
    verdict = triage(cmp, bad)
    assert verdict.status == "fail" and verdict.divergence.check == "next" and verdict.divergence.field == "noinit"
    result = comparison_result("scenario.x", cmp, bad, "", Findings(tmp_path / "crashes"))
    saved = tmp_path / "crashes" / result.divergence["signature"]
    finding = load_finding(saved)
    assert finding["kernel_version"] == "7.2.13" and finding["profile"] == "kho-v4"
    assert finding["next"]["kernel_version"] == "7.3.4" and finding["next"]["profile"] == "kho-v4-keyapi"
    assert finding["next"]["source"]["provider"] == planted.provider
    assert "handover 7.2.13 → 7.3.4" in (saved / "trace.txt").read_text()
    record = _replay_cli(saved)
    assert record["reproduced"] and record["verdict"] == "fail" and record["same_source"]
    assert record["kernel"]["version"] == "7.2.13" and record["next_kernel"]["provider"] == planted.provider


def _replay_cli(path, *flags) -> dict:
    proc = subprocess.run([sys.executable, "-m", "conformance.cli", "replay", "--json", str(path), *flags],
                          capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=300)
    assert proc.returncode in (0, 1) and not proc.stderr, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_replay_of_a_program_across_versions_from_the_command_line(tmp_path):
    program = tmp_path / "p.txt"
    program.write_text(PROGRAM.text())
    to = _replay_cli(program, "--kernel", "7.2", "--handover-to", "7.3")
    back = _replay_cli(program, "--kernel", "7.2", "--handover-from", "7.1")
    assert to["ok"] and to["kernel"]["version"] == "7.2.13" and to["next_kernel"]["version"] == "7.3.4"
    assert back["ok"] and back["kernel"]["version"] == "7.1.13" and back["next_kernel"]["version"] == "7.2.13"
    assert back["kernel_ops"][KEXEC]["rc"] == -EINVAL


def test_fuzzing_a_handover_finds_the_next_kernels_bug(tmp_path):
    """The fuzzer with two bundles (old 7.2, next the planted 7.3) saves the
    divergence as a handover finding that replays as saved."""
    planted = planted_source(tmp_path, "7.3", NOINIT_DROPPED)
    crashes = tmp_path / "crashes"
    stats = run_fuzz(fetch("7.2"), 12, next_source=planted, corpus_dir=tmp_path / "corpus", seconds=10,
                     crashes_dir=crashes, live=False)
    assert stats.execs > 0 and stats.new_findings, stats
    findings = [load_finding(p) for p in stats.new_findings]
    assert all(f["next"]["source"]["provider"] == planted.provider for f in findings)
    noinit = [p for p, f in zip(stats.new_findings, findings) if f["first"]["field"] == "noinit"]
    assert noinit, [f["first"] for f in findings]
    record = _replay_cli(noinit[0])
    assert record["reproduced"] and record["next_kernel"]["flavor"] == "fuzz"


def test_check_with_a_tree_runs_both_directions_against_a_release(tmp_path):
    """``check --kernel-tree T --handover-with 7.3``: the tree's own cell and
    one row per direction, each with the scenarios and the state machine,
    and reproducer commands that replay the same handover."""
    tree = tmp_path / "linux"
    shutil.copytree(fetch("7.2").root, tree)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "conformance.cli", "check", "--kernel-tree", str(tree), "--handover-with",
                           "7.3", "--page-shift", "12", "--flavor", "plain", "--examples", "2", "--fuzz-time", "0",
                           "--out", str(out), "--crashes", str(tmp_path / "crashes")],
                          capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = load_report(out / "report.json")
    assert [c.kernels for c in report.cells] == ["local-7.2.13", "handover local-7.2.13 → 7.3.4", "handover 7.3.4 → local-7.2.13"]
    tree_cell, to, back = report.cells
    assert any(k.name.startswith("doc.") for k in tree_cell.checks)
    for cell in (to, back):
        names = {k.name for k in cell.checks}
        assert "stateful" in names and len([n for n in names if n.startswith("scenario.")]) == len(scenarios(12))
        assert not any(n.startswith(("abi.", "doc.")) for n in names)
    assert to.source["provider"].startswith("tree:") and to.next_source["version"] == "7.3.4"
    assert back.source["version"] == "7.3.4" and back.next_source["provider"].startswith("tree:")
    repro = next(k.reproducer for k in back.checks if k.status == "known")  # a pass gives none
    assert f"--kernel-tree {tree} --handover-from 7.3.4" in repro
    args = shlex.split(repro)[1:] + ["--json"]
    record = json.loads(subprocess.run([sys.executable, "-m", "conformance.cli", *args], capture_output=True, text=True,
                                       cwd=REPO, env=child_env(), timeout=300).stdout)
    assert record["kernel"]["version"] == "7.3.4" and record["next_kernel"]["provider"].startswith("tree:")
    assert record["verdict"] == "known"


def test_trusted_key_wider_than_the_key_width_restores_an_unsigned_long_of_pages():
    """preserve_folio of order 125, which the kernel accepts, leaves a key
    wider than the key width. A next kernel that trusts the tree decodes
    it to an order near 2^32, and the pages restore_folio hands over are
    an unsigned long: 1 << (order mod 64), not a number of 2^32 bits,
    which no divergence record could print (triage of this program raised)."""
    program = parse_program("page_shift 12\narena_pages 16\nram 0x0 0x100000\n---\n"
                            "add_subtree @@ 0xfffffffffffff000 0x0\npreserve_folio 0x0 125\nkexec\nrestore_folio 0x0\n")
    target = target_for(get_build("7.2", 12))
    c = compare(program, target)
    assert c.kernel.ops[1].rc == 0 and c.model.ops[1].rc == -EINVAL  # the kernel takes the order
    triage(c, target)
    _, ops = model.restore(c.kernel.image, program.steps[3:], program.header, target.profile,
                           frozenset({quirks.NEXT_KERNEL_TRUSTS_TREE}))
    assert ops[0].rc == 0 and 0 < ops[0].value2 < 1 << 64 and ops[0].may_time_out
