"""Stage 5, report: one results schema (``schema``), one renderer per format
(``markdown``, ``html``, ``junit``, ``terminal``, ``email``); ``report.json``
is the schema itself."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .email import render_email
from .html import render_html
from .junit import render_junit
from .markdown import render_markdown
from .schema import (
    STATUSES,
    Cell,
    CheckResult,
    CoverageResult,
    FuzzPoint,
    MutantResult,
    MutationResult,
    Report,
    exit_status,
    load_report,
)
from .terminal import mutation_table, summary_table

__all__ = ["STATUSES", "Cell", "CheckResult", "CoverageResult", "FuzzPoint", "MutantResult", "MutationResult", "Report",
           "exit_status", "load_report", "mutation_table", "render_email", "summary_table", "write_report"]


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
