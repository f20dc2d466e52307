"""Render one conformance results object as Markdown, HTML, JSON and JUnit XML.

The four outputs are views of the same :class:`Report`; ``report.json`` is the
report itself, so :func:`load_report` can rebuild it and re-render or compare.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape as rich_escape
from rich.table import Table

STATUSES = ("pass", "fail", "known", "error", "skipped")
_COLOURS = {"pass": "#2da44e", "fail": "#cf222e", "known": "#bf8700", "error": "#8250df", "skipped": "#8c959f"}
_SYMBOLS = {"pass": "✓", "fail": "✗", "known": "!", "error": "E", "skipped": "–"}  # not colour alone
_RICH = {"pass": "green", "fail": "bold red", "known": "yellow", "error": "magenta", "skipped": "dim"}
_SERIES = ("#0969da", "#cf222e", "#2da44e", "#bf8700", "#8250df", "#1b7c83", "#e16f24", "#6e7781")
# Characters XML 1.0 forbids (and lone surrogates, which cannot be written as UTF-8).
_BAD_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass
class CheckResult:
    name: str
    status: str
    seconds: float = 0.0
    detail: str = ""
    divergence: dict | None = None
    known_id: str = ""
    reproducer: str = ""

    def __post_init__(self) -> None:
        # A typo'd status would otherwise count as neither pass nor fail and slip past exit_status.
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name!r}: status {self.status!r} is not one of {', '.join(STATUSES)}")


@dataclass
class FuzzPoint:
    seconds: float
    execs: int
    exec_per_s: float
    coverage: int
    corpus: int
    findings: int


@dataclass
class Cell:
    kernel: str
    page_shift: int
    flavor: str
    source: dict
    checks: list[CheckResult]
    fuzz_timeline: list[FuzzPoint] = field(default_factory=list)
    build_seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.kernel} ps{self.page_shift} {self.flavor}"

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for check in self.checks:
            out[check.status] += 1
        return out


@dataclass
class Report:
    title: str
    created: str
    tool_version: str
    cells: list[Cell]
    notes: list[str] = field(default_factory=list)


def load_report(path: Path) -> Report:
    """Rebuild a Report from a report.json written by :func:`write_report`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    cells = [Cell(c["kernel"], c["page_shift"], c["flavor"], c.get("source", {}),
                  [CheckResult(**k) for k in c.get("checks", [])], [FuzzPoint(**p) for p in c.get("fuzz_timeline", [])],
                  c.get("build_seconds", 0.0)) for c in data["cells"]]
    return Report(data["title"], data["created"], data["tool_version"], cells, list(data.get("notes", [])))


def exit_status(report: Report) -> int:
    """1 if any check failed or errored; known kernel bugs do not fail the run."""
    return int(any(k.status in ("fail", "error") for c in report.cells for k in c.checks))


def _clean(text: Any) -> str:
    return _BAD_XML.sub("\ufffd", str(text))


def _verdict(counts: dict[str, int]) -> str:
    return "❌" if counts["fail"] or counts["error"] else "⚠" if counts["known"] else "✅"


def source_fingerprint(source: dict) -> str:
    """Short id over all file hashes, so two cells built from identical sources are visibly equal."""
    files = source.get("files") or {}
    blob = "\n".join(f"{p}:{h}" for p, h in sorted(files.items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _source_label(source: dict) -> str:
    return f"{source.get('version', '?')} via {source.get('provider', '?')} (files {source_fingerprint(source)})"


def _divergences(report: Report) -> list[tuple[Cell, CheckResult]]:
    return [(c, k) for c in report.cells for k in c.checks if k.status in ("fail", "known")]


def _check_names(report: Report) -> list[str]:
    return list(dict.fromkeys(k.name for c in report.cells for k in c.checks))  # first-seen order


def _unique_sources(report: Report) -> list[dict]:
    seen: dict[str, dict] = {}
    for cell in report.cells:
        seen.setdefault(json.dumps(cell.source, sort_keys=True, default=str), cell.source)
    return list(seen.values())


def _div_fields(k: CheckResult) -> list[tuple[str, str]]:
    d = k.divergence or {}
    op = d.get("op_index")
    return [("check", str(d.get("check", k.name))), ("op index", "—" if op is None else str(op)),
            ("op", str(d.get("op", ""))), ("field", str(d.get("field", ""))),
            ("signature", str(d.get("signature", "")))]


def _md(text: Any) -> str:
    # Table-cell safe: no pipes or newlines; angle brackets would be taken as HTML on GitHub.
    return _clean(text).replace("\\", "\\\\").replace("|", "\\|").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def _code(text: Any) -> str:
    # Inline code: HTML is not interpreted inside, so only pipes (table syntax) and backtick runs matter.
    t = _clean(text).replace("|", "\\|").replace("\n", " ")
    ticks = "`" * (max((len(m) for m in re.findall(r"`+", t)), default=0) + 1)
    pad = " " if t.startswith("`") or t.endswith("`") else ""
    return f"{ticks}{pad}{t}{pad}{ticks}"


def _fence(text: str) -> str:
    ticks = "`" * max(3, max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    return f"{ticks}\n{_clean(text)}\n{ticks}"


def render_markdown(report: Report) -> str:
    out = [f"# {_md(report.title)}", "", f"Created {_md(report.created)} by kho-conform {_md(report.tool_version)}.", "",
           "## Summary", "", "| kernel | page shift | flavor | " + " | ".join(STATUSES) + " | verdict |",
           "|---|---:|---|" + "---:|" * len(STATUSES) + ":-:|"]
    for c in report.cells:
        n = c.counts()
        out.append(f"| {_md(c.kernel)} | {c.page_shift} | {_md(c.flavor)} | "
                   + " | ".join(str(n[s]) for s in STATUSES) + f" | {_verdict(n)} |")
    for c in report.cells:
        out += ["", f"## {_md(c.name)}", "", f"Source: {_md(_source_label(c.source))}; build {c.build_seconds:.1f} s.", "",
                "| check | status | seconds | detail |", "|---|---|---:|---|"]
        out += [f"| {_code(k.name)} | {_SYMBOLS[k.status]} {k.status} | {k.seconds:.2f} | {_md(k.detail)} |" for k in c.checks]
    divs = _divergences(report)
    if divs:
        out += ["", "## Divergences"]
    for c, k in divs:
        title = f"{k.name} in {c.name}" + (f" (known: {k.known_id})" if k.status == "known" else "")
        d = k.divergence or {}
        out += ["", f"### {_md(title)}", "", _md(k.detail), ""]
        out += [f"- {label}: {_code(value)}" for label, value in _div_fields(k)]
        out += [f"- kernel source: {_md(_source_label(c.source))}", "", "Expected (model):", "",
                _fence(str(d.get("expected", ""))), "", "Actual (kernel C):", "", _fence(str(d.get("actual", "")))]
        if k.reproducer:
            out += ["", "Reproduce:", "", _fence(k.reproducer)]
    fuzzed = [c for c in report.cells if c.fuzz_timeline]
    if fuzzed:
        out += ["", "## Fuzzing", "", "| cell | seconds | execs | exec/s | coverage | corpus | findings |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for c in fuzzed:
            p = c.fuzz_timeline[-1]
            out.append(f"| {_md(c.name)} | {p.seconds:.0f} | {p.execs} | {p.exec_per_s:.0f} | {p.coverage} | {p.corpus} | {p.findings} |")
    if report.notes:
        out += ["", "## Notes", ""] + [f"- {_md(n)}" for n in report.notes]
    out += ["", "## Kernel sources"]
    for s in _unique_sources(report):
        out += ["", f"### {_md(s.get('version', '?'))} ({_md(s.get('provider', '?'))}, files {source_fingerprint(s)})", ""]
        extra = [f"- {_md(k)}: {_md(v)}" for k, v in s.items() if k not in ("version", "provider", "files")]
        out += extra + [""] * bool(extra) + ["| file | sha256 |", "|---|---|"] + [f"| {_code(p)} | {_code(h)} |" for p, h in sorted((s.get("files") or {}).items())]
    return "\n".join(out) + "\n"


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
    return html.escape(_clean(text), quote=True)


def _grid(report: Report) -> str:
    names = _check_names(report)
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
                tds.append(f"<td class='sq {k.status}' style='background:{_COLOURS[k.status]}' title='{_e(tip)}'>{_SYMBOLS[k.status]}</td>")
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
        colour = _SERIES[i % len(_SERIES)]
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
        [f"<td>{_e(c.name)}</td>", *(f"<td class='num'>{c.counts()[s]}</td>" for s in STATUSES), f"<td>{_verdict(c.counts())}</td>"]
        for c in report.cells]))
    for c in report.cells:
        parts.append(f"<h2>{_e(c.name)}</h2><p class='meta'>Source: {_e(_source_label(c.source))}; build {c.build_seconds:.1f} s.</p>")
        parts.append(_table(["check", "status", "seconds", "detail"], [
            [f"<td><code>{_e(k.name)}</code></td>", f"<td style='color:{_COLOURS[k.status]}'>{_SYMBOLS[k.status]} {k.status}</td>",
             f"<td class='num'>{k.seconds:.2f}</td>", f"<td>{_e(k.detail)}</td>"] for k in c.checks]))
    divs = _divergences(report)
    if divs:
        parts.append("<h2>Divergences</h2>")
    for c, k in divs:
        d = k.divergence or {}
        known = f" (known: {_e(k.known_id)})" if k.status == "known" else ""
        rows = [[f"<th>{label}</th>", f"<td><code>{_e(v)}</code></td>"] for label, v in _div_fields(k)]
        rows.append(["<th>kernel source</th>", f"<td>{_e(_source_label(c.source))}</td>"])
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
    for s in _unique_sources(report):
        extra = "".join(f"<br>{_e(k)}: {_e(v)}" for k, v in s.items() if k not in ("version", "provider", "files"))
        parts.append(f"<h3>{_e(s.get('version', '?'))}</h3><p class='meta'>provider {_e(s.get('provider', '?'))}, "
                     f"files {source_fingerprint(s)}{extra}</p>")
        parts.append(_table(["file", "sha256"], [[f"<td><code>{_e(p)}</code></td>", f"<td><code>{_e(h)}</code></td>"]
                                                 for p, h in sorted((s.get("files") or {}).items())]))
    return "".join(parts) + "</body></html>\n"


def render_junit(report: Report) -> str:
    """JUnit XML for CI: known kernel bugs pass (with a note) so they do not turn the build red."""
    root = ET.Element("testsuites", name=_clean(report.title))
    for c in report.cells:
        n = c.counts()
        suite = ET.SubElement(root, "testsuite", name=_clean(c.name), tests=str(len(c.checks)), failures=str(n["fail"]),
                              errors=str(n["error"]), skipped=str(n["skipped"]), time=f"{sum(k.seconds for k in c.checks):.3f}")
        props = ET.SubElement(suite, "properties")
        for key in ("version", "provider"):
            ET.SubElement(props, "property", name=f"source.{key}", value=_clean(c.source.get(key, "")))
        ET.SubElement(props, "property", name="source.files", value=source_fingerprint(c.source))
        for k in c.checks:
            case = ET.SubElement(suite, "testcase", name=_clean(k.name), classname=_clean(c.name), time=f"{k.seconds:.3f}")
            d = k.divergence or {}
            body = "\n".join([f"{label}: {v}" for label, v in _div_fields(k)]
                             + [f"expected (model): {d.get('expected', '')}", f"actual (kernel C): {d.get('actual', '')}",
                                f"reproduce: {k.reproducer}"])
            if k.status == "fail":
                el = ET.SubElement(case, "failure", message=_clean(k.detail or d.get("field", "divergence")),
                                   type=_clean(d.get("signature", "divergence")))
                el.text = _clean(body)
            elif k.status == "error":
                ET.SubElement(case, "error", message=_clean(k.detail), type="error").text = _clean(k.detail)
            elif k.status == "skipped":
                ET.SubElement(case, "skipped", message=_clean(k.detail))
            elif k.status == "known":
                ET.SubElement(case, "system-out").text = _clean(f"known kernel bug {k.known_id}: {k.detail}\n{body}")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    """Write report.md, report.html, report.json and junit.xml into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "report.md", "html": out_dir / "report.html",
             "json": out_dir / "report.json", "junit": out_dir / "junit.xml"}
    paths["markdown"].write_text(render_markdown(report), encoding="utf-8")
    paths["html"].write_text(render_html(report), encoding="utf-8")
    # backslashreplace turns a lone surrogate into a JSON \uXXXX escape, so the file stays valid and round-trips.
    paths["json"].write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n",
                             encoding="utf-8", errors="backslashreplace")
    paths["junit"].write_text(render_junit(report), encoding="utf-8")
    return paths


def summary_table(report: Report) -> Table:
    """One row per cell with coloured status counts, for the terminal."""
    table = Table(title=report.title)
    for col, justify in (("kernel", "left"), ("page shift", "right"), ("flavor", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for s in STATUSES:
        table.add_column(s, justify="right", style=_RICH[s])
    for c in report.cells:
        n = c.counts()
        table.add_row(rich_escape(c.kernel), str(c.page_shift), rich_escape(c.flavor),
                      *(str(n[s]) if n[s] else "[dim]0[/dim]" for s in STATUSES))
    return table
