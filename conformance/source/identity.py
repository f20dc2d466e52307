"""The identity of a kernel source: what every build, report and finding names.

A :class:`KernelSource` is a directory holding the subset of a kernel tree the
suite reads (``tree_files.NEEDED_PATHS``) plus the sha256 of each of those
files. Its ``digest`` (over the file hashes only) keys builds in the cache and
tells two reports whether they tested the same code; ``identity()`` is its
serialised form and ``from_identity`` the one way back.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KhoConformError

SHORT_DIGEST = 12  # characters of the digest shown in reports


@dataclass(frozen=True)
class KernelSource:
    version: str  # upstream version, e.g. "7.2.13"; "local-<Makefile version>" for trees
    provider: str  # where it came from, e.g. "debian:linux-source-7.2=7.2.13-1"
    root: Path  # directory holding the (partial) tree
    files: dict[str, str] = field(hash=False)  # relative path -> sha256
    makefile_version: str = ""  # VERSION.PATCHLEVEL.SUBLEVEL+EXTRAVERSION of the tree's Makefile
    patches: tuple[tuple[str, str], ...] = ()  # (name, sha256) of each patch applied, in order
    # path -> (first, last) line ranges the patches changed, in the patched file's numbering
    changed_lines: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict, hash=False)

    def digest(self) -> str:
        """Content only: the same files from two providers share build results."""
        h = hashlib.sha256()
        for path, sha in sorted(self.files.items()):
            h.update(f"{path}\0{sha}\n".encode())
        return h.hexdigest()

    @property
    def release(self) -> str:
        """The release number ("7.3.4"), also for a developer's "local-7.3.4" tree."""
        m = re.search(r"\d+(\.\d+)+", self.makefile_version or self.version)
        return m.group(0) if m else self.version

    def identity(self) -> dict:
        return {
            "version": self.version,
            "provider": self.provider,
            "makefile_version": self.makefile_version,
            "digest": self.digest(),
            "files": dict(sorted(self.files.items())),
            "patches": [list(p) for p in self.patches],
            "changed_lines": {path: [list(r) for r in ranges] for path, ranges in sorted(self.changed_lines.items())},
        }

    @classmethod
    def from_identity(cls, identity: dict, root: Path) -> KernelSource:
        """The inverse of ``identity()``, for files laid out under ``root``."""
        try:
            return cls(identity["version"], identity["provider"], Path(root), dict(identity["files"]),
                       identity.get("makefile_version", ""), tuple(tuple(p) for p in identity.get("patches", ())),
                       line_ranges(identity.get("changed_lines", {})))
        except (KeyError, TypeError) as e:
            raise KhoConformError(f"a source identity lacks {e}; it was not written by kho-conform") from None


def ranges_of(lines: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Line numbers as ascending ``(first, last)`` runs: 1 2 3 7 -> (1, 3) (7, 7)."""
    out: list[tuple[int, int]] = []
    for n in sorted(set(lines)):
        if out and out[-1][1] == n - 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return tuple(out)


def line_ranges(data: dict) -> dict[str, tuple[tuple[int, int], ...]]:
    """``changed_lines`` as JSON holds it (lists) -> as KernelSource does (tuples)."""
    return {path: tuple((int(a), int(b)) for a, b in ranges) for path, ranges in data.items()}


def short_digest(identity: dict) -> str:
    """The digest of a serialised identity, as reports show it."""
    return str(identity.get("digest") or "?")[:SHORT_DIGEST]


def handover_label(old: str, new: str) -> str:
    """How reports name a live update from kernel version ``old`` to ``new``."""
    return f"handover {old} → {new}"
