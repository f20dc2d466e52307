"""Stage 1, kernel source: where the kernel's KHO code comes from.

- ``debian``: Debian kernel source packages by version, through the mirror
  the machine's apt sources use (``mirror``), in dpkg's version order
  (``versions``);
- ``tree``: a developer's kernel tree, read-only;
- ``tarball``: any kernel tarball;
- ``patch``: a patch or series applied to a scratch copy of any of these;
- ``identity``: what every build, report and finding names;
- ``cache``: where it all lives (outside the repository); ``tree_files``:
  which files of a tree are read.

Every failure raises :class:`~conformance.errors.KhoConformError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import KhoConformError
from .cache import cache_dir, list_cached
from .debian import fetch, list_available
from .identity import KernelSource
from .patch import apply_series, read_series, series_from_commits
from .tarball import from_tarball
from .tree import from_tree, from_tree_at
from .versions import DEFAULT_KERNEL

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = [
    "DEFAULT_KERNEL", "KernelSource", "cache_dir", "fetch", "from_tarball", "from_tree", "list_available",
    "list_cached", "resolve",
]


def resolve(
    kernel: str | None,
    kernel_tree: Path | None,
    kernel_tarball: Path | None,
    patch: Path | None,
    *,
    commits: str | None = None,
    progress: Progress | None = None,
) -> KernelSource:
    """The source the CLI options select (default: the newest DEFAULT_KERNEL
    from the mirror), with ``patch`` (a diff, mbox or format-patch directory)
    or the ``commits`` A..B of ``kernel_tree`` applied."""
    chosen = [flag for flag, value in (("--kernel", kernel), ("--kernel-tree", kernel_tree),
                                       ("--kernel-tarball", kernel_tarball)) if value is not None]
    if len(chosen) > 1:
        raise KhoConformError(f"{' and '.join(chosen)} conflict; pass only one of them")
    if commits is not None and (kernel_tree is None or patch is not None):
        raise KhoConformError("--commits A..B needs --kernel-tree PATH (the git tree holding them) and no --patch")
    if kernel_tree is not None:
        source = from_tree(kernel_tree)
        if commits is not None:
            # The series is applied to the range's base, as a reviewer would.
            base = from_tree_at(kernel_tree, commits.split("..", 1)[0])
            return apply_series(base, series_from_commits(source.root, commits), f"commits {commits}")
    elif kernel_tarball is not None:
        source = from_tarball(kernel_tarball, progress=progress)
    else:
        source = fetch(kernel or DEFAULT_KERNEL, progress=progress)
    if patch is None:
        return source
    return apply_series(source, read_series(patch), Path(patch).name)

