"""The Debian mirror the machine's apt sources already use, and apt run on a
private state directory in the cache (the system apt configuration is never
touched). The suites that carry 7.x kernels are named here; the host comes
from the machine's own sources, never from this project."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import KhoConformError
from .tools import first_line, run, step
from .versions import BINARY_PACKAGE, SOURCE_PACKAGE, Candidate, build_available

if TYPE_CHECKING:
    import subprocess

    from rich.progress import Progress

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


class Apt:
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
        return run([tool, *self.options, *args], cwd=cwd, timeout=timeout)

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
        with step(progress, "updating package lists"):
            # No retries: offline runs should fail (or fall back to the cache) at once.
            result = self.run("apt-get", "-o", "Acquire::Retries=0", "update", timeout=300)
        # apt-get update exits 0 when indexes fail to download; look at its warnings too.
        failed = result.returncode != 0 or re.search(r"^(E:|W: Failed to fetch|W: Some index files)",
                                                     result.stderr, re.M)
        if failed:
            raise KhoConformError(
                "no network / mirror unreachable: apt-get update failed: "
                f"{first_line(result.stderr + result.stdout, ('E:', 'W:', 'Err:'))}; "
                "use --kernel-tree PATH or --kernel-tarball PATH"
            )
        stamp.touch()

    def available(self) -> dict[str, list[Candidate]]:
        names = self.run("apt-cache", "pkgnames", "linux-source-").stdout.split()
        binaries = [n for n in names if BINARY_PACKAGE.fullmatch(n)]
        policy = self.run("apt-cache", "policy", *binaries).stdout if binaries else ""
        showsrc = self.run("apt-cache", "showsrc", SOURCE_PACKAGE).stdout
        return build_available(policy, showsrc)
