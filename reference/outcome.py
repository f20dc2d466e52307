"""What one program run produces, in the same form for the model and for the
kernel's C code, so that the two can be compared field by field.

Op result conventions (``OpResult.rc``):
- int-returning kernel calls: their return code (0 or -errno);
- void calls (unpreserve, del, remove_subtree, pokes): 0;
- every old-kernel op when KHO failed to initialise: -EOPNOTSUPP, not run;
- ``kexec``: 0 when the next kernel accepted the handover, -EINVAL when not;
- restore ops: 0 with ``value`` = pfn of the returned page, -1 for NULL,
  ``RESTORE_SKIPPED`` past ``RESTORE_PAGE_LIMIT`` pages; ``value2`` = pages
  handed to the managed-page count;
- ``retrieve_subtree``: its return code, ``value`` = phys, ``value2`` = size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

# Linux errno values (asm-generic/errno-base.h, errno.h) the KHO code returns.
ENOENT = 2
E2BIG = 7
ENOMEM = 12
EEXIST = 17
EINVAL = 22
ERANGE = 34
EOPNOTSUPP = 95
EADDRNOTAVAIL = 99
ERRNO = {"ENOENT": ENOENT, "E2BIG": E2BIG, "ENOMEM": ENOMEM, "EEXIST": EEXIST, "EINVAL": EINVAL,
         "ERANGE": ERANGE, "EOPNOTSUPP": EOPNOTSUPP, "EADDRNOTAVAIL": EADDRNOTAVAIL}


@dataclass(frozen=True)
class OpResult:
    rc: int = 0
    value: int = 0
    value2: int = 0
    # Where each warning fired. Only the count is compared: sites are
    # kernel-version specific, the count is the contract.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class TreeNode:
    """One node page of the radix tree, named by its index path from the root."""

    path: tuple[int, ...]  # table index at each level from the root; () = root
    level: int  # KHO_TREE_MAX_DEPTH - 1 at the root, 0 for a leaf bitmap
    phys: int
    entries: tuple[int, ...]  # table: non-zero slots; leaf: set bits (ascending)

    def canonical(self) -> tuple:
        return (self.path, self.level, self.entries)


@dataclass(frozen=True)
class Image:
    """What crosses kexec: the FDT and the physical pages holding the tree and
    the scratch descriptors. Any implementation's next kernel can start from
    any implementation's image."""

    page_shift: int
    fdt_phys: int
    fdt: bytes  # fdt_totalsize() bytes
    scratch_phys: int
    scratch: bytes  # the struct kho_scratch array
    pages: dict[int, bytes] = field(default_factory=dict)  # phys -> page bytes (tree nodes)


@dataclass(frozen=True)
class NextBoot:
    """What the next kernel's boot made of the handover: whether it took
    it, and the map of preserved memory it rebuilt (the restored map)."""

    accepted: bool
    reason: str = ""  # why the handover was refused (model) or the kernel's log (C)
    walk: tuple[tuple[int, int], ...] = ()  # (phys, order) in walk order
    walk_nodes: tuple[int, ...] = ()  # node pages visited (key-API kernels)
    reserved: tuple[tuple[int, int], ...] = ()  # memblock_reserve(phys, size), in call order
    noinit: tuple[tuple[int, int], ...] = ()  # memblock_reserved_mark_noinit
    scratch_marks: tuple[tuple[int, int], ...] = ()  # memblock_mark_kho_scratch
    magic: tuple[tuple[int, int], ...] = ()  # (pfn, order) of RAM head pages with the KHO magic
    phantom: tuple[int, ...] = ()  # non-RAM pfns whose struct page the walk touched


@dataclass(frozen=True)
class Outcome:
    boot: OpResult
    ops: tuple[OpResult, ...]
    # Old-kernel state at kexec (or at the end of a program without kexec).
    root_phys: int = 0
    tree: tuple[TreeNode, ...] = ()
    node_pages: dict[int, bytes] = field(default_factory=dict)
    fdt: bytes = b""
    image: Image | None = None
    next: NextBoot | None = None
    # Sanitizer reports, faults, accesses outside the arena: each is a finding.
    events: tuple[str, ...] = ()
    event_ops: tuple[int | None, ...] = ()  # the op each event happened in (None: boot)
    log: tuple[str, ...] = ()  # printk, for traces only

    def to_json(self) -> dict:
        def enc(x):
            if isinstance(x, bytes):
                return x.hex()
            if isinstance(x, dict):
                return {hex(k) if isinstance(k, int) else k: enc(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [enc(v) for v in x]
            return x

        return enc(asdict(self))


def fingerprint(parts: object) -> str:
    """A cheap, stable digest used to compare outcomes before any full diff."""
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=repr).encode(), digest_size=16).hexdigest()
