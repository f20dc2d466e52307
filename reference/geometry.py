"""Shape of the KHO radix tree for one page size.

Derived from the ABI documentation of ``include/linux/kho/abi/kexec_handover.h``
("KHO persistent memory tracker"): every node is one page; a table node holds
``PAGE_SIZE / 8`` physical addresses, a leaf is a bitmap of ``PAGE_SIZE * 8``
bits, and a key needs ``64 - PAGE_SHIFT`` bits of pfn plus one order bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

# The page sizes the model covers (4, 16 and 64 KiB: every Linux architecture's).
PAGE_SHIFTS = (12, 14, 16)
# The page allocator's largest block order (MAX_PAGE_ORDER) on the machine
# the native runtime stands for, at every page size.
MAX_PAGE_ORDER = 10


@dataclass(frozen=True)
class Geometry:
    page_shift: int

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def table_log2(self) -> int:
        """log2 of the slots in a table node (8-byte physical addresses)."""
        return self.page_shift - 3

    @property
    def bitmap_log2(self) -> int:
        """log2 of the bits in a leaf bitmap."""
        return self.page_shift + 3

    @property
    def key_width(self) -> int:
        """Bits of a key: the order-0 pfn plus the order bit above it."""
        return 64 - self.page_shift + 1

    @property
    def depth(self) -> int:
        """Levels: the tables needed above the leaf to cover the key, plus the leaf."""
        above_leaf = self.key_width - self.bitmap_log2
        return -(-above_leaf // self.table_log2) + 1

    @property
    def root_level(self) -> int:
        return self.depth - 1

    @property
    def max_order(self) -> int:
        """Largest order a (pfn, order) key may carry: the order bit stays at bit >= 1."""
        return 63 - self.page_shift

    @property
    def huge_vmap_order(self) -> int:
        """Largest page order of a vmalloc mapping: a PMD, which maps a
        table of PAGE_SIZE / 8 pages."""
        return self.page_shift - 3

    def shift(self, level: int) -> int:
        """Lowest key bit indexed by a table at ``level`` (>= 1)."""
        return (level - 1) * self.table_log2 + self.bitmap_log2

    def table_index(self, key: int, level: int) -> int:
        return (key >> self.shift(level)) & ((1 << self.table_log2) - 1)

    def leaf_bit(self, key: int) -> int:
        return key & ((1 << self.bitmap_log2) - 1)

    def path(self, key: int) -> tuple[int, ...]:
        """Table indices from the root down to level 1."""
        return tuple(self.table_index(key, lv) for lv in range(self.root_level, 0, -1))


@cache
def geometry(page_shift: int) -> Geometry:
    return Geometry(page_shift)
