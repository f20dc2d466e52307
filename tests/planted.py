"""Planted bugs: a copy of a cached kernel with one line of the KHO file
deleted, as a patch generated at run time in a temporary directory.

A line is named by its function and the hash of its text (the build's site
table, ``conformance.native.build.line_hash``), so no kernel source text is
part of this repository.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from conformance.native.build import build
from conformance.source import KernelSource, fetch, resolve
from conformance.source.tree_files import KHO_C


def planted_patch(directory: Path, series: str, function: str, line_hash: str) -> Path:
    """A patch deleting the one line of ``function`` whose text has ``line_hash``."""
    source = fetch(series)
    sites = build(source, 12).sites
    hits = [line for line, site in sites.items() if site == (function, line_hash)]
    assert len(hits) == 1, f"{function}/{line_hash}: {len(hits)} lines in {source.version}"
    old = (source.root / KHO_C).read_text().splitlines(keepends=True)
    new = old[: hits[0] - 1] + old[hits[0]:]
    patch = Path(directory) / f"planted-{function}-{line_hash[:6]}.patch"
    patch.write_text("".join(difflib.unified_diff(old, new, f"a/{KHO_C}", f"b/{KHO_C}")))
    return patch


def planted_source(directory: Path, series: str, function: str, line_hash: str) -> KernelSource:
    return resolve(series, None, None, planted_patch(directory, series, function, line_hash))
