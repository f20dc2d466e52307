"""Planted bugs: a cached kernel with one line of the KHO file deleted, made
at test time in the test's own directory, as a patch or as a kernel tree.

A line is named by its function and the hash of its text (the build's site
table, ``conformance.native.build.line_hash``), so no kernel source text is
part of this repository.
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

from conformance.native.build import build
from conformance.source import KernelSource, fetch, resolve
from conformance.source.tree_files import KHO_C

# The radix tree's delete stops clearing the leaf bit: unpreserve leaves the
# page preserved (the function is kho_radix_del_key since 7.3). Fuzzing finds
# it within seconds.
UNPRESERVE_KEEPS_BIT = ("kho_radix_del_page|kho_radix_del_key", "02bb667dee9ae470")
# The next kernel's walk callback stops marking preserved memory noinit
# (memblock_reserved_mark_noinit): only a kexec shows it.
NOINIT_DROPPED = ("kho_preserved_memory_reserve", "0514fceb35ef9153")


def site_line(source: KernelSource, site: tuple[str, str]) -> int:
    """The one line of the KHO file at ``site``: (function, or several
    joined by '|', hash of the line's text)."""
    functions, line_hash = site[0].split("|"), site[1]
    hits = [line for line, (function, h) in build(source, 12).sites.items() if function in functions and h == line_hash]
    assert len(hits) == 1, f"{site}: {len(hits)} lines in {source.version}"
    return hits[0]


def _planted(series: str, function: str, line_hash: str) -> tuple[Path, list[str], list[str]]:
    """The source's root, its KHO file's lines, and the same without the line."""
    source = fetch(series)
    line = site_line(source, (function, line_hash))
    old = (source.root / KHO_C).read_text().splitlines(keepends=True)
    return source.root, old, old[: line - 1] + old[line:]


def planted_patch(directory: Path, series: str = "7.2", site: tuple[str, str] = UNPRESERVE_KEEPS_BIT) -> Path:
    """The planted bug as a patch to apply to ``series``."""
    _, old, new = _planted(series, *site)
    patch = Path(directory) / f"planted-{site[0]}-{site[1][:6]}.patch"
    patch.write_text("".join(difflib.unified_diff(old, new, f"a/{KHO_C}", f"b/{KHO_C}")))
    return patch


def planted_source(directory: Path, series: str, site: tuple[str, str]) -> KernelSource:
    """``series`` with the bug planted, as the CLI's --patch would make it."""
    return resolve(series, None, None, planted_patch(directory, series, site))


def planted_tree(directory: Path, series: str = "7.2", site: tuple[str, str] = UNPRESERVE_KEEPS_BIT) -> Path:
    """A kernel tree (the files the suite reads) of ``series`` with the bug planted."""
    root, _, new = _planted(series, *site)
    shutil.copytree(root, directory)
    (Path(directory) / KHO_C).write_text("".join(new))
    return Path(directory)
