"""The report as plain text to mail (``kho-conform report --format email``,
``check --email FILE``), in the manner of the kernel CI bots' reports: what
was tested, the verdict, each new finding with its minimized program and the
command that replays it, and how much of the patch series' code ran.

Every line is at most ``WIDTH`` columns. Prose is wrapped; programs and
commands are folded with a trailing backslash so that they still paste: a
command at word boundaries (shell line continuation), a program anywhere
(``parse_program`` joins a line ending in a backslash with the next, dropping
its indentation).
"""

from __future__ import annotations

import textwrap

from ..source.identity import short_digest
from .schema import STATUSES, Report, exit_status, mutation_summary, new_findings, ranges_text, unique_sources

WIDTH = 72


def _wrap(text: str, indent: str = "", hanging: str | None = None) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent if hanging is None else hanging,
                         break_on_hyphens=False) or [indent.rstrip()]


def fold(line: str, indent: str, continuation: str, split_indent: str) -> list[str]:
    """``line`` in lines of at most WIDTH columns, each but the last ending in
    `` \\``: broken at spaces (the next piece indented by ``continuation``);
    a word too long for any line is broken inside, the rest starting at
    ``split_indent`` (a shell keeps indentation inside a word, so commands
    pass "")."""
    out: list[str] = []
    current = indent
    for word in line.split(" "):
        joined = f"{current} {word}" if current.strip() else current + word
        if len(joined) + 2 <= WIDTH or not current.strip():
            current = joined
        else:
            out.append(current + " \\")
            current = continuation + word
    out.append(current)
    lines: list[str] = []
    for piece in out:
        while len(piece) > WIDTH:
            lines.append(piece[: WIDTH - 1] + "\\")
            piece = split_indent + piece[WIDTH - 1:]
        lines.append(piece)
    return lines


def _program(text: str) -> list[str]:
    return [out for line in text.rstrip("\n").splitlines() for out in fold(line, "    ", "      ", "      ")]


def _command(text: str) -> list[str]:
    return fold(text, "    ", "        ", "")


def _subject(report: Report, verdict: str) -> str:
    sources = unique_sources(report)
    what = ", ".join(s.get("version", "?") + (f" + {_series_label(s)}" if s.get("patches") else "") for s in sources)
    what = what or "coverage only"
    room = WIDTH - len(f"Subject: [kho-conform] : {verdict}")
    return f"Subject: [kho-conform] {what if len(what) <= room else what[: room - 3] + '...'}: {verdict}"


def _series_label(source: dict) -> str:
    """What the developer named the series: the patch file, mbox or commit range."""
    provider = str(source.get("provider", ""))
    for mark in ("+series:", "+patch:"):
        if mark in provider:
            return provider.rsplit(mark, 1)[1]
    return "series"


def render_email(report: Report) -> str:
    found = new_findings(report)
    total = {s: sum(c.counts()[s] for c in report.cells) for s in STATUSES}
    if exit_status(report):
        verdict = (f"FAIL, {len(found)} new finding{'s' * (len(found) != 1)}" if found else
                   f"ERROR, {total['error']} check{'s' * (total['error'] != 1)} could not run")
    else:
        verdict = "PASS" + (" (known kernel bugs only)" if total["known"] else "")
    out = [_subject(report, verdict), ""]
    out += _wrap(f"kho-conform {report.tool_version} held the kernel's KHO radix tree "
                 "(kernel/liveupdate/kexec_handover.c, compiled in userspace) to its reference model on the "
                 "sources below. A divergence that no known kernel bug explains is a new finding.")
    out += ["", "Tested"]
    for s in unique_sources(report):
        out += _wrap(f"kernel: {s.get('version', '?')} (files {short_digest(s)})", "  ", "      ")
        out += _wrap(f"source: {s.get('provider', '?')}", "  ", "      ")
        for i, (name, sha) in enumerate(s.get("patches") or [], 1):
            out += _wrap(f"patch {i}: {name} (sha256 {sha[:12]})", "  ", "      ")
    handovers = list(dict.fromkeys(c.kernels for c in report.cells if c.next_kernel))
    if handovers:
        out += _wrap(f"handovers across versions: {', '.join(handovers)}", "  ", "      ")
    shifts = sorted({c.page_shift for c in report.cells})
    flavors = list(dict.fromkeys(c.flavor for c in report.cells))
    out += _wrap(f"page shifts: {', '.join(map(str, shifts)) or '-'}; flavors: {', '.join(flavors) or '-'}", "  ", "      ")
    counts = ", ".join(f"{total[s]} {s}" for s in STATUSES if total[s])
    out += _wrap(f"checks: {sum(total.values())} in {len(report.cells)} cells ({counts or 'none'})", "  ", "      ")
    out += _wrap(f"tool: kho-conform {report.tool_version}, report created {report.created}", "  ", "      ")
    out += ["", f"Verdict: {verdict}"]
    for n, f in enumerate(found, 1):
        k = f.check
        d = k.divergence or {}
        out += ["", f"Finding {n} of {len(found)}: signature {f.signature}"[:WIDTH]]
        out += _wrap(f"[{d.get('check', k.name)}] " + (f"op {d['op_index']} ({d.get('op', '')}): " if d.get("op_index") is not None
                                                        else "") + f"{d.get('field', '')}", "  ", "    ")
        if d:
            out += _wrap(f"model (expected): {d.get('expected', '')}", "  ", "    ")
            out += _wrap(f"kernel (actual):  {d.get('actual', '')}", "  ", "    ")
        else:
            out += _wrap(k.detail, "  ", "    ")
        where = "; ".join(f"{c.name}: {chk.name}" for c, chk in f.seen[:8]) + (f"; {len(f.seen) - 8} more" if len(f.seen) > 8 else "")
        out += _wrap(f"seen in {where}", "  ", "    ")
        if k.program:
            out += ["  minimized program:"] + _program(k.program)
        if k.reproducer:
            out += ["  replay:"] + _command(k.reproducer)
    errors = [(c, k) for c in report.cells for k in c.checks if k.status == "error"]
    if errors:
        out += ["", f"Checks that could not run ({len(errors)})"]
        for c, k in errors[:10]:
            out += _wrap(f"{k.name} in {c.name}: {k.detail}", "  ", "    ")
    known = sorted({i for c in report.cells for k in c.checks if k.status == "known" for i in k.known_id.split(",") if i})
    if known:
        out += ["", "Known kernel bugs seen (triaged, not new)"] + _wrap(", ".join(known), "  ")
    out += _coverage(report) + _mutation(report) + [""]
    out = [line.rstrip() for line in out] + ["-- ", f"kho-conform {report.tool_version}"]  # "-- ": the signature mark
    return "\n".join(out) + "\n"


def _coverage(report: Report) -> list[str]:
    if not report.coverage:
        return ["", "Coverage was not measured (check --coverage)."]
    out = ["", "Coverage of the lines the series changed"]
    for r in report.coverage:
        f, t = r.file, r.file.totals
        out += _wrap(f"{r.kernel}, {f.file}, page shifts {', '.join(map(str, f.page_shifts))}:", "  ", "    ")
        if f.changed:
            out += _wrap(f"{t['changed']} changed lines, {t['changed_executable']} with code: {t['changed_covered']} "
                         f"executed, {t['changed_executable'] - t['changed_covered']} not executed; "
                         f"{t['changed_not_built']} not built by the harness.", "    ")
            if f.changed_not_run:
                out += _wrap(f"not executed: {ranges_text(f.changed_not_run)}", "    ", "      ")
            if f.changed_not_built:
                out += _wrap(f"not built: {ranges_text(f.changed_not_built)}", "    ", "      ")
        else:
            out += ["    no patch series: no changed lines"]
        pct = 100 * t["covered"] / t["lines"] if t["lines"] else 0.0
        out += _wrap(f"whole file: {t['covered']}/{t['lines']} lines ({pct:.1f}%), {t['branches_taken']}/{t['branches']} "
                     f"branch outcomes, {t['functions_called']}/{t['functions']} functions", "    ", "      ")
    return out


def _mutation(report: Report) -> list[str]:
    out = []
    for r in report.mutation:
        out += ["", f"Mutation testing of {r.kernel}, page shift {r.page_shift}"] + _wrap(mutation_summary(r), "  ", "  ")
        out += [f"  survived: {m.name}"[:WIDTH] for m in r.survivors()]
    return out
