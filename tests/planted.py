"""The planted bug: one line removed from 7.2's radix tree, so that fuzzing
finds divergences within a second. Made at test time from the cached kernel
file, in the test's own directory: no kernel source text is part of this
repository."""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

from conformance.source import fetch

KHO_C = "kernel/liveupdate/kexec_handover.c"
PLANTED = "__clear_bit(idx, leaf->bitmap);"  # in kho_radix_del_page: unpreserve stops clearing the bit


def _planted() -> tuple[Path, list[str], list[str]]:
    """7.2's root, its kexec_handover.c lines and the same without the planted line."""
    source = fetch("7.2")
    old = (source.root / KHO_C).read_text().splitlines(keepends=True)
    hits = [i for i, line in enumerate(old) if line.strip() == PLANTED]
    assert len(hits) == 1, f"{PLANTED} not found once in {source.version}"
    return source.root, old, old[: hits[0]] + old[hits[0] + 1 :]


def planted_patch(directory: Path) -> Path:
    """The planted bug as a patch to apply to 7.2."""
    _, old, new = _planted()
    patch = directory / "planted.patch"
    patch.write_text("".join(difflib.unified_diff(old, new, f"a/{KHO_C}", f"b/{KHO_C}")))
    return patch


def planted_tree(directory: Path) -> Path:
    """A kernel tree (the files the suite reads) of 7.2 with the bug planted."""
    root, _, new = _planted()
    shutil.copytree(root, directory)
    (directory / KHO_C).write_text("".join(new))
    return directory
