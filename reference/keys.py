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
    max_order = geometry(header.page_shift).max_order
    end = pfn + nr_pages
    while pfn < end:
        align = (pfn & -pfn).bit_length() - 1 if pfn else max_order
        order = min(align, (end - pfn).bit_length() - 1, max_order)
        order = _fit_numa(header, pfn, order)
        yield pfn, order
        pfn += 1 << order


def _fit_numa(header: Header, pfn: int, order: int) -> int:
    nid = header.nid_of(pfn)
    while order and any(
        pfn < start < pfn + (1 << order) and header.nid_of(start) != nid for start, _ in header.numa
    ):
        order -= 1
    return order
