"""The report as one self-contained HTML page (``report.html``), without
scripts: a matrix of cells by check family that opens onto each family's
checks (``<details>``, expanded where something failed), the new findings,
the kernel file's coverage with the patch series' lines marked, fuzzing
charts and the sources. It fits a 1280 px wide window without horizontal
scrolling (tests/test_report_browser.py checks that in Chromium)."""

from __future__ import annotations

import hashlib
import html
import math
import re
from pathlib import Path
from typing import Any

from ..native.coverage import FileCoverage
from ..source.identity import short_digest
from .schema import (
    GROUPS,
    MUTANT_STATUSES,
    STATUSES,
    WORST_FIRST,
    Cell,
    CheckResult,
    CoverageResult,
    MutationResult,
    Report,
    check_families,
    check_names,
    clean,
    divergence_fields,
    mutation_rows,
    mutation_settings,
    mutation_summary,
    new_findings,
    source_label,
    sources_label,
    unique_sources,
    worst,
)
from .style import COLOURS, SERIES, SYMBOLS

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1200px;color:#1f2328;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;font-size:13px;overflow-wrap:anywhere}
th{background:#f6f8fa}td.num{text-align:right}code,pre{font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
pre{background:#f6f8fa;padding:.6em;white-space:pre-wrap;overflow-wrap:anywhere;margin:.2em 0}
a{color:#0969da}.meta{color:#59636e}.verdict{font-size:1.15em;font-weight:600}
table.matrix{width:100%;table-layout:fixed}table.matrix th,table.matrix td{padding:2px;text-align:center;font-size:12px}
table.matrix th.cell{width:150px;text-align:left;padding-left:6px}table.matrix th.total{width:64px}
table.matrix th.fam{writing-mode:vertical-rl;transform:rotate(180deg);font-weight:normal;white-space:nowrap;height:8em;
vertical-align:bottom;text-align:left;padding:4px 0}
table.matrix td a{display:block;color:#fff;text-decoration:none;font-weight:600;line-height:1.25;padding:2px 0}
table.matrix td.none{background:#eaeef2}
details{margin:.3em 0}summary{cursor:pointer}details.fam{margin-left:.6em}
.div{border-left:4px solid #cf222e;padding:.2em 1em;margin:.6em 0}.div.known{border-color:#bf8700}
svg{background:#fff;border:1px solid #d0d7de;margin:.5em 0;max-width:100%}
table.cov{width:100%;table-layout:fixed}table.cov td{border:0;padding:0 6px;font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace;
white-space:pre-wrap;overflow-wrap:anywhere}table.cov td.n,table.cov td.c{width:5em;text-align:right;color:#59636e}
table.cov td.b{width:5em;color:#59636e}table.cov td.m{width:1.2em;padding:0}
tr.hit td.src{background:#dafbe1}tr.miss td.src{background:#ffebe9}tr.off td.src{color:#8c959f}
tr.chg td.m{background:#8250df;color:#fff;text-align:center}tr.chg td.n{font-weight:bold;color:#1f2328}
.key span{display:inline-block;padding:0 .5em;margin-right:.5em}
"""


def _e(text: Any) -> str:
    return html.escape(clean(text), quote=True)


def _slug(*parts: object) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9_]+", "_", str(p)) for p in parts)


def _matrix(report: Report, families: dict[str, tuple[str, str]]) -> str:
    """Cells by check family: counts per family, coloured by the worst status,
    each linking to that family's checks in that cell."""
    columns = list(dict.fromkeys(sorted(families.values(), key=lambda gf: list(GROUPS).index(gf[0]) if gf[0] in GROUPS
                                        else len(GROUPS))))
    spans = [(g, [c for c in columns if c[0] == g]) for g in dict.fromkeys(g for g, _ in columns)]
    # A group of one family (ABI, state machine, fuzz) is one column headed by its name.
    top = "".join(f"<th class='fam' rowspan='2'>{_e(GROUPS.get(g, g))}</th>" if len(cols) == 1 and cols[0][1] == GROUPS.get(g, g)
                  else f"<th colspan='{len(cols)}'>{_e(GROUPS.get(g, g))}</th>" for g, cols in spans)
    second = "".join(f"<th class='fam' title='{_e(GROUPS.get(g, g))}: {_e(f)}'>{_e(f)}</th>" for g, cols in spans
                     if not (len(cols) == 1 and cols[0][1] == GROUPS.get(g, g)) for _, f in cols)
    head = ("<table class='matrix'><tr><th class='cell' rowspan='2'>cell</th><th class='total' rowspan='2'>all checks</th>"
            + top + "</tr><tr>" + second + "</tr>")
    rows = []
    for i, c in enumerate(report.cells):
        by_family: dict[tuple[str, str], list[CheckResult]] = {}
        for k in c.checks:
            by_family.setdefault(families[k.name], []).append(k)
        n = c.counts()
        status = worst([k.status for k in c.checks])
        tds = [f"<th class='cell'><a href='#{_slug('cell', i)}'>{_e(c.name)}</a></th>",
               _square(status, f"{n['pass']}/{len(c.checks)}", f"#{_slug('cell', i)}", _counts_title(n))]
        for col in columns:
            checks = by_family.get(col)
            if not checks:
                tds.append("<td class='none' title='not run'></td>")
                continue
            fam_status = worst([k.status for k in checks])
            passed = sum(k.status == "pass" for k in checks)
            counts = {s: sum(k.status == s for k in checks) for s in STATUSES}
            tds.append(_square(fam_status, f"{passed}/{len(checks)}", f"#{_slug('fam', i, *col)}",
                               f"{col[1]}: {_counts_title(counts)}"))
        rows.append("<tr>" + "".join(tds) + "</tr>")
    return head + "".join(rows) + "</table>"


def _counts_title(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {s}" for s, v in counts.items() if v)


def _square(status: str, text: str, href: str, title: str) -> str:
    return (f"<td class='sq {status}' style='background:{COLOURS[status]}' title='{_e(title)}'>"
            f"<a href='{href}'>{SYMBOLS[status]}<br>{_e(text)}</a></td>")


def _divergence(k: CheckResult, c: Cell) -> str:
    """A failing or known check: its first divergence and how to reproduce it."""
    d = k.divergence or {}
    known = f" (known: {_e(k.known_id)})" if k.status == "known" else ""
    rows = [[f"<th>{label}</th>", f"<td><code>{_e(v)}</code></td>"] for label, v in divergence_fields(k)]
    rows.append(["<th>kernel source</th>", f"<td>{_e(sources_label(c))}</td>"])
    out = (f"<div class='div {k.status}'><p><strong>{_e(k.name)}</strong>{known}: {_e(k.detail)}</p>" + _table(["", ""], rows)
           + (f"<p>Expected (model):</p><pre>{_e(d.get('expected', ''))}</pre>"
              f"<p>Actual (kernel C):</p><pre>{_e(d.get('actual', ''))}</pre>" if d else ""))
    if k.reproducer:
        out += f"<p>Reproduce:</p><pre>{_e(k.reproducer)}</pre>"
    if k.program:
        out += f"<p>Minimized program:</p><pre>{_e(k.program)}</pre>"
    return out + "</div>"


def _drilldown(report: Report, families: dict[str, tuple[str, str]]) -> str:
    """Per cell, per family: the checks, in a block that is open where
    something failed or a known bug showed, with each divergence and its
    reproducer (one click from the matrix)."""
    parts = ["<h2>Checks by cell</h2>"]
    for i, c in enumerate(report.cells):
        n = c.counts()
        # Headings, not a collapsed block: a link into a closed <details> would land on nothing visible.
        parts.append(f"<h3 id='{_slug('cell', i)}'>{_e(c.name)}: {_e(_counts_title(n))}</h3><p class='meta'>Source "
                     f"{_e(sources_label(c))}; build {c.build_seconds:.1f} s.</p>")
        by_family: dict[tuple[str, str], list[CheckResult]] = {}
        for k in c.checks:
            by_family.setdefault(families[k.name], []).append(k)
        for (g, f), checks in by_family.items():
            status = worst([k.status for k in checks])
            open_ = status in ("fail", "error", "known")
            counts = {s: sum(k.status == s for k in checks) for s in STATUSES}
            parts.append(f"<details class='fam' id='{_slug('fam', i, g, f)}'{' open' if open_ else ''}><summary>"
                         f"<span style='color:{COLOURS[status]}'>{SYMBOLS[status]}</span> {_e(GROUPS.get(g, g))}"
                         f"{' / ' + _e(f) if f != GROUPS.get(g, g) else ''}: {_e(_counts_title(counts))}</summary>")
            parts.append(_table(["check", "status", "seconds", "detail"], [
                [f"<td><code>{_e(k.name)}</code></td>", f"<td style='color:{COLOURS[k.status]}'>{SYMBOLS[k.status]} {k.status}</td>",
                 f"<td class='num'>{k.seconds:.2f}</td>", f"<td>{_e(k.detail)}</td>"] for k in checks]))
            parts += [_divergence(k, c) for k in checks if k.status in ("fail", "known")]
            parts.append("</details>")
    return "".join(parts)


def _findings(report: Report) -> str:
    found = new_findings(report)
    if not found:
        return ""
    parts = [f"<h2 id='findings'>New findings ({len(found)})</h2>"]
    for f in found:
        where = ", ".join(f"{k.name} in {c.name}" for c, k in f.seen[:6]) + (" …" if len(f.seen) > 6 else "")
        parts.append(f"<p>Signature <code>{_e(f.signature)}</code>, seen in {_e(where)}:</p>" + _divergence(f.check, f.cell))
    return "".join(parts)


def _kernel_lines(cov: FileCoverage) -> list[str] | None:
    """The measured file's text, if it is still on this machine as measured."""
    try:
        data = Path(cov.text_path).read_bytes()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != cov.sha256:
        return None
    return data.decode("utf-8", "replace").split("\n")


def _coverage_summary(i: int, r: CoverageResult) -> str:
    f, t = r.file, r.file.totals
    pct = lambda a, b: f"{100 * a / b:.1f}%" if b else "–"  # noqa: E731
    runs = ", ".join(f"{n} {kind}" for kind, n in r.runs.items())
    out = [f"<h3>{_e(r.kernel)}: <code>{_e(f.file)}</code></h3>",
           f"<p class='meta'>Page shifts {', '.join(map(str, f.page_shifts))}; ran {_e(runs)} on the coverage build; "
           f"source {_e(source_label(r.source))}.</p>",
           _table(["", "executed", "of", ""], [
               ["<th>lines</th>", f"<td class='num'>{t['covered']}</td>", f"<td class='num'>{t['lines']}</td>",
                f"<td>{pct(t['covered'], t['lines'])}</td>"],
               ["<th>branch outcomes</th>", f"<td class='num'>{t['branches_taken']}</td>", f"<td class='num'>{t['branches']}</td>",
                f"<td>{pct(t['branches_taken'], t['branches'])}</td>"],
               ["<th>functions</th>", f"<td class='num'>{t['functions_called']}</td>", f"<td class='num'>{t['functions']}</td>",
                f"<td>{pct(t['functions_called'], t['functions'])}</td>"],
               ["<th>changed lines with code</th>", f"<td class='num'>{t['changed_covered']}</td>",
                f"<td class='num'>{t['changed_executable']}</td>", f"<td>{pct(t['changed_covered'], t['changed_executable'])}</td>"],
           ])]
    if f.changed:
        out.append(f"<p>The patch series changed lines {_line_links(i, f.changed)}.</p>")
        if f.changed_not_run:
            out.append(f"<p><strong>Changed lines nothing executed:</strong> {_line_links(i, f.changed_not_run)}.</p>")
        else:
            out.append("<p>Every changed line with code was executed.</p>")
        if f.changed_not_built:
            out.append(f"<p><strong>Changed lines the harness does not build</strong> (outside what the driver reaches): "
                       f"{_line_links(i, f.changed_not_built)}.</p>")
    else:
        out.append("<p class='meta'>No patch series applied: no changed lines to mark.</p>")
    out.append(_table(["function", "line", "calls", "lines executed", "changed lines executed"], [
        [f"<td><code>{_e(fn.name)}</code></td>", f"<td class='num'><a href='#{_slug('cov', i, 'L', fn.line)}'>{fn.line}</a></td>",
         f"<td class='num'>{fn.calls}</td>", f"<td class='num'>{fn.covered}/{fn.lines}</td>",
         f"<td class='num'>{f'{fn.changed_covered}/{fn.changed}' if fn.changed else ''}</td>"] for fn in f.functions]))
    return "".join(out)


def _line_links(i: int, runs: list[list[int]]) -> str:
    return ", ".join(f"<a href='#{_slug('cov', i, 'L', a)}'>{a if a == b else f'{a}-{b}'}</a>" for a, b in runs)


def _annotated(i: int, r: CoverageResult) -> str:
    f = r.file
    text = _kernel_lines(f)
    counts = f.counts()
    branches = {line: c for line, c in f.branches}
    changed = {n for a, b in f.changed for n in range(a, b + 1)}
    not_built = {n for a, b in f.not_built for n in range(a, b + 1)}
    last = max([len(text or [])] + [n for n in counts] + [b for _, b in f.changed] + [0])
    head = (f"<details id='{_slug('cov', i, 'file')}' open><summary><strong>{_e(r.kernel)}: {_e(f.file)}</strong>, annotated</summary>"
            "<p class='key'><span style='background:#dafbe1'>executed</span><span style='background:#ffebe9'>not executed</span>"
            "<span style='color:#8c959f'>not built here</span><span style='background:#8250df;color:#fff'>±</span>changed by "
            "the series; counts are executions, branches are outcomes taken/outcomes.</p>")
    if text is None:
        head += f"<p class='meta'>{_e(f.text_path)} is not on this machine as measured: line numbers only.</p>"
    rows = []
    for n in range(1, last + 1):
        cls = "hit" if counts.get(n, 0) > 0 else "miss" if n in counts else "off" if n in not_built else ""
        cls += " chg" if n in changed else ""
        b = branches.get(n)
        rows.append(f"<tr id='{_slug('cov', i, 'L', n)}' class='{cls.strip()}'><td class='m'>{'±' if n in changed else ''}</td>"
                    f"<td class='n'>{n}</td><td class='c'{f' title={counts[n]}' if n in counts else ''}>"
                    f"{_num(counts[n]) if n in counts else ''}</td>"
                    f"<td class='b'>{f'{sum(x > 0 for x in b)}/{len(b)}' if b else ''}</td>"
                    f"<td class='src'>{_e(text[n - 1]) if text and n <= len(text) else ''}</td></tr>")
    return head + "<table class='cov'>" + "".join(rows) + "</table></details>"


def _mutation(r: MutationResult) -> str:
    """The score, a row per function, each survivor's diff and what its
    kernel did otherwise, then the mutants that did not build or timed out."""
    out = [f"<h3>{_e(r.kernel)} ps{r.page_shift}</h3><p class='verdict'>{_e(mutation_summary(r))}</p>",
           f"<p class='meta'>{_e(mutation_settings(r))}</p>",
           _table(["function", "mutants", *MUTANT_STATUSES, "score"], [
               [f"<td><code>{_e(f)}</code></td>", f"<td class='num'>{sum(n.values())}</td>",
                *(f"<td class='num'>{n[s]}</td>" for s in MUTANT_STATUSES), f"<td class='num'>{_e(score)}</td>"]
               for f, n, score in mutation_rows(r)])]
    survivors = r.survivors()
    if survivors:
        out.append(f"<h4>Survivors ({len(survivors)})</h4>")
    for m in survivors:
        changed = ("<p>The kernel behaved otherwise than unmutated, with the same verdicts, on:</p><ul>"
                   + "".join(f"<li>{_e(c)}</li>" for c in m.changed) + "</ul>" if m.changed
                   else "<p class='meta'>The kernel behaved as unmutated on every check.</p>")
        out.append(f"<div class='div known'><p><code>{_e(m.name)}</code> {_e(m.description)}</p><pre>{_e(m.diff)}</pre>"
                   f"{changed}</div>")
    others = [m for m in r.mutants if m.status in ("did-not-build", "timed-out")]
    if others:
        out.append(f"<details><summary>Did not build or timed out ({len(others)})</summary>" + _table(
            ["mutant", "change", "status", "detail"],
            [[f"<td><code>{_e(m.name)}</code></td>", f"<td>{_e(m.description)}</td>", f"<td>{m.status}</td>",
              f"<td>{_e(m.detail)}</td>"] for m in others]) + "</details>")
    return "".join(out)


def _ticks(hi: float, n: int = 5) -> list[float]:
    hi = hi if hi > 0 and math.isfinite(hi) else 1.0
    raw = hi / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw - 1e-12)
    return [i * step for i in range(int(math.ceil(hi / step - 1e-9)) + 1)]


def _num(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def svg_chart(title: str, ylabel: str, series: list[tuple[str, list[tuple[float, float]]]], w: int = 720, h: int = 260) -> str:
    """Line chart, one polyline per series; y axis starts at 0 so series compare by height."""
    left, right, top, bottom = 64, 16, 30, 44
    legend_h = 18 * len(series)
    pts = [p for _, s in series for p in s]
    xt, yt = _ticks(max((x for x, _ in pts), default=1)), _ticks(max((y for _, y in pts), default=1))
    pw, ph = w - left - right, h - top - bottom

    sx = lambda x: left + pw * x / xt[-1]  # noqa: E731 - data to pixel coordinates
    sy = lambda y: top + ph - ph * y / yt[-1]  # noqa: E731
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h + legend_h}' viewBox='0 0 {w} {h + legend_h}' "
           f"role='img' aria-label='{_e(title)}' font-family='system-ui,sans-serif' font-size='11'>",
           f"<text x='{w / 2}' y='18' text-anchor='middle' font-size='13' font-weight='bold'>{_e(title)}</text>"]
    for t in xt:
        out.append(f"<line x1='{sx(t):.1f}' y1='{top}' x2='{sx(t):.1f}' y2='{top + ph}' stroke='#eaeef2'/>"
                   f"<text x='{sx(t):.1f}' y='{top + ph + 14}' text-anchor='middle'>{_num(t)}</text>")
    for t in yt:
        out.append(f"<line x1='{left}' y1='{sy(t):.1f}' x2='{left + pw}' y2='{sy(t):.1f}' stroke='#eaeef2'/>"
                   f"<text x='{left - 6}' y='{sy(t) + 4:.1f}' text-anchor='end'>{_num(t)}</text>")
    out.append(f"<path d='M{left},{top}V{top + ph}H{left + pw}' fill='none' stroke='#57606a'/>"
               f"<text x='{left + pw / 2}' y='{top + ph + 32}' text-anchor='middle'>seconds</text>"
               f"<text transform='translate(14 {top + ph / 2}) rotate(-90)' text-anchor='middle'>{_e(ylabel)}</text>")
    for i, (name, s) in enumerate(series):
        colour = SERIES[i % len(SERIES)]
        s = s if len(s) > 1 else s * 2  # a single sample still draws (as a dot)
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        out.append(f"<polyline points='{coords}' fill='none' stroke='{colour}' stroke-width='2' stroke-linecap='round'>"
                   f"<title>{_e(name)}</title></polyline>")
        ly = h + 18 * i + 4
        out.append(f"<rect x='{left}' y='{ly}' width='14' height='10' fill='{colour}'/>"
                   f"<text x='{left + 20}' y='{ly + 9}'>{_e(name)}</text>")
    return "".join(out) + "</svg>"


def _table(head: list[str], rows: list[list[str]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(r) + "</tr>" for r in rows) + "</table>")


def render_html(report: Report) -> str:
    families = check_families(check_names(report))
    total = {s: sum(c.counts()[s] for c in report.cells) for s in STATUSES}
    found = new_findings(report)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
             f"<title>{_e(report.title)}</title><style>{_CSS}</style></head><body><h1>{_e(report.title)}</h1>"
             f"<p class='meta'>Created {_e(report.created)} by kho-conform {_e(report.tool_version)}.</p>"]
    if report.cells:
        verdict_text = (f"{len(found)} new finding{'s' * (len(found) != 1)}" if found else
                        "errors" if total["error"] else "known kernel bugs only" if total["known"] else "all checks pass")
        link = " (<a href='#findings'>details</a>)" if found else ""
        status = worst([s for s in STATUSES if total[s]])
        parts += [f"<p class='verdict'><span style='color:{COLOURS[status]}'>{SYMBOLS[status]}</span> {_e(verdict_text)}{link}: "
                  f"{sum(total.values())} checks in "
                  f"{len(report.cells)} cells, {_e(_counts_title(total))}.</p>",
                  "<h2>Matrix</h2><p class='meta'>Checks per family and cell: passed/run, coloured by the worst status "
                  f"({', '.join(f'{SYMBOLS[s]} {s}' for s in WORST_FIRST)}). A square opens the family's checks in that "
                  "cell, with each divergence and the command that reproduces it.</p>",
                  _matrix(report, families), _findings(report)]
    if report.coverage:
        parts.append("<h2 id='coverage'>Coverage</h2>")
        parts += [_coverage_summary(i, r) for i, r in enumerate(report.coverage)]
    if report.mutation:
        parts.append("<h2 id='mutation'>Mutation</h2>")
        parts += [_mutation(r) for r in report.mutation]
    if report.cells:
        parts.append(_drilldown(report, families))
    parts.append("<h2>Fuzzing</h2>")
    fuzzed = [c for c in report.cells if c.fuzz_timeline]
    if fuzzed:
        parts.append(svg_chart("Coverage over time", "coverage", [(c.name, [(p.seconds, p.coverage) for p in c.fuzz_timeline]) for c in fuzzed]))
        parts.append(svg_chart("Executions per second", "exec/s", [(c.name, [(p.seconds, p.exec_per_s) for p in c.fuzz_timeline]) for c in fuzzed]))
        parts.append(_table(["cell", "seconds", "execs", "exec/s", "coverage", "corpus", "findings"], [
            [f"<td>{_e(c.name)}</td>"] + [f"<td class='num'>{v}</td>" for v in (
                f"{p.seconds:.0f}", p.execs, f"{p.exec_per_s:.0f}", p.coverage, p.corpus, p.findings)]
            for c in fuzzed for p in [c.fuzz_timeline[-1]]]))
    else:
        parts.append("<p class='meta'>No fuzz data in this run.</p>")
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in report.notes) + "</ul>")
    parts.append("<h2>Kernel sources</h2>")
    for s in unique_sources(report):
        extra = "".join(f"<br>{_e(k)}: {_e(v)}" for k, v in s.items() if k not in ("version", "provider", "files"))
        parts.append(f"<h3>{_e(s.get('version', '?'))}</h3><p class='meta'>provider {_e(s.get('provider', '?'))}, "
                     f"files {short_digest(s)}{extra}</p>")
        parts.append(_table(["file", "sha256"], [[f"<td><code>{_e(p)}</code></td>", f"<td><code>{_e(h)}</code></td>"]
                                                 for p, h in sorted((s.get("files") or {}).items())]))
    if report.coverage:
        parts.append("<h2>Annotated source</h2>")
        parts += [_annotated(i, r) for i, r in enumerate(report.coverage)]
    return "".join(parts) + "</body></html>\n"
