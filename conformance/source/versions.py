"""Kernel versions: dpkg's version order, the mirror's candidates per series,
and what a ``--kernel`` request means ("7.2": the newest 7.2; "7.2.13": that
one, else the newest of its series)."""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass

from ..errors import KhoConformError
from .tree_files import FIRST_SERIES

_log = logging.getLogger(__name__)

DEFAULT_KERNEL = "7.2"  # what --kernel means when it is not given
SOURCE_PACKAGE = "linux"  # Debian source package whose orig tarball is a pristine tree
BINARY_PACKAGE = re.compile(r"linux-source-(\d+\.\d+)")
_REQUEST = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?(?:[~-](rc\d+))?")


def _char_order(c: str) -> int:
    if c.isalpha():
        return ord(c)
    return -1 if c == "~" else ord(c) + 256


def _verrevcmp(a: str, b: str) -> int:
    """dpkg's comparison of upstream versions or revisions."""
    while a or b:
        na, nb = re.match(r"\D*", a)[0], re.match(r"\D*", b)[0]
        for i in range(max(len(na), len(nb))):
            ca = _char_order(na[i]) if i < len(na) else 0
            cb = _char_order(nb[i]) if i < len(nb) else 0
            if ca != cb:
                return -1 if ca < cb else 1
        a, b = a[len(na):], b[len(nb):]
        da, db = re.match(r"\d*", a)[0], re.match(r"\d*", b)[0]
        if int(da or 0) != int(db or 0):
            return -1 if int(da or 0) < int(db or 0) else 1
        a, b = a[len(da):], b[len(db):]
    return 0


def split_debian(version: str) -> tuple[int, str, str]:
    epoch, _, rest = version.rpartition(":") if ":" in version else ("0", "", version)
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
    return int(epoch or 0), upstream, revision


def debian_version_compare(a: str, b: str) -> int:
    """Like ``dpkg --compare-versions``: negative, zero or positive."""
    (ea, ua, ra), (eb, ub, rb) = split_debian(a), split_debian(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _verrevcmp(ua, ub) or _verrevcmp(ra, rb)


debian_key = functools.cmp_to_key(debian_version_compare)


@dataclass(frozen=True)
class Candidate:
    upstream: str  # "7.2.13"
    debian: str  # "7.2.13-1"
    package: str  # "linux-source-7.2", or "linux" for the source package's orig tarball

    @property
    def is_orig(self) -> bool:
        return self.package == SOURCE_PACKAGE

    @property
    def entry(self) -> str:
        name = f"debian_linux_{self.upstream}.orig" if self.is_orig else f"debian_{self.package}_{self.debian}"
        return re.sub(r"[^\w.+~-]", "_", name)

    @property
    def provider(self) -> str:
        return f"debian:{self.package}={self.debian}" + (" (orig)" if self.is_orig else "")


def _series_of(upstream: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", upstream)
    return (int(m[1]), int(m[2])) if m else None


def _parse_policy(text: str) -> dict[str, list[str]]:
    """package -> versions, from ``apt-cache policy PKG...``."""
    versions: dict[str, list[str]] = {}
    package = None
    in_table = False
    for line in text.splitlines():
        if m := re.fullmatch(r"(\S+):", line):
            package, in_table = m[1], False
            versions[package] = []
        elif line.strip() == "Version table:":
            in_table = True
        elif in_table and package and (m := re.fullmatch(r"\s+(?:\*\*\*\s+)?(\S+)\s+-?\d+", line)):
            versions[package].append(m[1])
    return versions


def _parse_showsrc(text: str) -> list[str]:
    """Versions of the ``linux`` source package, from ``apt-cache showsrc linux``."""
    versions = []
    for stanza in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"^(Package|Version): (\S+)", stanza, re.M))
        if fields.get("Package") == SOURCE_PACKAGE and "Version" in fields:
            versions.append(fields["Version"])
    return versions


def build_available(policy: str, showsrc: str) -> dict[str, list[Candidate]]:
    """series -> candidates, newest first, one per upstream version.

    A series with a ``linux-source-X.Y`` package is taken from it (Debian's
    patched tree); other series from the ``linux`` source package's orig
    tarballs. Series before FIRST_SERIES are left out.
    """
    by_upstream: dict[tuple[str, str], Candidate] = {}
    binary_series = set()

    def add(package: str, debian: str) -> None:
        upstream = split_debian(debian)[1]
        series = _series_of(upstream)
        if series is None or series < FIRST_SERIES:
            return
        key = (f"{series[0]}.{series[1]}", upstream)
        old = by_upstream.get(key)
        if old is None or debian_version_compare(debian, old.debian) > 0:
            by_upstream[key] = Candidate(upstream, debian, package)

    for package, versions in _parse_policy(policy).items():
        if m := BINARY_PACKAGE.fullmatch(package):
            binary_series.add(m[1])
            for version in versions:
                add(package, version)
    for version in _parse_showsrc(showsrc):
        series = _series_of(split_debian(version)[1])
        if series and f"{series[0]}.{series[1]}" not in binary_series:
            add(SOURCE_PACKAGE, version)

    available: dict[str, list[Candidate]] = {}
    for (series, _), candidate in by_upstream.items():
        available.setdefault(series, []).append(candidate)
    for candidates in available.values():
        candidates.sort(key=lambda c: debian_key(c.upstream), reverse=True)
    return dict(sorted(available.items(), key=lambda kv: _series_of(kv[0])))


def parse_request(text: str) -> tuple[str, str | None]:
    """("7.2", None) for a series, ("7.2", "7.2.13") for an exact version."""
    m = _REQUEST.fullmatch(text.strip())
    if not m:
        raise KhoConformError(
            f"unknown kernel version {text!r}; use a series such as 7.2 or an exact version such as 7.2.13"
        )
    series = f"{m[1]}.{m[2]}"
    if (int(m[1]), int(m[2])) < FIRST_SERIES:
        raise KhoConformError(
            f"kernel {text.strip()} has no KHO radix tree (first in {FIRST_SERIES[0]}.{FIRST_SERIES[1]}); "
            f"choose {FIRST_SERIES[0]}.{FIRST_SERIES[1]} or later, e.g. {DEFAULT_KERNEL}"
        )
    if m[3] is None and m[4] is None:
        return series, None
    return series, series + (f".{m[3]}" if m[3] is not None else "") + (f"~{m[4]}" if m[4] else "")


def candidates(text: str, available: dict[str, list[Candidate]]) -> list[Candidate]:
    """What to try for request ``text``, in order: the pinned version if offered, then the series newest first."""
    series, exact = parse_request(text)
    offered = available.get(series)
    if not offered:
        newest = ", ".join(c[0].upstream for c in available.values() if c) or "none (empty package lists)"
        raise KhoConformError(f"unknown kernel version {text.strip()!r}; available: {newest}")
    if exact is None:
        return list(offered)
    pinned = [c for c in offered if c.upstream == exact]
    if not pinned:
        _log.warning("kernel %s is not offered by the mirror; using the newest %s instead", exact, series)
    return pinned + [c for c in offered if c not in pinned]
