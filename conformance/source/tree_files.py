"""Which files of a kernel tree the suite reads, and what a usable tree holds.

One list for every stage: the source providers extract exactly these files
into the cache (and hash them for the source identity), extraction compiles
the first group unchanged, and the documentation checks read the rest.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from pathlib import Path

from ..errors import KhoConformError

KHO_C = "kernel/liveupdate/kexec_handover.c"
RADIX_TREE_HEADER = "include/linux/kho_radix_tree.h"
ABI_HEADER = "include/linux/kho/abi/kexec_handover.h"

# Tree files compiled unchanged: the code and ABI under test, and the
# kernel's own generic helpers that build in userspace.
COMPILED_FILES: tuple[str, ...] = (
    KHO_C,
    "kernel/liveupdate/kexec_handover_internal.h",
    "include/linux/kho/abi/*.h",
    RADIX_TREE_HEADER,
    "include/linux/kexec_handover.h",
    "include/linux/libfdt.h",
    "include/linux/libfdt_env.h",
    "scripts/dtc/libfdt/libfdt.h",
    "scripts/dtc/libfdt/fdt.h",
    "scripts/dtc/libfdt/libfdt_env.h",
    "include/linux/count_zeros.h",
    "include/linux/log2.h",
    "include/linux/pfn.h",
    "include/asm-generic/bitops/__ffs.h",
    "include/asm-generic/bitops/__fls.h",
    "include/asm-generic/bitops/fls.h",
    "include/asm-generic/bitops/fls64.h",
    "include/asm-generic/bitops/generic-non-atomic.h",
)
# Compiled where the tree has them (7.3 moved struct kho_scratch here).
OPTIONAL_COMPILED_FILES: tuple[str, ...] = ("include/asm-generic/kexec_handover.h",)

# Glob patterns, relative to the tree root, of every file the suite compiles
# against or reads. ``*`` also matches ``/`` (as in tar), and a directory
# stands for everything below it.
NEEDED_PATHS: tuple[str, ...] = (
    "Makefile",  # the version
    *COMPILED_FILES,
    *OPTIONAL_COMPILED_FILES,
    "scripts/dtc/libfdt/*",  # libfdt, built beside the KHO code
    "Documentation/core-api/kho/*",  # documentation-versus-code checks
)

# Without these there is nothing to test; the radix tree header is also how
# pre-7.1 kernels are recognised.
ESSENTIAL_PATHS: tuple[str, ...] = (KHO_C, RADIX_TREE_HEADER)
FIRST_SERIES = (7, 1)  # first kernel series with the KHO radix tree

_BUILD_OUTPUT = re.compile(r"^\.|\.(o|a|so|ko|cmd|d|orig|rej)$")


def needed_files(root: Path) -> list[str]:
    """The NEEDED_PATHS files present under ``root``, relative, sorted."""
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


def is_needed(relpath: str) -> bool:
    return any(
        fnmatchcase(relpath, pattern) or relpath.startswith(pattern.rstrip("/") + "/")
        for pattern in NEEDED_PATHS
    )


def makefile_version(root: Path) -> str:
    """VERSION.PATCHLEVEL.SUBLEVEL+EXTRAVERSION of the tree's Makefile, or ''."""
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


def check_essentials(root: Path, what: str) -> None:
    """Refuse a tree without the KHO radix tree, naming what to use instead."""
    if not (root / RADIX_TREE_HEADER).is_file():
        version = makefile_version(root)
        raise KhoConformError(
            f"{what}{f' (kernel {version})' if version else ''} has no KHO radix tree "
            f"({RADIX_TREE_HEADER} missing; first in 7.1); use a 7.1 or later kernel"
        )
    missing = [p for p in ESSENTIAL_PATHS if not (root / p).is_file()]
    if missing:
        raise KhoConformError(f"{what} lacks {', '.join(missing)}; is it a complete kernel tree?")
