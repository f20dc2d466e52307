"""Kernel sources from the Debian mirror, by version: ``linux-source-7.N``
packages, or for series without one (7.1) the upstream
``linux_X.Y.Z.orig.tar.xz`` of the ``linux`` source package. Only the needed
files are extracted into the cache; a version gone from the mirror falls back
to the newest of its series, and what was used is recorded."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import KhoConformError
from .cache import cache_dir, install_entry, list_cached, load_entry, locked
from .identity import KernelSource
from .mirror import MAX_AGE, Apt
from .tarball import extract_needed
from .tools import first_line, run, step
from .tree_files import check_essentials
from .versions import SOURCE_PACKAGE, Candidate, candidates, debian_key, parse_request

if TYPE_CHECKING:
    from rich.progress import Progress

_log = logging.getLogger(__name__)


def list_available(*, progress: Progress | None = None) -> dict[str, list[str]]:
    """series -> upstream versions the mirror offers, newest first."""
    with locked() as root:
        apt = Apt(root)
        apt.update(progress)
        return {series: [c.upstream for c in cands] for series, cands in apt.available().items()}


def _download(apt: Apt, candidate: Candidate, work: Path, progress: Progress | None) -> Path:
    """Download ``candidate`` into ``work``; returns the tree tarball."""
    if candidate.is_orig:
        with step(progress, f"downloading linux {candidate.upstream} orig tarball"):
            result = apt.run("apt-get", "source", "--download-only", f"{candidate.package}={candidate.debian}",
                             cwd=work)
        # Old .dsc files get pruned from the pool while the orig tarball stays
        # (another revision shares it): the tarball is all we need.
        tarballs = sorted(work.glob(f"{SOURCE_PACKAGE}_*.orig.tar.*"))
        if not tarballs:
            raise KhoConformError(
                f"could not download linux {candidate.upstream}: {first_line(result.stderr, ('E:',))}"
            )
        return tarballs[0]

    with step(progress, f"downloading {candidate.package} {candidate.debian}"):
        result = apt.run("apt-get", "download", f"{candidate.package}={candidate.debian}", cwd=work)
    debs = sorted(work.glob("*.deb"))
    if result.returncode != 0 or not debs:
        raise KhoConformError(
            f"could not download {candidate.package}={candidate.debian}: {first_line(result.stderr, ('E:',))}"
        )
    # The .deb ships the tree as ./usr/src/linux-source-X.Y.tar.xz.
    script = 'set -e; dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" --wildcards "./usr/src/linux-source-*.tar.*"'
    with step(progress, f"unpacking {debs[0].name}"):
        result = run(["sh", "-c", script, "sh", str(debs[0]), str(work)], timeout=600)
    debs[0].unlink()
    tarballs = sorted((work / "usr" / "src").glob("linux-source-*.tar.*"))
    if result.returncode != 0 or not tarballs:
        raise KhoConformError(f"cannot unpack {debs[0].name}: {first_line(result.stderr)}")
    return tarballs[0]


def _fetch_candidate(root: Path, apt: Apt, candidate: Candidate, progress: Progress | None) -> KernelSource:
    cached = load_entry(root / "trees" / candidate.entry)
    if cached is not None:
        return cached
    work = Path(tempfile.mkdtemp(dir=root / "tmp"))
    try:
        tarball = _download(apt, candidate, work, progress)
        staged = work / "entry" / "tree"
        extract_needed(tarball, staged, progress)
        check_essentials(staged, f"{candidate.provider}")
        return install_entry(root, candidate.entry, staged, candidate.upstream, candidate.provider)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cached_debian(series: str, exact: str | None) -> list[KernelSource]:
    """Cached mirror sources of ``series`` (or exactly ``exact``), newest first."""
    found = [
        s for s in list_cached()
        if s.provider.startswith("debian:")
        and (s.version == exact if exact else s.version.startswith(series + ".") or s.version == series)
    ]
    return sorted(found, key=lambda s: debian_key(s.version), reverse=True)


def _from_alias(root: Path, series: str) -> KernelSource | None:
    alias = root / "series" / f"{series}.json"
    try:
        if time.time() - alias.stat().st_mtime >= MAX_AGE:
            return None
        return load_entry(root / "trees" / json.loads(alias.read_text())["entry"])
    except (OSError, ValueError, KeyError):
        return None


def fetch(version: str, *, progress: Progress | None = None) -> KernelSource:
    """The mirror's kernel ``version``: a series ("7.2": its newest version) or
    an exact version ("7.2.13"; the newest of its series if not offered).

    Cached: an extracted exact version is reused for ever, a series resolution
    for a day, both without running apt.
    """
    series, exact = parse_request(version)

    def from_cache(root: Path) -> KernelSource | None:
        if exact:
            cached = _cached_debian(series, exact)
            return cached[0] if cached else None
        return _from_alias(root, series)

    if (hit := from_cache(cache_dir())) is not None:
        return hit
    with locked() as root:
        if (hit := from_cache(root)) is not None:  # fetched by another process meanwhile
            return hit
        apt = Apt(root)
        try:
            apt.update(progress)
        except KhoConformError:
            cached = _cached_debian(series, exact)
            if not cached:
                raise
            _log.warning("mirror unreachable; using cached kernel %s", cached[0].version)
            return cached[0]
        errors = []
        for candidate in candidates(version, apt.available()):
            try:
                source = _fetch_candidate(root, apt, candidate, progress)
            except KhoConformError as e:
                errors.append(str(e))
                _log.warning("%s; trying the next version", e)
                continue
            if exact is None:
                (root / "series").mkdir(exist_ok=True)
                (root / "series" / f"{series}.json").write_text(json.dumps({"entry": candidate.entry}) + "\n")
            return source
        raise KhoConformError(f"no version of kernel {series} could be fetched: {errors[0]}")
