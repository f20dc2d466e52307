"""The old kernel's physical memory: an arena of pages and its allocator.

Policy shared with the native runtime (program.py): ``arena_pages`` pages at
``ARENA_BASE_PHYS``; page 0 holds the scratch descriptors; single-page
allocations take the lowest free page from page 1 on; the N-th allocation
attempt fails when the header asks for it; allocated pages are zeroed.

Pages are kept sparse so that memory follows the number of keys, not the
arena or the preserved ranges: a page is a dict of its non-zero u64 words
(tree nodes, scratch and metadata pages), or a bytearray for a page whose
bytes are owned elsewhere (the FDT). Like physical memory, a freed page keeps
what was written to it until it is allocated (and zeroed) again: a corrupted
handover can point the next kernel at it.
"""

from __future__ import annotations

import heapq
import struct

from .program import ARENA_BASE_PHYS, U64, Header

Words = dict[int, int]  # word index -> non-zero u64 value


_CHUNK = 256
_ZERO_CHUNK = bytes(_CHUNK)


def words_from_bytes(data: bytes, page_size: int) -> Words:
    """Non-zero little-endian u64 words of the first page_size bytes (zero-padded).
    Tree pages are mostly zero: all-zero chunks are skipped at C speed."""
    data = bytes(data[:page_size]).ljust(page_size, b"\0")
    words: Words = {}
    for off in range(0, page_size, _CHUNK):
        if data[off : off + _CHUNK] != _ZERO_CHUNK:
            for i, v in enumerate(struct.unpack_from(f"<{_CHUNK // 8}Q", data, off)):
                if v:
                    words[(off >> 3) + i] = v
    return words


def words_to_bytes(words: Words, page_size: int) -> bytes:
    page = bytearray(page_size)
    for i, v in words.items():
        struct.pack_into("<Q", page, 8 * i, v)
    return bytes(page)


class Arena:
    def __init__(self, header: Header) -> None:
        self.page_shift = header.page_shift
        self.page_size = 1 << header.page_shift
        self.npages = header.arena_pages
        self.fail_alloc = header.fail_alloc
        self.attempts = 0
        self._fresh = 1  # every page from here on is free
        self._freed: list[int] = []  # heap of free pages below _fresh
        scratch = [v & U64 for area in header.scratch for v in area]  # struct kho_scratch {u64 addr, size;}[]
        # Keyed by phys: the tree looks pages up by the addresses it stores.
        self._words: dict[int, Words] = {ARENA_BASE_PHYS: {i: v for i, v in enumerate(scratch) if v}}
        self._bytes: dict[int, bytearray] = {}
        self._stale: dict[int, Words] = {}  # free pages' content

    @property
    def hwm(self) -> int:
        """One past the highest page ever allocated: the old kernel's memory."""
        return self._fresh

    def phys(self, index: int) -> int:
        return ARENA_BASE_PHYS + (index << self.page_shift)

    def index(self, phys: int) -> int | None:
        """Arena page index of a page-aligned address inside the arena."""
        off = phys - ARENA_BASE_PHYS
        if off < 0 or off & (self.page_size - 1) or off >> self.page_shift >= self.npages:
            return None
        return off >> self.page_shift

    def alloc(self) -> int | None:
        """Phys of a zeroed page, or None (injected failure, arena full)."""
        self.attempts += 1
        if self.attempts == self.fail_alloc:
            return None
        if self._freed:
            index = heapq.heappop(self._freed)
        elif self._fresh < self.npages:
            index = self._fresh
            self._fresh += 1
        else:
            return None
        phys = self.phys(index)
        self._stale.pop(phys, None)
        self._words[phys] = {}
        return phys

    def free(self, phys: int) -> None:
        index = self.index(phys)
        assert index is not None and index > 0, f"free of non-arena page {phys:#x}"
        words = self._words.pop(phys, None)
        if self._bytes.pop(phys, None) is not None or words:
            self._stale[phys] = words or {}
        heapq.heappush(self._freed, index)

    def allocated(self) -> frozenset[int]:
        """Indices of the allocated pages (page 0 excluded)."""
        return frozenset(self.index(p) for p in (*self._words, *self._bytes)) - {0}

    def words(self, phys: int) -> Words | None:
        """The word store of a word-addressable page in use at phys, else None."""
        return self._words.get(phys)

    def set_bytes(self, phys: int, buf: bytearray) -> None:
        """Make the allocated page at phys be ``buf`` (shared, not copied)."""
        del self._words[phys]  # KeyError unless allocated
        self._bytes[phys] = buf

    def set_content(self, phys: int, data: bytes) -> None:
        assert phys in self._words
        self._words[phys] = words_from_bytes(data, self.page_size)

    def poke(self, index: int, slot: int, value: int) -> None:
        """Write a u64 at word ``slot`` of page ``index``, in use or free.
        Out of the arena or past the page: no effect."""
        if index >= self.npages or slot >= self.page_size // 8:
            return
        value &= U64
        phys = self.phys(index)
        if phys in self._bytes:
            struct.pack_into("<Q", self._bytes[phys], 8 * slot, value)
            return
        page = self._words.get(phys)
        if page is None:
            page = self._stale.setdefault(phys, {})
        if value:
            page[slot] = value
        else:
            page.pop(slot, None)

    def content(self) -> dict[int, Words]:
        """Every page of the arena with non-zero content, as words: in use,
        free (stale), or owned elsewhere (the FDT)."""
        out = {p: w for p, w in (*self._stale.items(), *self._words.items()) if w}
        out.update((p, words_from_bytes(b, self.page_size)) for p, b in self._bytes.items())
        return out

    def page_bytes(self, phys: int) -> bytes:
        if phys in self._bytes:
            return bytes(self._bytes[phys][: self.page_size]).ljust(self.page_size, b"\0")
        return words_to_bytes(self._words.get(phys, {}), self.page_size)
