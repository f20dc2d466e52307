"""Tests of conformance.report: all four outputs from one synthetic Report."""

from __future__ import annotations

import dataclasses
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from rich.console import Console

from conformance import report as rp
from conformance.report import Cell, CheckResult, FuzzPoint, Report
from conformance.report.html import svg_chart

NASTY = 'ops <b>&"quoted"\' — ünïcode ✓'
REPRO = "kho-conform replay corpus/crashes/abc123/program.txt --kernel 7.2 --page-shift 12"
SOURCE = {"version": "7.2.13", "provider": "debian-source",
          "files": {"kernel/liveupdate/kexec_handover.c": "a" * 64, "include/linux/kexec_handover.h": "b" * 64}}


def _report() -> Report:
    bad = Cell("7.2.13", 12, "fuzz", SOURCE, [
        CheckResult("abi.constants", "pass", 0.01, "constants match"),
        CheckResult("scenario.pfn-zero", "fail", 0.2, f"detail {NASTY}",
                    {"op_index": 3, "op": "preserve_folio(pfn=0, order=0)", "field": "bitmap[0]",
                     "expected": f"expected {NASTY}", "actual": "actual 0x1 & <oops>", "signature": "sig-pfn0", "check": "scenario.pfn-zero"},
                    reproducer=REPRO),
        CheckResult("scenario.high-order", "known", 0.1, "matches known bug",
                    {"op_index": None, "op": "", "field": "count", "expected": "2", "actual": "1", "signature": "sig-ho", "check": "scenario.high-order"},
                    known_id="kho-known-001", reproducer="kho-conform replay corpus/known/sig-ho/program.txt"),
        CheckResult("stateful", "skipped", 0.0, "hypothesis not installed"),
        CheckResult("fuzz", "pass", 30.0, "30 s"),
    ], [FuzzPoint(0, 0, 0.0, 10, 1, 0), FuzzPoint(10, 5000, 500.0, 120, 14, 0), FuzzPoint(30, 20000, 750.5, 180, 20, 1)], 12.5)
    good = Cell("7.2.13", 16, "plain", SOURCE, [
        CheckResult("abi.constants", "pass", 0.01), CheckResult("scenario.pfn-zero", "pass", 0.1),
        CheckResult("stateful", "pass", 2.0),
    ])
    return Report("KHO conformance", "2025-01-02T03:04:05+00:00", "0.1.0", [bad, good], [f"doc says X, code does Y {NASTY}"])


@pytest.fixture
def written(tmp_path: Path) -> tuple[Report, dict[str, Path]]:
    report = _report()
    return report, rp.write_report(report, tmp_path / "out")


def test_files_exist(written) -> None:
    _, paths = written
    assert set(paths) == {"markdown", "html", "json", "junit"}
    assert [p.name for p in paths.values()] == ["report.md", "report.html", "report.json", "junit.xml"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())


def test_json_round_trip(written) -> None:
    report, paths = written
    assert rp.load_report(paths["json"]) == report


def test_junit_counts_and_structure(written) -> None:
    _, paths = written
    root = ET.parse(paths["junit"]).getroot()
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["7.2.13 ps12 fuzz", "7.2.13 ps16 plain"]
    assert [len(s.findall("testcase")) for s in suites] == [5, 3]
    first = suites[0]
    assert (first.get("tests"), first.get("failures"), first.get("errors"), first.get("skipped")) == ("5", "1", "0", "1")
    failures = root.findall(".//failure")
    assert len(failures) == 1 and failures[0].get("type") == "sig-pfn0"
    assert failures[0].get("message") == f"detail {NASTY}"  # escaped on write, intact after parsing
    assert NASTY in failures[0].text and REPRO in failures[0].text
    assert len(root.findall(".//skipped")) == 1 and not root.findall(".//error")
    known = [c for c in root.iter("testcase") if c.get("name") == "scenario.high-order"][0]
    assert known.find("failure") is None and "kho-known-001" in known.find("system-out").text


def test_html_matrix_and_charts(written) -> None:
    _, paths = written
    text = paths["html"].read_text(encoding="utf-8")
    assert "<script" not in text and "http" not in text.replace("http://www.w3.org/2000/svg", "")
    # 2 cells x (all checks + 5 families: abi, two scenario families, state machine, fuzz);
    # the plain cell runs no high-order scenario and no fuzzing.
    assert len(re.findall(r"<td class='sq ", text)) == 10
    assert len(re.findall(r"<td class='none'", text)) == 2
    assert "class='sq fail'" in text and "class='sq known'" in text and "class='sq skipped'" in text
    # every square opens its family's checks in its cell; failing families are open
    targets = re.findall(r"<td class='sq [a-z]+'[^>]*><a href='#([^']+)'", text)
    assert len(targets) == 10 and all(f"id='{t}'" in text for t in targets)
    assert "<details class='fam' id='fam-0-scenario-pfn_zero' open>" in text
    assert "<details class='fam' id='fam-1-scenario-pfn_zero'>" in text
    # Two charts (coverage, exec/s), one series each: only one cell has a timeline.
    assert text.count("<svg") == 2 and text.count("<polyline") == 2
    assert REPRO in text and "sig-pfn0" in text and "bitmap[0]" in text and "a" * 64 in text


def test_check_families() -> None:
    names = ["abi.constants", "abi.key-encoding", "doc.compatible", "scenario.every-order", "scenario.alloc-failure-1",
             "scenario.alloc-failure-12", "scenario.corrupt-fdt", "scenario.corrupt-root", "scenario.subtrees",
             "scenario.subtree-overflow", "stateful", "fuzz", "handover.c-to-model"]
    fam = rp.schema.check_families(names)
    assert fam["abi.key-encoding"] == fam["abi.constants"] == ("abi", "ABI")
    assert fam["scenario.alloc-failure-12"] == fam["scenario.alloc-failure-1"] == ("scenario", "alloc-failure")
    assert fam["scenario.corrupt-root"] == fam["scenario.corrupt-fdt"] == ("scenario", "corrupt")
    assert fam["scenario.subtrees"] != fam["scenario.subtree-overflow"]
    assert fam["stateful"] == ("stateful", "state machine") and fam["handover.c-to-model"] == ("handover", "handover")


def test_new_findings_once_per_signature(written) -> None:
    report, paths = written
    twice = dataclasses.replace(report.cells[0], page_shift=14)
    report.cells.append(twice)
    found = rp.schema.new_findings(report)
    assert [f.signature for f in found] == ["sig-pfn0"] and len(found[0].seen) == 2
    text = paths["html"].read_text(encoding="utf-8")
    assert "<h2 id='findings'>New findings (1)</h2>" in text and "1 new finding" in text


def test_html_without_fuzz_data(tmp_path: Path) -> None:
    report = _report()
    report.cells[0].fuzz_timeline = []
    text = rp.write_report(report, tmp_path)["html"].read_text(encoding="utf-8")
    assert "<svg" not in text and "No fuzz data" in text


def test_chart_series_per_cell() -> None:
    series = [("a", [(0, 0), (5, 10)]), ("b", [(0, 1)]), ("c", [(1, 2), (2, 3), (3, 4)])]
    svg = svg_chart("t", "y", series)
    assert svg.count("<polyline") == 3
    ET.fromstring(svg)  # well-formed on its own


def test_special_characters_escaped(written) -> None:
    _, paths = written
    text = paths["html"].read_text(encoding="utf-8")
    assert NASTY not in text and "<b>" not in text and "<oops>" not in text
    assert "ops &lt;b&gt;&amp;&quot;quoted&quot;&#x27; — ünïcode ✓" in text
    assert "actual 0x1 &amp; &lt;oops&gt;" in text
    ET.parse(paths["junit"])  # would raise on unescaped characters


def test_control_characters_stay_valid_xml(tmp_path: Path) -> None:
    report = _report()
    report.cells[0].checks[1].detail = "bell\x07 nul\x00 surrogate\udc80"
    paths = rp.write_report(report, tmp_path)
    ET.parse(paths["junit"])
    assert rp.load_report(paths["json"]) == report


def test_markdown_content(written) -> None:
    report, paths = written
    text = paths["markdown"].read_text(encoding="utf-8")
    assert text.startswith("# KHO conformance\n") and "2025-01-02T03:04:05+00:00" in text
    for cell in report.cells:
        for check in cell.checks:
            assert check.name in text
    assert REPRO in text and "kho-known-001" in text
    assert "## Divergences" in text and "## Kernel sources" in text and "## Notes" in text
    assert "| 7.2.13 | 12 | fuzz | 2 | 1 | 1 | 0 | 1 | ❌ |" in text
    assert "| 7.2.13 | 16 | plain | 3 | 0 | 0 | 0 | 0 | ✅ |" in text
    assert f"```\nexpected {NASTY}\n```" in text  # code blocks keep the raw text
    assert "| 7.2.13 ps12 fuzz | 30 | 20000 | 750 | 180 | 20 | 1 |" in text
    assert "a" * 64 in text and "debian-source" in text
    assert text.count("## Kernel sources") == 1 and text.count("### 7.2.13 (") == 1  # shared source listed once


def test_exit_status() -> None:
    report = _report()
    assert rp.exit_status(report) == 1
    report.cells[0].checks[1].status = "known"
    assert rp.exit_status(report) == 0
    report.cells[1].checks[0] = CheckResult("abi.constants", "error", detail="driver crashed")
    assert rp.exit_status(report) == 1


def test_bad_status_rejected() -> None:
    with pytest.raises(ValueError):
        CheckResult("x", "passed")


def test_summary_table() -> None:
    report = _report()
    table = rp.summary_table(report)
    assert table.row_count == 2 and len(table.columns) == 8
    console = Console(record=True, width=120)
    console.print(table)
    out = console.export_text()
    assert "7.2.13" in out and "fuzz" in out and "plain" in out


def test_load_report_ignores_missing_optionals(tmp_path: Path) -> None:
    report = Report("t", "now", "0", [Cell("7.1", 14, "asan", {}, [CheckResult("a", "pass")])])
    data = dataclasses.asdict(report)
    # what a report.json written before coverage and minimized programs lacks, too
    del data["notes"], data["cells"][0]["fuzz_timeline"], data["cells"][0]["build_seconds"], data["coverage"]
    del data["cells"][0]["next_kernel"], data["cells"][0]["next_source"]  # ... and before handover rows
    del data["cells"][0]["checks"][0]["program"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    assert rp.load_report(path) == report


NEXT_SOURCE = {"version": "7.3.4", "provider": "debian-source", "files": {"kernel/liveupdate/kexec_handover.c": "c" * 64}}
HANDOVER = "handover 7.2.13 → 7.3.4"


def test_handover_rows_in_every_format(tmp_path: Path) -> None:
    report = _report()
    report.cells.append(Cell("7.2.13", 12, "plain", SOURCE, [
        CheckResult("scenario.pfn-zero", "pass", 0.1),
        CheckResult("scenario.every-order", "known", 0.1, "the next kernel's quirk", known_id="extend-scratch-per-gib"),
        CheckResult("stateful", "pass", 1.0)], next_kernel="7.3.4", next_source=NEXT_SOURCE))
    paths = rp.write_report(report, tmp_path)
    assert rp.load_report(paths["json"]) == report
    md = paths["markdown"].read_text(encoding="utf-8")
    assert f"| {HANDOVER} | 12 | plain | 2 | 0 | 1 | 0 | 0 | ⚠ |" in md and f"## {HANDOVER} ps12 plain" in md
    assert "7.2.13 via debian-source (files" in md and "→ 7.3.4 via debian-source" in md and "### 7.3.4 (" in md
    html = paths["html"].read_text(encoding="utf-8")
    assert f">{HANDOVER} ps12 plain</a></th>" in html and "c" * 64 in html
    row = next(r for r in html.split("<tr>") if f">{HANDOVER} ps12 plain</a></th>" in r)
    # in the same matrix: no ABI checks, no fuzzing and no high-order scenario in that row
    assert row.count("<td class='sq ") == 1 + 3 and row.count("<td class='none'") == 3
    suite = [s for s in ET.parse(paths["junit"]).getroot().findall("testsuite") if s.get("name") == f"{HANDOVER} ps12 plain"]
    props = {p.get("name"): p.get("value") for p in suite[0].find("properties")}
    assert props["source.version"] == "7.2.13" and props["next_source.version"] == "7.3.4"
    console = Console(record=True, width=100)
    console.print(rp.summary_table(report))
    assert HANDOVER in console.export_text()
    assert HANDOVER in rp.render_email(report)

