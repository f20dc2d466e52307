"""The report as a mail: at most 72 columns everywhere, programs and commands
folded so that they still paste (a program back through parse_program, a
command back through a shell), and the parts a reviewer looks for."""

from __future__ import annotations

import re
import subprocess

from test_report import _report

from conformance import report as rp
from conformance.native.coverage import file_coverage
from conformance.report import CoverageResult
from conformance.report.email import WIDTH, fold
from reference.program import MAX_NAME, parse_program

NAME = "n" * MAX_NAME
PROGRAM = ("page_shift 12\narena_pages 256\nram 0x0 0x100000\nnuma 0x0 0\n---\n"
           f"add_subtree {NAME} 0xffffffffffff0000 0xffffffffffffffff\n"
           f"add_subtree 'it'\"'\"'s {NAME[:40]}' 0x1000 0x10\npreserve_folio 0x80000 0\nunpreserve_folio 0x80000 0\n")
COMMAND = "kho-conform replay /home/developer/src/kho-conform/corpus/crashes/" + "3812a9cdd0b6" * 8


def _mail() -> str:
    report = _report()
    failing = report.cells[0].checks[1]
    failing.program, failing.reproducer = PROGRAM, COMMAND
    cov = file_coverage(file="kernel/liveupdate/kexec_handover.c", sha256="0" * 64, text_path="/nonexistent",
                        page_shifts=[12], lines={n: n % 2 for n in range(1, 100)}, branches={3: [1, 0]},
                        functions={"f": (1, 3)}, not_built={120}, changed={2, 3, 4, 120})
    report.coverage = [CoverageResult("7.2.13", {"version": "7.2.13"}, {"scenarios": 52}, cov)]
    report.cells[0].source = report.cells[1].source = {
        **report.cells[0].source, "provider": "tree:/home/dev/linux+series:v2_20261124_dev_kho_fix_rollback.mbx",
        "patches": [["v2_20261124_dev_kho_fix_rollback.mbx#1: [PATCH v2 1/3] kho: roll back only what this call "
                     "preserved when kho_preserve_pages() fails", "ab" * 32]]}
    return rp.render_email(report)


def test_every_line_fits_72_columns():
    text = _mail()
    assert max(len(line) for line in text.splitlines()) <= WIDTH, [line for line in text.splitlines() if len(line) > WIDTH]


def test_what_a_reviewer_reads():
    text = _mail()
    assert text.startswith("Subject: [kho-conform] 7.2.13 + v2_20261124_dev_...: FAIL, 1 new finding\n")
    assert "Verdict: FAIL, 1 new finding" in text and "Finding 1 of 1: signature sig-pfn0" in text
    assert "page shifts: 12, 16; flavors: fuzz, plain" in text and "kho-conform 0.1.0" in text
    flat = " ".join(text.split())  # prose is wrapped
    assert "[PATCH v2 1/3] kho: roll back only what this call preserved" in flat and "sha256 abababababab" in flat
    assert "Known kernel bugs seen (triaged, not new)\n  kho-known-001" in text
    assert "4 changed lines, 3 with code: 1 executed, 2 not executed; 1 not built" in flat
    assert "not executed: 2, 4" in text and "not built: 120" in text
    assert text.endswith("\n-- \nkho-conform 0.1.0\n")


def test_folded_program_parses_back():
    text = _mail()
    block = text.split("  minimized program:\n", 1)[1].split("  replay:\n", 1)[0]
    assert any(line.endswith("\\") for line in block.splitlines())  # something was folded
    assert parse_program(block) == parse_program(PROGRAM)


def test_folded_command_is_the_same_command_in_a_shell():
    text = _mail()
    block = text.split("  replay:\n", 1)[1].split("\n\n", 1)[0]
    assert len(block.splitlines()) > 1
    echoed = subprocess.run(["sh", "-c", "printf '%s\\n' " + block.replace("kho-conform replay", "", 1)],
                            capture_output=True, text=True, check=True).stdout.split()
    assert echoed == COMMAND.split()[2:]


def test_fold_breaks_long_words_and_keeps_short_lines():
    assert fold("short line", "  ", "    ", "") == ["  short line"]
    lines = fold("x" * 200, "  ", "    ", "")
    assert all(len(line) <= WIDTH for line in lines) and re.sub(r"\\\n", "", "\n".join(lines)).strip() == "x" * 200
