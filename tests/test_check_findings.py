"""check saves each new failure once per signature, minimized, as a finding
that replay, the mail and export kunit use (planted patch made in tmp_path)."""

from __future__ import annotations

from test_fuzz_planted import planted_patch

from conformance.check import Findings, comparison_result
from conformance.compare.diff import compare
from conformance.compare.target import target_for
from conformance.native.build import build
from conformance.source import resolve
from fuzz.findings import load_finding
from reference.program import parse_program

LONG = """page_shift 12
---
preserve_folio 0x100 0
preserve_pages 0x200 0x10
add_subtree a 0x1000 0x10
preserve_folio 0x80000 0
unpreserve_folio 0x80000 0
preserve_folio 0x300 2
"""


def test_new_failure_is_saved_minimized_once_per_signature(tmp_path):
    target = target_for(build(resolve("7.2", None, None, planted_patch(tmp_path)), 12))
    findings = Findings(tmp_path / "crashes")
    program = parse_program(LONG)
    result = comparison_result("scenario.x", compare(program, target), target, "kho-conform replay x.txt", findings)
    assert result.status == "fail"
    saved = tmp_path / "crashes" / result.divergence["signature"]
    assert result.reproducer == f"kho-conform replay {saved}" and load_finding(saved)["signature"] == saved.name
    small = parse_program(result.program)
    assert len(small.steps) < len(program.steps) and small == parse_program((saved / "program.txt").read_text())
    # the same signature from another program: the saved finding is reused, not saved again
    other = parse_program(LONG.replace("0x80000", "0x90000"))
    again = comparison_result("stateful", compare(other, target), target, "", findings)
    assert again.reproducer == result.reproducer and again.program == result.program
    assert [p.name for p in (tmp_path / "crashes").iterdir()] == [saved.name]
    # without a store (or for a pass) nothing is saved
    assert comparison_result("x", compare(program, target), target, "r").program == ""
