"""Coverage of kexec_handover.c from the coverage build flavor, with the lines
a patch changed marked: a program that never unpreserves leaves the planted
patch's lines unexecuted, one that does executes them. Reports show it; the
annotated source is read from the cache at render time, never stored.

The planted patch is made in tmp_path from the cached kernel file."""

from __future__ import annotations

import json

import pytest
from planted import planted_patch

from conformance import report as rp
from conformance.check import measure_coverage
from conformance.native.coverage import merge, parse_lcov
from conformance.report import CoverageResult, Report
from conformance.source import resolve
from conformance.source.tree_files import KHO_C

PRESERVE = "page_shift 12\n---\npreserve_folio 0x80000 0\n"
UNPRESERVE = PRESERVE + "unpreserve_folio 0x80000 0\n"


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> tuple[CoverageResult, CoverageResult]:
    tmp = tmp_path_factory.mktemp("coverage")
    source = resolve("7.2", None, None, planted_patch(tmp))
    out = []
    for name, text in (("preserve", PRESERVE), ("unpreserve", UNPRESERVE)):
        program = tmp / f"{name}.txt"
        program.write_text(text)
        out.append(measure_coverage(source, (12,), tmp / name, scenarios=False, programs={12: [program]}))
    return out[0], out[1]


def _function(result: CoverageResult, name: str):
    return next(f for f in result.file.functions if f.name == name)


def test_changed_lines_nothing_executed_are_listed(measured):
    preserve, unpreserve = measured
    f = preserve.file
    assert preserve.runs == {"scenarios": 0, "stateful": 0, "programs": 1, "corpus": 0}
    assert f.file == KHO_C and f.page_shifts == [12] and f.changed  # the lines either side of the removed one
    changed = {n for a, b in f.changed for n in range(a, b + 1)}
    counts = f.counts()
    assert f.totals["changed_executable"] >= 1 and not f.changed_not_built
    assert {n for a, b in f.changed_not_run for n in range(a, b + 1)} == {n for n in changed if n in counts}
    deleting = _function(preserve, "kho_radix_del_page")
    assert deleting.calls == 0 and deleting.changed >= 1 and deleting.changed_covered == 0
    assert _function(preserve, "kho_unpreserve_folio").calls == 0 and _function(preserve, "kho_radix_add_page").calls >= 3
    # code the extraction leaves out (not reached by the driver) is no executable line
    assert f.not_built and not {n for a, b in f.not_built for n in range(a, b + 1)} & set(counts)
    assert 0 < f.totals["covered"] < f.totals["lines"] and f.totals["branches_taken"] <= f.totals["branches"]


def test_executed_changed_lines(measured):
    _, unpreserve = measured
    f = unpreserve.file
    assert not f.changed_not_run and f.totals["changed_covered"] == f.totals["changed_executable"] >= 1
    assert _function(unpreserve, "kho_radix_del_page").calls == _function(unpreserve, "kho_unpreserve_folio").calls == 1


def test_page_shifts_merge_by_summing(measured):
    preserve, unpreserve = measured
    both = merge([preserve.file, unpreserve.file])
    assert both.counts() == {n: c + unpreserve.file.counts()[n] for n, c in preserve.file.counts().items()}
    assert both.changed == preserve.file.changed and not both.changed_not_run


def test_reports_show_it(measured, tmp_path):
    preserve, _ = measured
    report = Report("KHO radix tree conformance", "now", "0.1.0", [], coverage=[preserve])
    paths = rp.write_report(report, tmp_path)
    assert rp.load_report(paths["json"]) == report
    data = json.loads(paths["json"].read_text())["coverage"][0]["file"]
    assert data["changed_not_run"] == preserve.file.changed_not_run and data["functions"] and data["lines"]
    html = paths["html"].read_text()
    kernel_lines = open(preserve.file.text_path).read().split("\n")
    first_changed = preserve.file.changed_not_run[0][0]
    row = html.split(f"<tr id='cov-0-L-{first_changed}' ", 1)[1].split("</tr>", 1)[0]
    assert "class='miss chg'" in row and kernel_lines[first_changed - 1].strip() in row.replace("&gt;", ">")
    assert "Changed lines nothing executed:" in html and "kho_radix_del_page" in html
    assert "kho_radix_del_page" in paths["markdown"].read_text()
    assert "not executed: " in rp.render_email(report)


def test_parse_lcov_keeps_the_kernel_file_only():
    lcov = ("SF:/b/stage/include/linux/log2.h\nFN:3,kexec_handover.c:ilog2\nFNDA:5,kexec_handover.c:ilog2\nDA:3,5\nend_of_record\n"
            f"SF:/b/stage/{KHO_C}\nFN:10,kho_x\nFN:20,{KHO_C.rsplit('/', 1)[1]}:kho_y\nFNDA:2,kho_x\nFNDA:0,"
            f"{KHO_C.rsplit('/', 1)[1]}:kho_y\nDA:10,2\nDA:11,0\nDA:20,0\nBRDA:11,0,0,2\nBRDA:11,0,1,-\nend_of_record\n")
    lines, branches, functions = parse_lcov(lcov, KHO_C)
    assert lines == {10: 2, 11: 0, 20: 0} and branches == {11: [2, 0]}
    assert functions == {"kho_x": (10, 2), "kho_y": (20, 0)}
