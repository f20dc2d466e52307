"""Which cached kernel sources the kernel-facing tests run against (no
building here: importing this module is cheap)."""

from __future__ import annotations

import re

from conformance.source import KernelSource, list_cached
from conformance.source.tree_files import FIRST_SERIES


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version))


def pristine(source: KernelSource) -> bool:
    """A source as its provider shipped it: not a scratch copy with a
    ``--patch`` applied (those are someone's experiment, e.g. a planted bug)."""
    return "patch:" not in source.provider


def _rank(source: KernelSource) -> tuple:
    return (version_key(source.version), source.provider.startswith("debian:"))


def newest_per_series() -> dict[str, KernelSource]:
    """series ("7.2") -> the newest pristine cached source of that series
    (a Debian package before a local tree of the same version)."""
    best: dict[str, KernelSource] = {}
    for source in filter(pristine, list_cached()):
        m = re.search(r"(\d+)\.(\d+)", source.makefile_version or source.version)
        if not m or (int(m[1]), int(m[2])) < FIRST_SERIES:
            continue
        series = f"{m[1]}.{m[2]}"
        if series not in best or _rank(source) > _rank(best[series]):
            best[series] = source
    return dict(sorted(best.items(), key=lambda kv: version_key(kv[0])))
