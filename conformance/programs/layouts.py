"""The machine layout programs share: RAM, NUMA nodes, a scratch area and
the allocation arena, the same (in pfns) at every page shift.

RAM is [0, 2^20) pfns, NUMA node 1 starts at ``NUMA_SPLIT``, one scratch area
sits at 256 MiB; the arena is at ``ARENA_BASE_PHYS`` (1 GiB). Preserved memory
chosen by the scenarios and the state machine never overlaps the arena nor
the scratch area unless a program says so.
"""

from __future__ import annotations

from dataclasses import replace

from reference.model import METADATA_NAME
from reference.program import ARENA_BASE_PHYS, Header

RAM_PFNS = 1 << 20
NUMA_SPLIT = 0x80000
SCRATCH = (0x1000_0000, 0x100_0000)  # (phys, size)
ARENA_PAGES = 256
BOOT_SUBTREE = METADATA_NAME  # the subtree every KHO boot adds


def standard_header(page_shift: int, **changes) -> Header:
    """The shared layout at ``page_shift``, with ``changes`` to its fields."""
    h = Header(page_shift=page_shift, ram=((0, RAM_PFNS),), numa=((0, 0), (NUMA_SPLIT, 1)),
               scratch=(SCRATCH,), arena_pages=ARENA_PAGES)
    return replace(h, **changes) if changes else h


def busy_pfns(header: Header) -> list[tuple[int, int]]:
    """[start, end) pfn spans that preservations should avoid: the arena and
    the scratch areas."""
    P = header.page_shift
    arena = header.arena_range()
    return [arena, *(((phys >> P), (phys + size) >> P) for phys, size in header.scratch)]


def arena_index(phys: int, page_shift: int) -> int:
    """The arena page holding ``phys``."""
    return (phys - ARENA_BASE_PHYS) >> page_shift
