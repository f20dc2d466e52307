"""The HTML report in headless Chromium at 1280 px: a matrix of six cells with
over a hundred checks each, long divergences, reproducers and an annotated
coverage view, without horizontal scrolling. (The annotated "source" here is
made up: no kernel text is part of this repository.)"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conformance import report as rp
from conformance.native.coverage import file_coverage
from conformance.report import Cell, CheckResult, CoverageResult, Report

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (make test installs it: APT_PACKAGES)")
WIDTH = 1280
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--window-size={WIDTH},2000"]
LONG = "kho-conform replay /very/long/path/to/the/developer/checkout/corpus/crashes/" + "0123456789abcdef" * 6
# Scrolling width and viewport width, written into the DOM once laid out.
MEASURE = ("<script>document.body.setAttribute('data-measure', document.documentElement.scrollWidth + ' ' "
           "+ document.documentElement.clientWidth)</script></body>")


def big_report(tmp_path: Path) -> Report:
    families = ["empty-tree", "every-order", "pfn-zero", "highest-pfns", "numa-crossing", "ram-holes", "subtrees",
                "subtree-overflow", "restore-pages-numa", "range-2^40", "widest-orders", "corrupt-root",
                "corrupt-fdt", "corrupt-table", "restore-trusts-order", "unaligned-folio", "vmalloc", "alloc-preserve"]
    cells = []
    for kernel in ("7.2.13", "7.3.4"):
        for ps in (12, 14, 16):
            checks = [CheckResult("abi.constants", "pass"), CheckResult("abi.key-encoding", "pass"),
                      CheckResult("doc.compatible", "known", detail="doc says kho-v3", known_id="doc-compatible-stale")]
            checks += [CheckResult(f"scenario.alloc-failure-{i}", "pass") for i in range(1, 46)]
            for j, name in enumerate(families):
                for k in range(3):
                    status = "fail" if (j, k) == (2, 1) else "known" if j == 9 else "pass"
                    div = {"check": "tree", "op_index": 1, "op": "unpreserve_folio 0x0 0", "field": "tree[2, 0, 0, 0, 0]",
                           "expected": "((2, 0, 0, 0, 0), 0, ())" + " x" * 150, "actual": "((2, 0, 0, 0, 0), 0, (0,))",
                           "signature": f"sig{j}"} if status != "pass" else None
                    checks.append(CheckResult(f"scenario.{name}" + (f"-{k}" if k else ""), status, 0.01,
                                              "detail " * 40 if status != "pass" else "", div,
                                              known_id="range-int-shift" if status == "known" else "",
                                              reproducer=LONG if status != "pass" else "",
                                              program="page_shift 12\n---\npreserve_folio 0x0 0\n" if status == "fail" else ""))
            checks += [CheckResult("stateful", "pass"), CheckResult("fuzz", "pass")]
            cells.append(Cell(kernel, ps, "plain", {"version": kernel, "provider": "tree:/home/dev/linux"}, checks))
    text = tmp_path / "made-up.c"
    text.write_text("".join(f"\tstatement_{n}({'argument, ' * (n % 17)});\n" for n in range(1, 400)))
    cov = file_coverage(file="kernel/liveupdate/kexec_handover.c", sha256=hashlib.sha256(text.read_bytes()).hexdigest(),
                        text_path=str(text), page_shifts=[12, 14, 16], lines={n: n % 3 for n in range(10, 380)},
                        branches={n: [1, 0] for n in range(10, 380, 7)}, functions={f"fn_{n}": (n, n % 2) for n in range(10, 380, 30)},
                        not_built=set(range(380, 399)), changed=set(range(100, 110)) | {385})
    return Report("KHO radix tree conformance", "2026-11-24T00:00:00+00:00", "0.1.0", cells,
                  coverage=[CoverageResult("7.3.4", {"version": "7.3.4"}, {"scenarios": 52}, cov)])


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)


def test_matrix_fits_1280_px_without_horizontal_scrolling(tmp_path):
    report = big_report(tmp_path)
    assert all(len(c.checks) >= 100 for c in report.cells)
    html = rp.write_report(report, tmp_path / "out")["html"]
    measured = tmp_path / "measured.html"
    measured.write_text(html.read_text(encoding="utf-8").replace("</body>", MEASURE), encoding="utf-8")
    dom = _chromium(tmp_path, "--dump-dom", measured.as_uri()).stdout
    m = re.search(r'data-measure="(\d+) (\d+)"', dom)
    assert m, dom[-2000:]
    scroll, client = map(int, m.groups())
    assert 1000 < client <= WIDTH and scroll <= client, (scroll, client)
    shot = tmp_path / "report.png"
    _chromium(tmp_path, f"--screenshot={shot}", html.as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_the_measurement_catches_a_wide_page(tmp_path):
    """The measurement can fail: a page wider than the window is caught."""
    page = tmp_path / "wide.html"
    page.write_text(f"<!DOCTYPE html><html><body><div style='width:{WIDTH + 400}px'>x</div>{MEASURE}</html>")
    scroll, client = map(int, re.search(r'data-measure="(\d+) (\d+)"', _chromium(tmp_path, "--dump-dom", page.as_uri()).stdout).groups())
    assert scroll > client
