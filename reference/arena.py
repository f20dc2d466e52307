"""The old kernel's physical memory: an arena of pages and its allocator.

Policy shared with the native runtime (program.py): ``arena_pages`` pages at
``ARENA_BASE_PHYS``; page 0 is the handover page; single-page allocations
take the lowest free page from page 1 on, blocks of 2^k pages the lowest
free naturally aligned block; the N-th allocation attempt (of any size)
fails when the header asks for it; allocated pages are zeroed.

Pages are kept sparse so that memory follows the number of keys, not the
arena or the preserved ranges: a page is a dict of its non-zero u64 words
(tree nodes, scratch and metadata pages), or a bytearray for a page whose
bytes are owned elsewhere (the FDT). Like physical memory, a freed page keeps
what was written to it until it is allocated (and zeroed) again: a corrupted
handover can point the next kernel at it.
"""

from __future__ import annotations

import struct

from .program import ARENA_BASE_PHYS, U64, Header

Words = dict[int, int]  # word index -> non-zero u64 value


_CHUNK = 256
_ZERO_CHUNK = bytes(_CHUNK)


def words_from_bytes(data: bytes | bytearray | memoryview, page_size: int) -> Words:
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


def set_word(words: Words, index: int, value: int) -> None:
    """Store a u64 in a sparse page (zero words are absent)."""
    if value:
        words[index] = value
    else:
        words.pop(index, None)


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
        self._used = bytearray(self.npages)  # 1: allocated (page 0: the handover page)
        self._used[0] = 1
        self._hint = 1  # every page below it is in use
        self._hwm = 1
        scratch = [v & U64 for area in header.scratch for v in area]  # struct kho_scratch {u64 addr, size;}[]
        # Keyed by phys: the tree looks pages up by the addresses it stores.
        self._words: dict[int, Words] = {ARENA_BASE_PHYS: {i: v for i, v in enumerate(scratch) if v}}
        self._bytes: dict[int, bytearray] = {}
        self._stale: dict[int, Words] = {}  # free pages' content

    @property
    def hwm(self) -> int:
        """One past the highest page ever allocated or written (poked): the
        old kernel's memory, which the next kernel does not reuse."""
        return self._hwm

    def phys(self, index: int) -> int:
        return ARENA_BASE_PHYS + (index << self.page_shift)

    def index(self, phys: int) -> int | None:
        """Arena page index of a page-aligned address inside the arena."""
        off = phys - ARENA_BASE_PHYS
        if off < 0 or off & (self.page_size - 1) or off >> self.page_shift >= self.npages:
            return None
        return off >> self.page_shift

    def alloc(self, order: int = 0) -> int | None:
        """Phys of 2^order zeroed pages, or None (injected failure, no free block)."""
        self.attempts += 1
        if self.attempts == self.fail_alloc:
            return None
        n = 1 << order
        if order:
            start = next((i for i in range(n, self.npages - n + 1, n) if self._used.find(1, i, i + n) < 0), None)
        else:
            start = self._used.find(0, self._hint)
            start = None if start < 0 else start
            self._hint = start + 1 if start is not None else self.npages
        if start is None:
            return None
        self._used[start : start + n] = b"\1" * n
        self._hwm = max(self._hwm, start + n)
        for i in range(start, start + n):
            phys = self.phys(i)
            self._stale.pop(phys, None)
            self._words[phys] = {}
        return self.phys(start)

    def free(self, phys: int, order: int = 0) -> None:
        index = self.index(phys)
        assert index is not None and index > 0, f"free of non-arena page {phys:#x}"
        n = min(1 << order, self.npages - index)
        for i in range(index, index + n):
            p = self.phys(i)
            words = self._words.pop(p, None)
            if self._bytes.pop(p, None) is not None or words:
                self._stale[p] = words or {}
        self._used[index : index + n] = bytes(n)
        self._hint = min(self._hint, index)

    def allocated(self) -> frozenset[int]:
        """Indices of the allocated pages (page 0 excluded)."""
        return frozenset(i for i in map(self.index, (*self._words, *self._bytes)) if i)

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

    def poke(self, index: int, word: int, value: int) -> None:
        """Write a u64 at ``word`` of page ``index``, in use or free. Out of
        the arena or past the page: no effect."""
        if index >= self.npages or word >= self.page_size // 8:
            return
        self._hwm = max(self._hwm, index + 1)
        value &= U64
        phys = self.phys(index)
        if phys in self._bytes:
            struct.pack_into("<Q", self._bytes[phys], 8 * word, value)
            return
        page = self._words.get(phys)
        if page is None:
            page = self._stale.setdefault(phys, {})
        set_word(page, word, value)

    def content(self) -> dict[int, Words]:
        """Every page of the arena with non-zero content, as words: in use,
        free (stale), or owned elsewhere (the FDT)."""
        out = {p: w for p, w in (*self._stale.items(), *self._words.items()) if w}
        out.update((p, words_from_bytes(b, self.page_size)) for p, b in self._bytes.items())
        return out

    def read(self, phys: int) -> Words | None:
        """Whatever a page-aligned arena page holds, as words (in use, free,
        owned elsewhere), as the old kernel's memory reads at kexec: zero up
        to the highest page written, absent past it and outside the arena."""
        index = self.index(phys)
        if index is None or index >= self._hwm:
            return None
        if phys in self._bytes:
            return words_from_bytes(self._bytes[phys], self.page_size)
        return self._words.get(phys) or self._stale.get(phys) or {}

    def page_bytes(self, phys: int) -> bytes:
        if phys in self._bytes:
            return bytes(self._bytes[phys][: self.page_size]).ljust(self.page_size, b"\0")
        return words_to_bytes(self._words.get(phys, {}), self.page_size)
