"""Kernel tarballs (any tar compression): only the needed files are extracted,
into the cache."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import KhoConformError
from .cache import cached_entry, install_entry
from .identity import KernelSource
from .tools import run, step
from .tree_files import NEEDED_PATHS, check_essentials, makefile_version

if TYPE_CHECKING:
    from rich.progress import Progress


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


def extract_needed(tarball: Path, dest: Path, progress: Progress | None) -> None:
    """Extract NEEDED_PATHS from ``tarball`` into ``dest`` without the tree prefix."""
    prefix = _tar_prefix(tarball)
    members = [f"{prefix}/{p}" if prefix else p for p in NEEDED_PATHS]
    # The tarballs are xz with many blocks: threaded xz halves the time.
    decompress = ["-I", "xz -T0"] if tarball.name.endswith(".xz") else []
    dest.mkdir(parents=True, exist_ok=True)
    cmd = ["tar", *decompress, "-xf", str(tarball), "-C", str(dest), "--no-same-owner",
           f"--strip-components={len(prefix.split('/')) if prefix else 0}", "--wildcards", *members]
    with step(progress, f"extracting {tarball.name}"):
        result = run(cmd, timeout=1800)
    # A pattern matching nothing makes tar fail after extracting the rest;
    # the essential files are checked by the caller.
    real_errors = [
        line for line in result.stderr.splitlines()
        if line.strip() and "Not found in archive" not in line and "Exiting with failure status" not in line
    ]
    if result.returncode != 0 and real_errors:
        raise KhoConformError(f"cannot extract {tarball}: {real_errors[0]}")


def from_tarball(path: Path, *, progress: Progress | None = None) -> KernelSource:
    """A kernel tarball; its needed files are extracted into the cache."""
    path = Path(path).expanduser().resolve()
    try:
        stat = path.stat()
    except OSError as e:
        raise KhoConformError(f"cannot read kernel tarball {path}: {e.strerror}") from e
    # Path, size and mtime identify the tarball without reading 150 MB.
    name = "tarball_" + hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]

    def make(root: Path, work: Path) -> KernelSource:
        staged = work / "tree"
        extract_needed(path, staged, progress)
        check_essentials(staged, f"kernel tarball {path}")
        return install_entry(root, name, staged, makefile_version(staged) or "unknown", f"tarball:{path}")

    return cached_entry(name, make)
