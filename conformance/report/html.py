"""The report as one self-contained HTML page (``report.html``)."""

from __future__ import annotations

import html
import math
from typing import Any

from ..source.identity import short_digest
from .schema import STATUSES, Report, check_names, clean, divergence_fields, divergences, source_label, unique_sources, verdict
from .style import COLOURS, SERIES, SYMBOLS

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#1f2328;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;font-size:13px}
th{background:#f6f8fa}td.num{text-align:right}code,pre{font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto;white-space:pre-wrap;margin:.2em 0}
table.grid td.sq{width:22px;height:22px;padding:0;text-align:center;color:#fff;font-weight:bold;border:2px solid #fff}
table.grid th.rot{writing-mode:vertical-rl;transform:rotate(180deg);font-weight:normal;white-space:nowrap}
.missing{background:#eaeef2}.meta{color:#59636e}.div{border-left:4px solid #cf222e;padding:.2em 1em;margin:1em 0}
.div.known{border-color:#bf8700}svg{background:#fff;border:1px solid #d0d7de;margin:.5em 0}
"""


def _e(text: Any) -> str:
    return html.escape(clean(text), quote=True)


def _grid(report: Report) -> str:
    names = check_names(report)
    rows = ["<table class='grid'><tr><th>cell</th>" + "".join(f"<th class='rot'>{_e(n)}</th>" for n in names) + "</tr>"]
    for c in report.cells:
        by_name = {k.name: k for k in c.checks}
        tds = []
        for n in names:
            k = by_name.get(n)
            if k is None:
                tds.append(f"<td class='sq missing' title='{_e(n)}: not run'></td>")
            else:
                tip = f"{n}: {k.status}" + (f" — {k.detail}" if k.detail else "")
                tds.append(f"<td class='sq {k.status}' style='background:{COLOURS[k.status]}' title='{_e(tip)}'>{SYMBOLS[k.status]}</td>")
        rows.append(f"<tr><th>{_e(c.name)}</th>{''.join(tds)}</tr>")
    return "".join(rows) + "</table>"


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
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(report.title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_e(report.title)}</h1>"
             f"<p class='meta'>Created {_e(report.created)} by kho-conform {_e(report.tool_version)}.</p><h2>Matrix</h2>",
             _grid(report)]
    parts.append(_table(["cell", *STATUSES, "verdict"], [
        [f"<td>{_e(c.name)}</td>", *(f"<td class='num'>{c.counts()[s]}</td>" for s in STATUSES), f"<td>{verdict(c.counts())}</td>"]
        for c in report.cells]))
    for c in report.cells:
        parts.append(f"<h2>{_e(c.name)}</h2><p class='meta'>Source: {_e(source_label(c.source))}; build {c.build_seconds:.1f} s.</p>")
        parts.append(_table(["check", "status", "seconds", "detail"], [
            [f"<td><code>{_e(k.name)}</code></td>", f"<td style='color:{COLOURS[k.status]}'>{SYMBOLS[k.status]} {k.status}</td>",
             f"<td class='num'>{k.seconds:.2f}</td>", f"<td>{_e(k.detail)}</td>"] for k in c.checks]))
    divs = divergences(report)
    if divs:
        parts.append("<h2>Divergences</h2>")
    for c, k in divs:
        d = k.divergence or {}
        known = f" (known: {_e(k.known_id)})" if k.status == "known" else ""
        rows = [[f"<th>{label}</th>", f"<td><code>{_e(v)}</code></td>"] for label, v in divergence_fields(k)]
        rows.append(["<th>kernel source</th>", f"<td>{_e(source_label(c.source))}</td>"])
        parts.append(f"<div class='div {k.status}'><h3>{_e(k.name)} in {_e(c.name)}{known}</h3><p>{_e(k.detail)}</p>"
                     + _table(["", ""], rows)
                     + f"<p>Expected (model):</p><pre>{_e(d.get('expected', ''))}</pre>"
                     f"<p>Actual (kernel C):</p><pre>{_e(d.get('actual', ''))}</pre>"
                     + (f"<p>Reproduce:</p><pre>{_e(k.reproducer)}</pre>" if k.reproducer else "") + "</div>")
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
    return "".join(parts) + "</body></html>\n"
