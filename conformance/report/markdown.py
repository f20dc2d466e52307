"""The report as Markdown (``report.md``): for people, in a browser or a review tool."""

from __future__ import annotations

import re
from typing import Any

from ..source.identity import short_digest
from .schema import (
    MUTANT_STATUSES,
    STATUSES,
    CoverageResult,
    MutationResult,
    Report,
    clean,
    divergence_fields,
    divergences,
    mutation_rows,
    mutation_settings,
    mutation_summary,
    ranges_text,
    sources_label,
    unique_sources,
    verdict,
)
from .style import SYMBOLS


def _md(text: Any) -> str:
    # Table-cell safe: no pipes or newlines; angle brackets would be taken as HTML on GitHub.
    return clean(text).replace("\\", "\\\\").replace("|", "\\|").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def _code(text: Any) -> str:
    # Inline code: HTML is not interpreted inside, so only pipes (table syntax) and backtick runs matter.
    t = clean(text).replace("|", "\\|").replace("\n", " ")
    ticks = "`" * (max((len(m) for m in re.findall(r"`+", t)), default=0) + 1)
    pad = " " if t.startswith("`") or t.endswith("`") else ""
    return f"{ticks}{pad}{t}{pad}{ticks}"


def _fence(text: str) -> str:
    ticks = "`" * max(3, max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    return f"{ticks}\n{clean(text)}\n{ticks}"


def render_markdown(report: Report) -> str:
    out = [f"# {_md(report.title)}", "", f"Created {_md(report.created)} by kho-conform {_md(report.tool_version)}.", "",
           "## Summary", "", "Known counts the distinct known findings reached, however many checks reach each.", "",
           "| kernel | page shift | flavor | " + " | ".join(STATUSES) + " | verdict |",
           "|---|---:|---|" + "---:|" * len(STATUSES) + ":-:|"]
    for c in report.cells:
        n = c.counts()
        out.append(f"| {_md(c.kernels)} | {c.page_shift} | {_md(c.flavor)} | "
                   + " | ".join(str(n[s]) for s in STATUSES) + f" | {verdict(n)} |")
    for c in report.cells:
        out += ["", f"## {_md(c.name)}", "", f"Source: {_md(sources_label(c))}; build {c.build_seconds:.1f} s.", "",
                "| check | status | seconds | detail |", "|---|---|---:|---|"]
        out += [f"| {_code(k.name)} | {SYMBOLS[k.status]} {k.status} | {k.seconds:.2f} | {_md(k.detail)} |" for k in c.checks]
    divs = divergences(report)
    if divs:
        out += ["", "## Divergences"]
    for c, k in divs:
        title = f"{k.name} in {c.name}" + (f" (known: {k.known_id})" if k.status == "known" else "")
        d = k.divergence or {}
        out += ["", f"### {_md(title)}", "", _md(k.detail), ""]
        out += [f"- {label}: {_code(value)}" for label, value in divergence_fields(k)]
        out += [f"- kernel source: {_md(sources_label(c))}", "", "Expected (model):", "",
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
    for r in report.coverage:
        out += _coverage(r)
    for m in report.mutation:
        out += _mutation(m)
    if report.notes:
        out += ["", "## Notes", ""] + [f"- {_md(n)}" for n in report.notes]
    out += ["", "## Kernel sources"]
    for s in unique_sources(report):
        out += ["", f"### {_md(s.get('version', '?'))} ({_md(s.get('provider', '?'))}, files {short_digest(s)})", ""]
        extra = [f"- {_md(k)}: {_md(v)}" for k, v in s.items() if k not in ("version", "provider", "files")]
        out += extra + [""] * bool(extra) + ["| file | sha256 |", "|---|---|"] + [f"| {_code(p)} | {_code(h)} |" for p, h in sorted((s.get("files") or {}).items())]
    return "\n".join(out) + "\n"


def _coverage(r: CoverageResult) -> list[str]:
    f, t = r.file, r.file.totals
    out = ["", f"## Coverage: {_md(r.kernel)}, {_code(f.file)}", "",
           f"Page shifts {', '.join(map(str, f.page_shifts))}; ran "
           + _md(", ".join(f"{n} {kind}" for kind, n in r.runs.items())) + " on the coverage build.", "",
           f"- lines executed: {t['covered']}/{t['lines']}",
           f"- branch outcomes taken: {t['branches_taken']}/{t['branches']}",
           f"- functions called: {t['functions_called']}/{t['functions']}"]
    if f.changed:
        out += [f"- lines the series changed: {ranges_text(f.changed)} ({t['changed_covered']}/{t['changed_executable']} "
                "with code executed)",
                f"- changed lines nothing executed: {ranges_text(f.changed_not_run) or 'none'}",
                f"- changed lines not built by the harness: {ranges_text(f.changed_not_built) or 'none'}"]
    out += ["", "| function | line | calls | lines executed | changed lines executed |", "|---|---:|---:|---:|---:|"]
    out += [f"| {_code(fn.name)} | {fn.line} | {fn.calls} | {fn.covered}/{fn.lines} | "
            f"{f'{fn.changed_covered}/{fn.changed}' if fn.changed else ''} |" for fn in f.functions]
    return out


def _mutation(r: MutationResult) -> list[str]:
    out = ["", f"## Mutation: {_md(r.kernel)} ps{r.page_shift}", "", _md(mutation_summary(r)), "", _md(mutation_settings(r)), "",
           "| function | mutants | " + " | ".join(MUTANT_STATUSES) + " | score |", "|---|---:|" + "---:|" * len(MUTANT_STATUSES) + "---:|"]
    out += [f"| {_code(f)} | {sum(n.values())} | " + " | ".join(str(n[s]) for s in MUTANT_STATUSES) + f" | {score} |"
            for f, n, score in mutation_rows(r)]
    survivors = r.survivors()
    if survivors:
        out += ["", f"### Survivors ({len(survivors)})"]
    for m in survivors:
        out += ["", f"#### {_code(m.name)} {_md(m.description)}", "", _fence(m.diff.rstrip("\n")), ""]
        out += (["The kernel behaved otherwise than unmutated, with the same verdicts, on:", ""] + [f"- {_md(c)}" for c in m.changed]
                if m.changed else ["The kernel behaved as unmutated on every check."])
    others = [m for m in r.mutants if m.status in ("did-not-build", "timed-out")]
    if others:
        out += ["", f"### Did not build or timed out ({len(others)})", "", "| mutant | change | status | detail |", "|---|---|---|---|"]
        out += [f"| {_code(m.name)} | {_md(m.description)} | {m.status} | {_md(m.detail)} |"
                for m in others]
    return out
