"""Where the kernel's KHO radix-tree sources come from.

A :class:`KernelSource` is a directory holding the subset of a kernel tree the
suite compiles against (:data:`NEEDED_PATHS`), plus the sha256 of each of those
files, so builds can be cached by content and reports can say exactly which
kernel code was tested.

Sources:

- ``fetch("7.2")``: Debian's ``linux-source-7.N`` package, or for series
  without one (7.1) the upstream ``linux_X.Y.Z.orig.tar.xz`` of Debian's
  ``linux`` source package. The mirror is the one the machine's apt sources
  already use; apt runs against a private state directory in the cache, so the
  system apt configuration is never touched.
- ``from_tree(path)``: a developer's checkout, used read-only; with a patch,
  the needed files are copied into the cache and patched there.
- ``from_tarball(path)``: any kernel tarball (kernel.org, Debian).

Kernel files never go into the repository: everything lives in
:func:`cache_dir`. Layout::

    <cache>/lock                 flock held by every writer of the cache
    <cache>/apt/                 private apt state (parts/, lists/, cache/, updated)
    <cache>/series/<X.Y>.json    which entry a series request resolved to, and when
    <cache>/trees/<entry>/       one extracted source: meta.json + tree/
    <cache>/tmp/                 downloads and extractions in progress

Every failure raises :class:`~conformance.errors.KhoConformError`.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING

from conformance.errors import KhoConformError

if TYPE_CHECKING:
    from rich.progress import Progress

from .extract import OPTIONAL_TREE_FILES, TREE_FILES

_log = logging.getLogger(__name__)

# Glob patterns, relative to the tree root, of every file the suite compiles
# against or reads. ``*`` also matches ``/`` (as in tar), and a directory
# stands for everything below it.
NEEDED_PATHS: tuple[str, ...] = (
    "Makefile",  # the version
    *TREE_FILES,  # compiled unchanged (conformance/extract.py)
    *OPTIONAL_TREE_FILES,
    "scripts/dtc/libfdt/*",  # libfdt, built beside the KHO code
    "Documentation/core-api/kho/*",  # documentation-versus-code checks
)

# Without these there is nothing to test; the radix tree header is also how
# pre-7.1 kernels are recognised.
RADIX_TREE_HEADER = "include/linux/kho_radix_tree.h"
ESSENTIAL_PATHS: tuple[str, ...] = ("kernel/liveupdate/kexec_handover.c", RADIX_TREE_HEADER)

FIRST_SERIES = (7, 1)  # first kernel series with the KHO radix tree
DEFAULT_KERNEL = "7.2"

# Read at call time so tests can point them at sample files.
APT_SOURCES_LIST = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
SUITES = ("sid", "trixie-backports", "experimental")

MAX_AGE = 24 * 3600  # package lists and series resolutions are reused this long

# Suites of the main Debian archive (the security archive lives elsewhere and
# carries no kernels we want).
_DEBIAN_SUITE = re.compile(
    r"(buster|bullseye|bookworm|trixie|forky|duke|sid|stable|testing|unstable|"
    r"oldstable|oldoldstable)(-updates|-backports|-proposed-updates)?"
)
_REQUEST = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?(?:[~-](rc\d+))?")
_BUILD_OUTPUT = re.compile(r"^\.|\.(o|a|so|ko|cmd|d|orig|rej)$")
_SOURCE_PACKAGE = "linux"  # Debian source package whose orig tarball is a pristine tree
_BINARY_PACKAGE = re.compile(r"linux-source-(\d+\.\d+)")


@dataclass(frozen=True)
class KernelSource:
    version: str  # upstream version, e.g. "7.2.13"; "local-<Makefile version>" for trees
    provider: str  # where it came from, e.g. "debian:linux-source-7.2=7.2.13-1"
    root: Path  # directory holding the (partial) tree
    files: dict[str, str] = field(hash=False)  # relative path -> sha256
    makefile_version: str = ""  # VERSION.PATCHLEVEL.SUBLEVEL+EXTRAVERSION of the tree's Makefile

    def identity(self) -> dict:
        return {
            "version": self.version,
            "provider": self.provider,
            "makefile_version": self.makefile_version,
            "files": dict(sorted(self.files.items())),
        }

    def digest(self) -> str:
        # Content only: the same files from two providers share build results.
        h = hashlib.sha256()
        for path, sha in sorted(self.files.items()):
            h.update(f"{path}\0{sha}\n".encode())
        return h.hexdigest()


# --------------------------------------------------------------------------
# Cache


def cache_dir() -> Path:
    env = os.environ.get("KHO_CONFORM_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "kho-conform"
    path = path.resolve()
    repo = Path(__file__).resolve().parents[1]
    if path == repo or repo in path.parents:
        raise KhoConformError(
            f"cache directory {path} is inside the repository {repo}; "
            "set KHO_CONFORM_CACHE to a directory outside it"
        )
    return path


@contextmanager
def _locked() -> Iterator[Path]:
    """Hold the cache lock; yields the cache dir with an emptied tmp/."""
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Only lock holders use tmp/, so whatever is there was left by a
            # killed run.
            shutil.rmtree(root / "tmp", ignore_errors=True)
            (root / "tmp").mkdir()
            yield root
    except OSError as e:
        raise KhoConformError(
            f"file operation failed in cache {root}: {e}; check space and permissions or set KHO_CONFORM_CACHE"
        ) from e


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _needed_files(root: Path) -> list[str]:
    found: set[str] = set()
    for pattern in NEEDED_PATHS:
        if not re.search(r"[*?\[]", pattern):
            matches = [root / pattern]
        else:
            # A developer's tree may hold build output next to the sources.
            matches = [m for m in root.glob(pattern) if not _BUILD_OUTPUT.search(m.name)]
        for match in matches:
            if match.is_file():
                found.add(match.relative_to(root).as_posix())
            elif match.is_dir():
                found.update(p.relative_to(root).as_posix() for p in match.rglob("*")
                             if p.is_file() and not _BUILD_OUTPUT.search(p.name))
    return sorted(found)


def _hash_files(root: Path) -> dict[str, str]:
    return {rel: _sha256(root / rel) for rel in _needed_files(root)}


def _is_needed(relpath: str) -> bool:
    return any(
        fnmatchcase(relpath, pattern) or relpath.startswith(pattern.rstrip("/") + "/")
        for pattern in NEEDED_PATHS
    )


def _makefile_version(root: Path) -> str:
    try:
        text = (root / "Makefile").read_text(errors="replace")
    except OSError:
        return ""
    fields = dict(re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)\s*=[ \t]*(\S*)", text, re.M))
    if "VERSION" not in fields:
        return ""
    return f"{fields['VERSION']}.{fields.get('PATCHLEVEL', '0')}.{fields.get('SUBLEVEL', '0')}" + fields.get(
        "EXTRAVERSION", ""
    )


def _check_essentials(root: Path, what: str) -> None:
    if not (root / RADIX_TREE_HEADER).is_file():
        version = _makefile_version(root)
        raise KhoConformError(
            f"{what}{f' (kernel {version})' if version else ''} has no KHO radix tree "
            f"({RADIX_TREE_HEADER} missing; first in 7.1); use a 7.1 or later kernel"
        )
    missing = [p for p in ESSENTIAL_PATHS if not (root / p).is_file()]
    if missing:
        raise KhoConformError(f"{what} lacks {', '.join(missing)}; is it a complete kernel tree?")


def _load_entry(entry: Path) -> KernelSource | None:
    """The cached source in ``entry``, or None if absent or extracted for other NEEDED_PATHS."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("needed_paths") != list(NEEDED_PATHS):
        return None
    tree = entry / "tree"
    return KernelSource(meta["version"], meta["provider"], tree, _hash_files(tree), meta["makefile_version"])


def _install_entry(root: Path, name: str, staged_tree: Path, version: str, provider: str) -> KernelSource:
    """Move a fully prepared tree from tmp/ into trees/<name> (caller holds the lock)."""
    staging = staged_tree.parent
    meta = {
        "version": version,
        "provider": provider,
        "makefile_version": _makefile_version(staged_tree),
        "needed_paths": list(NEEDED_PATHS),
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    final = root / "trees" / name
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(final, ignore_errors=True)  # stale: extracted for older NEEDED_PATHS
    staging.rename(final)
    source = _load_entry(final)
    assert source is not None
    return source


def list_cached() -> list[KernelSource]:
    trees = cache_dir() / "trees"
    if not trees.is_dir():
        return []
    return [s for entry in sorted(trees.iterdir()) if (s := _load_entry(entry)) is not None]


@contextmanager
def _step(progress: Progress | None, description: str) -> Iterator[None]:
    if progress is None:
        yield
        return
    task = progress.add_task(description, total=None)
    try:
        yield
    finally:
        progress.update(task, total=1, completed=1)


def _run(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except FileNotFoundError as e:
        raise KhoConformError(f"{cmd[0]} not found; install it or use --kernel-tree PATH") from e
    except subprocess.TimeoutExpired as e:
        raise KhoConformError(f"{cmd[0]} timed out after {timeout:.0f} s; retry or use --kernel-tree PATH") from e


def _first_line(text: str, prefixes: tuple[str, ...] = ()) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(prefixes):
            return line
    return lines[0] if lines else "no output"


# --------------------------------------------------------------------------
# Tarball extraction


def _tar_prefix(tarball: Path) -> str:
    """The top directory of the tree in ``tarball`` ("" for a flat tarball)."""
    try:
        with tarfile.open(tarball, "r|*") as tar:
            for member in tar:
                parts = [p for p in member.name.split("/") if p not in ("", ".")]
                if parts:
                    lead = "./" if member.name.startswith("./") else ""
                    return lead + parts[0] if member.isdir() or len(parts) > 1 else ""
    except (OSError, tarfile.TarError) as e:
        raise KhoConformError(f"cannot read tarball {tarball}: {e}") from e
    raise KhoConformError(f"tarball {tarball} is empty")


def _extract_needed(tarball: Path, dest: Path, progress: Progress | None) -> None:
    """Extract NEEDED_PATHS from ``tarball`` into ``dest`` without the tree prefix."""
    prefix = _tar_prefix(tarball)
    members = [f"{prefix}/{p}" if prefix else p for p in NEEDED_PATHS]
    # The tarballs are xz with many blocks: threaded xz halves the time.
    decompress = ["-I", "xz -T0"] if tarball.name.endswith(".xz") else []
    dest.mkdir(parents=True, exist_ok=True)
    cmd = ["tar", *decompress, "-xf", str(tarball), "-C", str(dest), "--no-same-owner",
           f"--strip-components={len(prefix.split('/')) if prefix else 0}", "--wildcards", *members]
    with _step(progress, f"extracting {tarball.name}"):
        result = _run(cmd, timeout=1800)
    # A pattern matching nothing makes tar fail after extracting the rest;
    # the essential files are checked by the caller.
    real_errors = [
        line for line in result.stderr.splitlines()
        if line.strip() and "Not found in archive" not in line and "Exiting with failure status" not in line
    ]
    if result.returncode != 0 and real_errors:
        raise KhoConformError(f"cannot extract {tarball}: {real_errors[0]}")


# --------------------------------------------------------------------------
# Mirror and apt


def _deb822_entries(text: str) -> list[tuple[list[str], list[str], list[str]]]:
    """(types, uris, suites) of each enabled stanza of a deb822 .sources file."""
    entries = []
    for stanza in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        entries.append((fields.get("types", "").split(), fields.get("uris", "").split(),
                        fields.get("suites", "").split()))
    return entries


def _one_line_entries(text: str) -> list[tuple[list[str], list[str], list[str]]]:
    """(types, uris, suites) of each line of a one-line-style sources.list."""
    entries = []
    for line in text.splitlines():
        m = re.match(r"\s*(deb|deb-src)\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
        if m:
            entries.append(([m[1]], [m[2]], [m[3]]))
    return entries


def mirror_uri(sources_list: Path | None = None, sources_dir: Path | None = None) -> str:
    """The Debian archive URI the machine's apt sources use (first one, in apt's order)."""
    sources_list = sources_list or APT_SOURCES_LIST
    sources_dir = sources_dir or APT_SOURCES_DIR
    # apt's order: sources.list (always one-line style), then the parts by name.
    files = [(sources_list, _one_line_entries)]
    for path in sorted(sources_dir.iterdir()) if sources_dir.is_dir() else []:
        if path.name.endswith(".sources"):
            files.append((path, _deb822_entries))
        elif path.name.endswith(".list"):
            files.append((path, _one_line_entries))
    entries = []
    for path, parse in files:
        try:
            entries += parse(path.read_text(errors="replace"))
        except OSError:
            continue
    for types, uris, suites in entries:
        if not {"deb", "deb-src"} & set(types):
            continue
        if not any(_DEBIAN_SUITE.fullmatch(s) for s in suites):
            continue
        for uri in uris:
            if uri.startswith(("http://", "https://")):
                return uri.rstrip("/")
    raise KhoConformError(
        f"no Debian mirror found in {sources_list} or {sources_dir}/; "
        "use --kernel-tree PATH or --kernel-tarball PATH"
    )


class _Apt:
    """apt-get/apt-cache on a private state directory inside the cache."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "apt"
        self.options = [
            "-o", "Dir::Etc::SourceList=/dev/null",
            "-o", f"Dir::Etc::SourceParts={self.dir / 'parts'}",
            "-o", f"Dir::State::Lists={self.dir / 'lists'}",
            "-o", f"Dir::Cache={self.dir / 'cache'}",
            "-o", "Acquire::Languages=none",
            "-o", "Acquire::http::Timeout=30",
            # Downloads go to root-owned dirs in the cache; don't switch to _apt.
            "-o", "APT::Sandbox::User=root",
        ]

    def run(self, tool: str, *args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        return _run([tool, *self.options, *args], cwd=cwd, timeout=timeout)

    def update(self, progress: Progress | None) -> None:
        """Make the package lists current (reused for MAX_AGE)."""
        if not KEYRING.is_file():
            raise KhoConformError(f"{KEYRING} missing; install debian-archive-keyring or use --kernel-tree PATH")
        sources = (
            "Types: deb deb-src\n"
            f"URIs: {mirror_uri()}\n"
            f"Suites: {' '.join(SUITES)}\n"
            "Components: main\n"
            f"Signed-By: {KEYRING}\n"
        )
        parts = self.dir / "parts" / "kho.sources"
        stamp = self.dir / "updated"
        for sub in ("parts", "lists/partial", "cache/archives/partial"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        fresh = stamp.exists() and time.time() - stamp.stat().st_mtime < MAX_AGE
        if fresh and parts.exists() and parts.read_text() == sources:
            return
        parts.write_text(sources)
        stamp.unlink(missing_ok=True)
        with _step(progress, "updating package lists"):
            # No retries: offline runs should fail (or fall back to the cache) at once.
            result = self.run("apt-get", "-o", "Acquire::Retries=0", "update", timeout=300)
        # apt-get update exits 0 when indexes fail to download; look at its warnings too.
        failed = result.returncode != 0 or re.search(r"^(E:|W: Failed to fetch|W: Some index files)",
                                                     result.stderr, re.M)
        if failed:
            raise KhoConformError(
                "no network / mirror unreachable: apt-get update failed: "
                f"{_first_line(result.stderr + result.stdout, ('E:', 'W:', 'Err:'))}; "
                "use --kernel-tree PATH or --kernel-tarball PATH"
            )
        stamp.touch()

    def available(self) -> dict[str, list[_Candidate]]:
        names = self.run("apt-cache", "pkgnames", "linux-source-").stdout.split()
        binaries = [n for n in names if _BINARY_PACKAGE.fullmatch(n)]
        policy = self.run("apt-cache", "policy", *binaries).stdout if binaries else ""
        showsrc = self.run("apt-cache", "showsrc", _SOURCE_PACKAGE).stdout
        return _build_available(policy, showsrc)


# --------------------------------------------------------------------------
# Versions


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


def _split_debian(version: str) -> tuple[int, str, str]:
    epoch, _, rest = version.rpartition(":") if ":" in version else ("0", "", version)
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
    return int(epoch or 0), upstream, revision


def debian_version_compare(a: str, b: str) -> int:
    """Like ``dpkg --compare-versions``: negative, zero or positive."""
    (ea, ua, ra), (eb, ub, rb) = _split_debian(a), _split_debian(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _verrevcmp(ua, ub) or _verrevcmp(ra, rb)


_debian_key = functools.cmp_to_key(debian_version_compare)


@dataclass(frozen=True)
class _Candidate:
    upstream: str  # "7.2.13"
    debian: str  # "7.2.13-1"
    package: str  # "linux-source-7.2", or "linux" for the source package's orig tarball

    @property
    def is_orig(self) -> bool:
        return self.package == _SOURCE_PACKAGE

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
        if fields.get("Package") == _SOURCE_PACKAGE and "Version" in fields:
            versions.append(fields["Version"])
    return versions


def _build_available(policy: str, showsrc: str) -> dict[str, list[_Candidate]]:
    """series -> candidates, newest first, one per upstream version.

    A series with a ``linux-source-X.Y`` package is taken from it (Debian's
    patched tree); other series from the ``linux`` source package's orig
    tarballs. Series before FIRST_SERIES are left out.
    """
    by_upstream: dict[tuple[str, str], _Candidate] = {}
    binary_series = set()

    def add(package: str, debian: str) -> None:
        upstream = _split_debian(debian)[1]
        series = _series_of(upstream)
        if series is None or series < FIRST_SERIES:
            return
        key = (f"{series[0]}.{series[1]}", upstream)
        old = by_upstream.get(key)
        if old is None or debian_version_compare(debian, old.debian) > 0:
            by_upstream[key] = _Candidate(upstream, debian, package)

    for package, versions in _parse_policy(policy).items():
        if m := _BINARY_PACKAGE.fullmatch(package):
            binary_series.add(m[1])
            for version in versions:
                add(package, version)
    for version in _parse_showsrc(showsrc):
        series = _series_of(_split_debian(version)[1])
        if series and f"{series[0]}.{series[1]}" not in binary_series:
            add(_SOURCE_PACKAGE, version)

    available: dict[str, list[_Candidate]] = {}
    for (series, _), candidate in by_upstream.items():
        available.setdefault(series, []).append(candidate)
    for candidates in available.values():
        candidates.sort(key=lambda c: _debian_key(c.upstream), reverse=True)
    return dict(sorted(available.items(), key=lambda kv: _series_of(kv[0])))


def _parse_request(text: str) -> tuple[str, str | None]:
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


def _candidates(text: str, available: dict[str, list[_Candidate]]) -> list[_Candidate]:
    """What to try for request ``text``, in order: the pinned version if offered, then the series newest first."""
    series, exact = _parse_request(text)
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


def list_available(*, progress: Progress | None = None) -> dict[str, list[str]]:
    """series -> upstream versions the mirror offers, newest first."""
    with _locked() as root:
        apt = _Apt(root)
        apt.update(progress)
        return {series: [c.upstream for c in cands] for series, cands in apt.available().items()}


# --------------------------------------------------------------------------
# Fetching from the mirror


def _download(apt: _Apt, candidate: _Candidate, work: Path, progress: Progress | None) -> Path:
    """Download ``candidate`` into ``work``; returns the tree tarball."""
    if candidate.is_orig:
        with _step(progress, f"downloading linux {candidate.upstream} orig tarball"):
            result = apt.run("apt-get", "source", "--download-only", f"{candidate.package}={candidate.debian}",
                             cwd=work)
        # Old .dsc files get pruned from the pool while the orig tarball stays
        # (another revision shares it): the tarball is all we need.
        tarballs = sorted(work.glob(f"{_SOURCE_PACKAGE}_*.orig.tar.*"))
        if not tarballs:
            raise KhoConformError(
                f"could not download linux {candidate.upstream}: {_first_line(result.stderr, ('E:',))}"
            )
        return tarballs[0]

    with _step(progress, f"downloading {candidate.package} {candidate.debian}"):
        result = apt.run("apt-get", "download", f"{candidate.package}={candidate.debian}", cwd=work)
    debs = sorted(work.glob("*.deb"))
    if result.returncode != 0 or not debs:
        raise KhoConformError(
            f"could not download {candidate.package}={candidate.debian}: {_first_line(result.stderr, ('E:',))}"
        )
    # The .deb ships the tree as ./usr/src/linux-source-X.Y.tar.xz.
    script = 'set -e; dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" --wildcards "./usr/src/linux-source-*.tar.*"'
    with _step(progress, f"unpacking {debs[0].name}"):
        result = _run(["sh", "-c", script, "sh", str(debs[0]), str(work)], timeout=600)
    debs[0].unlink()
    tarballs = sorted((work / "usr" / "src").glob("linux-source-*.tar.*"))
    if result.returncode != 0 or not tarballs:
        raise KhoConformError(f"cannot unpack {debs[0].name}: {_first_line(result.stderr)}")
    return tarballs[0]


def _fetch_candidate(root: Path, apt: _Apt, candidate: _Candidate, progress: Progress | None) -> KernelSource:
    cached = _load_entry(root / "trees" / candidate.entry)
    if cached is not None:
        return cached
    work = Path(tempfile.mkdtemp(dir=root / "tmp"))
    try:
        tarball = _download(apt, candidate, work, progress)
        staged = work / "entry" / "tree"
        _extract_needed(tarball, staged, progress)
        _check_essentials(staged, f"{candidate.provider}")
        return _install_entry(root, candidate.entry, staged, candidate.upstream, candidate.provider)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cached_debian(series: str, exact: str | None) -> list[KernelSource]:
    """Cached mirror sources of ``series`` (or exactly ``exact``), newest first."""
    found = [
        s for s in list_cached()
        if s.provider.startswith("debian:")
        and (s.version == exact if exact else s.version.startswith(series + ".") or s.version == series)
    ]
    return sorted(found, key=lambda s: _debian_key(s.version), reverse=True)


def _from_alias(root: Path, series: str) -> KernelSource | None:
    alias = root / "series" / f"{series}.json"
    try:
        if time.time() - alias.stat().st_mtime >= MAX_AGE:
            return None
        return _load_entry(root / "trees" / json.loads(alias.read_text())["entry"])
    except (OSError, ValueError, KeyError):
        return None


def fetch(version: str, *, progress: Progress | None = None) -> KernelSource:
    """The mirror's kernel ``version``: a series ("7.2": its newest version) or
    an exact version ("7.2.13"; the newest of its series if not offered).

    Cached: an extracted exact version is reused for ever, a series resolution
    for a day, both without running apt.
    """
    series, exact = _parse_request(version)

    def from_cache(root: Path) -> KernelSource | None:
        if exact:
            cached = _cached_debian(series, exact)
            return cached[0] if cached else None
        return _from_alias(root, series)

    if (hit := from_cache(cache_dir())) is not None:
        return hit
    with _locked() as root:
        if (hit := from_cache(root)) is not None:  # fetched by another process meanwhile
            return hit
        apt = _Apt(root)
        try:
            apt.update(progress)
        except KhoConformError:
            cached = _cached_debian(series, exact)
            if not cached:
                raise
            _log.warning("mirror unreachable; using cached kernel %s", cached[0].version)
            return cached[0]
        errors = []
        for candidate in _candidates(version, apt.available()):
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


# --------------------------------------------------------------------------
# Local trees, tarballs and patches


def from_tree(path: Path, patch: Path | None = None) -> KernelSource:
    """A developer's kernel tree, used read-only (patched copies go to the cache)."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise KhoConformError(f"kernel tree {path} is not a directory; pass the top of a kernel checkout")
    _check_essentials(path, f"kernel tree {path}")
    makefile_version = _makefile_version(path)
    source = KernelSource(f"local-{makefile_version or 'unknown'}", f"tree:{path}", path, _hash_files(path),
                          makefile_version)
    return apply_patch(source, patch) if patch else source


def from_tarball(path: Path, *, progress: Progress | None = None) -> KernelSource:
    """A kernel tarball (any tar compression); its needed files are extracted into the cache."""
    path = Path(path).expanduser().resolve()
    try:
        stat = path.stat()
    except OSError as e:
        raise KhoConformError(f"cannot read kernel tarball {path}: {e.strerror}") from e
    # Path, size and mtime identify the tarball without reading 150 MB.
    name = "tarball_" + hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]

    def make(root: Path, work: Path) -> KernelSource:
        staged = work / "tree"
        _extract_needed(path, staged, progress)
        _check_essentials(staged, f"kernel tarball {path}")
        return _install_entry(root, name, staged, _makefile_version(staged) or "unknown", f"tarball:{path}")

    return _cached_entry(name, make)


def _patch_sections(text: str) -> list[tuple[str | None, str]]:
    """Split a unified/git diff into (target path without its first component, text) per file.

    Text before the first file (e.g. a mail header) has target None. Hunk line
    counts are followed so that a removed line starting with "-- " is not taken
    for a file header.
    """
    lines = text.splitlines(keepends=True)
    starts = []
    in_diff_header = False
    old = new = 0
    for i, line in enumerate(lines):
        if old > 0 or new > 0:
            tag = line[:1]
            old -= tag in (" ", "-", "\n", "\r")
            new -= tag in (" ", "+", "\n", "\r")
            continue
        if line.startswith("diff "):
            starts.append(i)
            in_diff_header = True
        elif line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            if not in_diff_header:
                starts.append(i)
            in_diff_header = False
        elif m := re.match(r"@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@", line):
            old, new = int(m[1] or 1), int(m[2] or 1)
            in_diff_header = False

    def target(section: list[str]) -> str | None:
        names = {}
        for line in section:
            if line.startswith(("--- ", "+++ ")) and line[:3] not in names:
                names[line[:3]] = line[4:].split("\t")[0].strip()
            elif m := re.match(r"diff --git \S+ (\S+)", line):
                names.setdefault("git", m[1])
            elif line.startswith("@@"):
                break
        name = names.get("+++")
        if name in (None, "/dev/null"):
            name = names.get("---") if names.get("---") not in (None, "/dev/null") else names.get("git")
        return name.split("/", 1)[1] if name and "/" in name else name

    if not starts:
        return [(None, text)]
    sections: list[tuple[str | None, str]] = [(None, "".join(lines[: starts[0]]))] if starts[0] else []
    for begin, end in zip(starts, starts[1:] + [len(lines)]):
        sections.append((target(lines[begin:end]), "".join(lines[begin:end])))
    return sections


def apply_patch(source: KernelSource, patch: Path) -> KernelSource:
    """``source`` with ``patch`` (``patch -p1``) applied to a copy of its needed files in the cache.

    Changes to files outside NEEDED_PATHS are dropped: the suite never reads them.
    """
    patch = Path(patch).expanduser().resolve()
    try:
        text = patch.read_bytes().decode("latin-1")  # byte-exact round trip
    except OSError as e:
        raise KhoConformError(f"cannot read patch {patch}: {e.strerror}") from e
    sections = _patch_sections(text)
    kept = "".join(body for target, body in sections if target and _is_needed(target))
    if not kept:
        raise KhoConformError(
            f"patch {patch} changes none of the files the suite uses (NEEDED_PATHS); is it a -p1 kernel diff?"
        )
    dropped = sorted({t for t, _ in sections if t and not _is_needed(t)})
    if dropped:
        _log.info("patch %s: ignoring changes to %s", patch.name, ", ".join(dropped))
    provider = f"{source.provider}+patch:{patch.name}"
    key = f"{source.version}\0{provider}\0{source.digest()}\0{kept}"
    name = "patched_" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]

    def make(root: Path, work: Path) -> KernelSource:
        staged = work / "tree"
        for rel in source.files:
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source.root / rel, staged / rel)
        (work / "kept.patch").write_bytes(kept.encode("latin-1"))
        base = ["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch", "-d", str(staged),
                "-i", str(work / "kept.patch")]
        for extra in (["--dry-run"], []):  # dry run first: never leave a half-patched tree
            result = _run(base + extra, timeout=120)
            if result.returncode != 0:
                detail = [ln for ln in (result.stdout + result.stderr).splitlines()
                          if ln.strip() and not ln.startswith(("checking file", "patching file"))]
                raise KhoConformError(
                    f"patch {patch} does not apply to {source.provider}: "
                    f"{detail[0] if detail else 'patch failed'}; rebase it onto that kernel"
                )
        _check_essentials(staged, f"{source.provider} with {patch.name}")
        return _install_entry(root, name, staged, source.version, provider)

    return _cached_entry(name, make)


def _cached_entry(name: str, make: Callable[[Path, Path], KernelSource]) -> KernelSource:
    """The cache entry ``name``, or make(cache root, scratch dir) under the
    cache lock (checked again there: another process may have made it)."""
    if (hit := _load_entry(cache_dir() / "trees" / name)) is not None:
        return hit
    with _locked() as root:
        if (hit := _load_entry(root / "trees" / name)) is not None:
            return hit
        work = Path(tempfile.mkdtemp(dir=root / "tmp"))
        try:
            return make(root, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def resolve(
    kernel: str | None,
    kernel_tree: Path | None,
    kernel_tarball: Path | None,
    patch: Path | None,
    *,
    progress: Progress | None = None,
) -> KernelSource:
    """The source the CLI options select (default: the newest 7.2 from the mirror)."""
    chosen = [flag for flag, value in (("--kernel", kernel), ("--kernel-tree", kernel_tree),
                                       ("--kernel-tarball", kernel_tarball)) if value is not None]
    if len(chosen) > 1:
        raise KhoConformError(f"{' and '.join(chosen)} conflict; pass only one of them")
    if kernel_tree is not None:
        return from_tree(kernel_tree, patch)
    if kernel_tarball is not None:
        source = from_tarball(kernel_tarball, progress=progress)
    else:
        source = fetch(kernel or DEFAULT_KERNEL, progress=progress)
    return apply_patch(source, patch) if patch else source
