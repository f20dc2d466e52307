"""Scratch areas the next kernel may use: the areas the old kernel handed
over, and (key-API kernels, 7.3) the 1 GiB blocks free of preserved memory
("extend scratch").

The specification: the scratch extension is every gap between the 1 GiB
blocks that preserved blocks or tree node pages touch, then the rest up to
the end of DRAM; it is computed on merged block ranges, so a huge
preservation costs no more than a small one.

Quirk extend-scratch-per-gib: the 7.3 kernel finds those blocks by inserting
one key per 1 GiB block of every preserved block (and one per tree node) into
a second radix tree whose nodes come from early memory, in walk order. When
that tree needs more pages than early memory has left, the extension fails
as a whole and no block is marked. A block's end is a 64-bit sum, so a block
reaching the top of the address space counts as no block at all, and the
last block's end, wrapped to 0, makes the final mark start at 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .geometry import geometry
from .keys import kernel_decode, x86_shl64
from .program import U64

GIB_SHIFT = 30
GIB = 1 << GIB_SHIFT


def free_gib_blocks(busy: Iterable[tuple[int, int]], end_of_dram: int) -> list[tuple[int, int]]:
    """The specification: the gaps between the 1 GiB blocks touched by busy
    (phys, size) ranges, then the rest up to the end of DRAM."""
    spans = sorted((p >> GIB_SHIFT, (p + size - 1) >> GIB_SHIFT) for p, size in busy)
    marks = []
    prev_end = 0
    for first, last in spans:
        start = first << GIB_SHIFT
        if start > prev_end:
            marks.append((prev_end, start - prev_end))
        prev_end = max(prev_end, (last + 1) << GIB_SHIFT)
    if prev_end < end_of_dram:
        marks.append((prev_end, end_of_dram - prev_end))
    return marks


@dataclass
class Extension:
    marks: list[tuple[int, int]]  # empty when the extension failed
    failed: bool  # early memory ran out ("Failed to extend scratch: -ENOMEM")
    work: int  # block keys inserted (the kernel's loop iterations)


class _Intervals:
    """Disjoint integer intervals [a, b]; adding one says how much is new."""

    def __init__(self) -> None:
        self.spans: list[list[int]] = []

    def add(self, a: int, b: int) -> int:
        new = b - a + 1
        merged = [a, b]
        keep = []
        for s in self.spans:
            if s[1] < a - 1 or s[0] > b + 1:
                keep.append(s)
                continue
            new -= max(0, min(b, s[1]) - max(a, s[0]) + 1)
            merged = [min(merged[0], s[0]), max(merged[1], s[1])]
        self.spans = sorted([*keep, merged])
        return new


def _block_keys(key: int, page_shift: int) -> list[tuple[int, int]]:
    """The busy-block keys one preserved block inserts, as ranges, in order:
    one per 1 GiB step of a 64-bit start from the block's address while it
    is below the block's 64-bit end. A start that wraps past the top of
    memory goes on from the bottom, up to the end."""
    phys, order = kernel_decode(key, page_shift)
    end = (phys + x86_shl64(1, order + page_shift)) & U64
    if phys >= end:
        return []
    count = -(-(end - phys) // GIB)
    if phys + count * GIB <= U64:  # a last step landing on 2^64 wraps to 0, below the end
        return [(phys >> GIB_SHIFT, (phys >> GIB_SHIFT) + count - 1)]
    before = (U64 + 1 - phys + GIB - 1) // GIB  # starts below 2^64
    wrapped = phys + before * GIB - (U64 + 1)
    after = -(-(end - wrapped) // GIB)
    return [(phys >> GIB_SHIFT, (phys >> GIB_SHIFT) + before - 1), (wrapped >> GIB_SHIFT, (wrapped >> GIB_SHIFT) + after - 1)]


def kernel_extend_scratch(walk: Iterable[tuple[bool, int]], page_shift: int, free_pages: int,
                          end_of_dram: int) -> Extension:
    """Quirk extend-scratch-per-gib, from the next kernel's walk of the
    preserved-memory tree ((True, node phys) and (False, key) in walk order)
    and the early-memory pages left for the busy-block tree."""
    geo = geometry(page_shift)
    shifts = [geo.shift(level + 1) for level in range(geo.root_level)]  # a level-l node's prefix: key >> shifts[l]
    present = [_Intervals() for _ in shifts]
    busy = _Intervals()
    allocated, work = 1, 0  # the busy tree's root
    if allocated > free_pages:
        return Extension([], True, 0)
    for is_node, value in walk:
        for first, last in [(value >> GIB_SHIFT,) * 2] if is_node else _block_keys(value, page_shift):
            new = sum(p.add(first >> s, last >> s) for p, s in zip(present, shifts))
            if allocated + new > free_pages:
                # the insertion that finds no page fails: roughly as far into this range as pages last
                work += (last - first + 1) * (free_pages - allocated) // max(new, 1)
                return Extension([], True, work)
            allocated += new
            work += last - first + 1
            busy.add(first, last)
    marks, prev_end = [], 0
    for first, last in busy.spans:
        start = first << GIB_SHIFT
        if start > prev_end:
            marks.append((prev_end, start - prev_end))
        prev_end = ((last + 1) << GIB_SHIFT) & U64
    if prev_end < end_of_dram:
        marks.append((prev_end, end_of_dram - prev_end))
    return Extension(marks, False, work)
