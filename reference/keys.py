"""Key encoding of the KHO preserved-memory map and the split of page ranges
into naturally aligned blocks.

From the ABI documentation: a key is the 'order bit' at position
``64 - PAGE_SHIFT - order`` OR-ed with the 'shifted physical address'
``pa >> (PAGE_SHIFT + order)``; so the order is recovered from the position of
the highest set bit, and the address from the bits below it.
"""

from __future__ import annotations

from collections.abc import Iterator

from .geometry import geometry
from .program import U64, Header


def encode(phys: int, order: int, page_shift: int) -> int:
    return (1 << (64 - page_shift - order)) | (phys >> (page_shift + order))


def decode(key: int, page_shift: int) -> tuple[int, int]:
    """(phys, order) of a key. Total on keys up to the key width: key 0 (no
    order bit) decodes to order 65 - PAGE_SHIFT at phys 0, key 1 to order
    64 - PAGE_SHIFT at phys 0; callers reject wider keys."""
    order = 64 - page_shift - (key.bit_length() - 1)
    return (key << (page_shift + order)) & U64, order


def in_domain(pfn: int, order: int, page_shift: int) -> bool:
    """Whether (pfn, order) has a key that decodes back to itself: the order
    bit stays at bit >= 1, the pfn fits below it and is aligned to the order."""
    return (
        0 <= order <= geometry(page_shift).max_order
        and 0 <= pfn < (1 << (64 - page_shift))
        and pfn & ((1 << order) - 1) == 0
    )


def pfn_key(pfn: int, order: int, page_shift: int) -> int:
    return encode(pfn << page_shift, order, page_shift)


def range_in_domain(pfn: int, nr_pages: int, page_shift: int) -> bool:
    """Model policy for preserve/unpreserve_pages: the range must end at or
    below the last pfn a key can hold (the kernel does not check)."""
    return pfn + nr_pages <= (1 << (64 - page_shift))


def page_chunks(pfn: int, nr_pages: int, header: Header) -> Iterator[tuple[int, int]]:
    """The (pfn, order) blocks that cover [pfn, pfn + nr_pages): at each step
    the largest block that is aligned, fits in what remains, and lies in one
    NUMA node.

    Model policies: every NUMA boundary inside a block is checked (the kernel
    compares only the nodes of the two ends), and the order stays within the
    key domain (only preserve_pages(0, 2^(64-PAGE_SHIFT)) is affected: the
    kernel would emit key 1, a block of 2^64 bytes).
    """
    return range_blocks(pfn, pfn + nr_pages, header)


# How a range walk keeps a block on one NUMA node.
NUMA_INSIDE = "inside"  # no node boundary inside the block (the specification)
NUMA_ENDPOINTS = "endpoints"  # its first and last page on one node (quirk numa-endpoint-check)
NUMA_NONE = "none"  # nodes not looked at (quirk restore-pages-numa-split)

RUNAWAY_BLOCKS = 1 << 20  # a range walk longer than this never ends as far as anyone can wait


class RunawayLoop(Exception):
    """A kernel loop the model predicts never ends (or not within any budget)."""


def x86_int_shift(count: int) -> int:
    """``1 << count`` in C int on x86-64, as a value added to an unsigned
    long: the count taken modulo 32, bit 31 the sign (quirk range-int-shift)."""
    count &= 31
    return -(1 << 31) if count == 31 else 1 << count


def x86_shl64(value: int, count: int) -> int:
    """``value << count`` on a 64-bit operand: the count taken modulo 64."""
    return (value << (count & 63)) & U64


def kernel_key(pfn: int, order: int, page_shift: int) -> int:
    """The key the kernel computes for any pfn and (unsigned int) order,
    validated or not (quirk unvalidated-domain): the physical address
    truncated to 64 bits, both shift counts taken modulo 64."""
    order &= 0xFFFF_FFFF
    phys = (pfn << page_shift) & U64
    return x86_shl64(1, 64 - page_shift - order) | (phys >> ((page_shift + order) & 63))


def kernel_decode(key: int, page_shift: int) -> tuple[int, int]:
    """(phys, order) as the next kernel decodes any key: the order from the
    highest set bit (fls64; key 0 gives 65 - PAGE_SHIFT), the address by a
    shift whose count is taken modulo 64. Equals ``decode`` on valid keys."""
    order = (64 - page_shift - key.bit_length() + 1) & 0xFFFF_FFFF
    return x86_shl64(key, page_shift + order), order


def range_blocks(start: int, end: int, header: Header, numa: str = NUMA_INSIDE, *, kernel: bool = False,
                 int_shift: bool = False) -> Iterator[tuple[int, int]]:
    """The (pfn, order) blocks a range walk over [start, end) visits: at
    each step the largest block aligned at the current pfn and fitting in
    what remains, lowered per ``numa``.

    ``kernel``: the kernel's own bounds (orders up to 64, the pfn an unsigned
    long that wraps) instead of the key domain. ``int_shift``: the walk
    advances by ``x86_int_shift(order)`` (quirk range-int-shift); a walk that
    comes back to a pfn it visited, or outlives RUNAWAY_BLOCKS, raises
    RunawayLoop.
    """
    max_order = 64 if kernel else geometry(header.page_shift).max_order
    pfn = start
    seen: set[int] = set()
    while pfn < end:
        align = (pfn & -pfn).bit_length() - 1 if pfn else max_order
        order = min(align, (end - pfn).bit_length() - 1, max_order)
        if numa == NUMA_INSIDE:
            order = _fit_numa(header, pfn, order)
        elif numa == NUMA_ENDPOINTS:
            while order and header.nid_of(pfn) != header.nid_of(pfn + (1 << order) - 1):
                order -= 1
        yield pfn, order
        if not (kernel or int_shift):
            pfn += 1 << order
            continue
        seen.add(pfn)
        pfn = (pfn + (x86_int_shift(order) if int_shift else 1 << order)) & U64
        if pfn in seen or len(seen) > RUNAWAY_BLOCKS:
            raise RunawayLoop(f"the range walk from {start:#x} never reaches {end:#x}")
def one_block(pfn: int, nr_pages: int, header: Header, numa: str = NUMA_INSIDE, *, kernel: bool = False,
              int_shift: bool = False) -> int | None:
    """The order of the block when the range walk of [pfn, pfn + nr_pages)
    (``range_blocks``, the same flags; in the key domain unless ``kernel``)
    visits exactly one block, the whole range; None when it would visit
    another number of blocks or refuse the range (then walk it)."""
    if nr_pages == 1:  # the common case (a vmalloc area's pages), answered first
        if kernel:
            return 0 if pfn < U64 else None
        return 0 if pfn < 1 << (64 - header.page_shift) else None
    if nr_pages <= 0 or nr_pages & (nr_pages - 1) or pfn & (nr_pages - 1):
        return None
    order = nr_pages.bit_length() - 1
    if kernel:
        if (pfn + nr_pages) & U64 <= pfn or order > 64:  # a range that wraps is empty
            return None
    elif order > geometry(header.page_shift).max_order or not range_in_domain(pfn, nr_pages, header.page_shift):
        return None
    if int_shift and order >= 31:  # the walk would not step by the block's size
        return None
    if order and numa == NUMA_INSIDE and _fit_numa(header, pfn, order) != order:
        return None
    if order and numa == NUMA_ENDPOINTS and header.nid_of(pfn) != header.nid_of(pfn + nr_pages - 1):
        return None
    return order


def _fit_numa(header: Header, pfn: int, order: int) -> int:
    nid = header.nid_of(pfn)
    while order and any(
        pfn < start < pfn + (1 << order) and header.nid_of(start) != nid for start, _ in header.numa
    ):
        order -= 1
    return order
