"""Quirks: what a known kernel bug or limitation makes the kernel do, as a
switch of the model.

The model is the specification and runs with no quirk. A quirk, switched on,
makes the model do what the kernel does for one triaged finding and nothing
else; each is written from its finding's description (``corpus/known/``), not
from the kernel's C. They exist only to prove attribution: a divergence is
credited to a known finding when the whole program agrees once the model runs
with that finding's quirks, and disagrees without them.

Where a quirk needs what the machine does with undefined behaviour (a shift
by more than the operand's width), it follows x86-64, where the kernel runs
here: a 32-bit shift count is taken modulo 32 and a 64-bit one modulo 64.
"""

from __future__ import annotations

# preserve_pages/unpreserve_pages: a block's order is lowered only while its
# first and last page are on different nodes (nothing in between is looked at).
NUMA_ENDPOINT_CHECK = "numa-endpoint-check"

# preserve_pages: when adding a block fails, every block of the range before
# it is deleted, whether or not this call had set it.
PRESERVE_PAGES_ROLLBACK = "preserve-pages-rollback"

# restore_pages: the blocks are recomputed from alignment and length alone
# (no NUMA split), each block's head restored, and the walk advances by the
# recomputed block's size.
RESTORE_PAGES_NUMA_SPLIT = "restore-pages-numa-split"

# restore_folio/restore_pages: a head page carrying the magic is restored
# with the order stored in it, whatever was asked for; restore_pages never
# compares that order with the block it expected.
RESTORE_TRUSTS_PAGE_ORDER = "restore-trusts-page-order"

# Page-range loops (preserve, unpreserve, restore) advance by an int
# ``1 << order``: x86 takes the shift count modulo 32 and 1 << 31 is
# negative, sign-extended when added to the unsigned pfn.
RANGE_INT_SHIFT = "range-int-shift"

# 7.1: the next kernel reserves ``1 << (order + PAGE_SHIFT)`` computed in int
# (x86: count modulo 32, bit 31 sign-extended) for every preserved block.
RESERVE_SIZE_INT_OVERFLOW = "reserve-size-int-overflow"

# preserve/unpreserve of a folio and the direct radix API take any (pfn,
# order): the key is computed as the kernel computes it (physical address
# truncated to 64 bits, shift counts modulo 64), and a page range whose end
# wraps past the top pfn is empty; page ranges (restore_pages too) are cut
# into blocks of any order up to 64, as an unsigned long's bits allow.
UNVALIDATED_DOMAIN = "unvalidated-domain"

# The next kernel follows every table entry of the handed-over tree: an entry
# outside the old kernel's memory faults; an entry back into the tree is
# walked again one level down, down to reading a table page as a leaf bitmap.
NEXT_KERNEL_TRUSTS_TREE = "next-kernel-trusts-tree"

# 7.3: the next kernel extends scratch only up to the highest preserved
# block's 1 GiB boundary as 64-bit sums see it, and not at all when the
# bookkeeping of one entry per preserved 1 GiB block outgrows early memory.
EXTEND_SCRATCH_PER_GIB = "extend-scratch-per-gib"

# A failed kho_preserve_vmalloc() unpreserves through the descriptor before
# its order is stored: each block of 2^order pages is unpreserved as its
# first page alone, and the blocks stay preserved.
VMALLOC_ROLLBACK_ORDER = "vmalloc-rollback-order"

# kho_preserve_vmalloc() lists a block at physical address 0, which ends the
# chunk's zero-terminated list: the preservation succeeds, and can never be
# restored (the list comes up short of total_pages).
VMALLOC_PHYS_ZERO = "vmalloc-phys-zero"

# kho_restore_vmalloc() trusts the caller's descriptor: it reads a chunk and
# restores the blocks it lists before it finds out (restoring the chunk page
# last) whether the chunk page was preserved at all: a chunk never preserved
# is acted on, one outside the old kernel's memory faults. And it sizes the
# blocks 1 << order in int (x86).
RESTORE_VMALLOC_TRUSTS_DESCRIPTOR = "restore-vmalloc-trusts-descriptor"

ALL = frozenset({
    NUMA_ENDPOINT_CHECK, PRESERVE_PAGES_ROLLBACK, RESTORE_PAGES_NUMA_SPLIT, RESTORE_TRUSTS_PAGE_ORDER,
    RANGE_INT_SHIFT, RESERVE_SIZE_INT_OVERFLOW, UNVALIDATED_DOMAIN, NEXT_KERNEL_TRUSTS_TREE, EXTEND_SCRATCH_PER_GIB,
    VMALLOC_ROLLBACK_ORDER, VMALLOC_PHYS_ZERO, RESTORE_VMALLOC_TRUSTS_DESCRIPTOR,
})


def check(quirks: frozenset[str]) -> frozenset[str]:
    """``quirks``, refusing a name the model does not know."""
    unknown = set(quirks) - ALL
    if unknown:
        raise ValueError(f"unknown quirk(s) {', '.join(sorted(unknown))}; the model knows {', '.join(sorted(ALL))}")
    return frozenset(quirks)
