"""A developer's kernel tree: read-only in place, or one revision of it from git."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

from ..errors import KhoConformError
from .cache import cached_entry, hash_files, install_entry
from .identity import KernelSource
from .tree_files import check_essentials, is_needed, makefile_version


def from_tree(path: Path) -> KernelSource:
    """The tree at ``path`` as it is; patched copies are made by ``patch.apply_series``."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise KhoConformError(f"kernel tree {path} is not a directory; pass the top of a kernel checkout")
    check_essentials(path, f"kernel tree {path}")
    version = makefile_version(path)
    return KernelSource(f"local-{version or 'unknown'}", f"tree:{path}", path, hash_files(path), version)


def from_tree_at(path: Path, revision: str) -> KernelSource:
    """The needed files of the git tree at ``path`` as of ``revision``
    (``git archive``), extracted into the cache: the base a commit range
    applies to."""
    path = Path(path).expanduser().resolve()

    def git(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(["git", "-C", str(path), *args], capture_output=True, timeout=300)
        if proc.returncode:
            detail = proc.stderr.decode(errors="replace").strip().splitlines()
            raise KhoConformError(f"git {args[0]} {revision} in {path} failed: {detail[0] if detail else '?'}; "
                                  "is it a git tree holding that revision?")
        return proc

    commit = git("rev-parse", "--verify", f"{revision}^{{commit}}").stdout.decode().strip()
    names = [n for n in git("ls-tree", "-r", "--name-only", commit).stdout.decode(errors="replace").splitlines()
             if is_needed(n)]
    name = f"git_{commit[:16]}"

    def make(root: Path, work: Path) -> KernelSource:
        staged = work / "tree"
        staged.mkdir()
        with tarfile.open(fileobj=io.BytesIO(git("archive", "--format=tar", commit, "--", *names).stdout)) as tar:
            tar.extractall(staged, filter="data")
        check_essentials(staged, f"kernel tree {path} at {revision}")
        return install_entry(root, name, staged, f"local-{makefile_version(staged) or 'unknown'}",
                             f"git:{path}@{commit[:12]}")

    return cached_entry(name, make)
