"""Fuzzer bytes -> op program: total, deterministic, structure-aware.

Any byte string decodes to a valid ``Program`` (its header validates and its
text form round-trips). Bytes are read front to back; an exhausted input reads
as zeros, and every choice puts its most common option at index 0, so short
inputs give small ordinary programs and each extra byte refines one choice.

Values are drawn where the two implementations are most likely to disagree:
pfn 0 and huge pfns, NUMA boundaries, the arena, the key-width edge, orders up
to and past ``64 - PAGE_SHIFT``, ranges up to 2^40 pages, duplicate subtree
names, allocation sizes at the page-order edges, vmalloc areas of one and of
many chunks, scratch-area edges, pokes into the caller's descriptors, and
restores aimed at what the program preserved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reference.geometry import MAX_PAGE_ORDER, geometry
from reference.program import (
    ALLOC_SLOTS_OFFSET,
    AREA_ALLOC,
    AREA_FLAGS,
    AREA_HUGE,
    ARENA_BASE_PHYS,
    MAX_NAME,
    MAX_NUMA_RANGES,
    MAX_RAM_PFN,
    MAX_RAM_RANGES,
    MAX_SCRATCH,
    MAX_VMALLOC_PAGES,
    SLOTS,
    U64,
    VMALLOC_DESCRIPTOR_BYTES,
    VMALLOC_SLOTS_OFFSET,
    Header,
    Op,
    Program,
    Step,
    filler_blob,
    filler_name,
)

MAX_OLD_OPS = 32
MAX_NEW_OPS = 10
NAME_ALPHABET = "ab@"  # few letters: collisions (duplicate subtrees) are common
LONG_NAME_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789@,._-+/ "
RECENT = 8  # preserved things remembered for unpreserve/restore


class _Reader:
    """Bytes as a stream of bounded choices; zeros once exhausted."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def uint(self, nbytes: int) -> int:
        """``nbytes`` bytes, little-endian (the missing high ones zeros)."""
        chunk = self.data[self.pos : self.pos + nbytes]
        self.pos += len(chunk)
        return int.from_bytes(chunk, "little")

    def below(self, n: int) -> int:
        """Uniform-ish in [0, n); as few bytes as n needs."""
        if n <= 1:
            return 0
        return self.uint((n.bit_length() + 7) // 8) % n

    def pick(self, weights: tuple[int, ...]) -> int:
        """Index chosen by one byte with the given weights (out of their sum)."""
        x = self.byte() * sum(weights) >> 8
        for i, w in enumerate(weights):
            if x < w:
                return i
            x -= w
        return len(weights) - 1

    def chance(self, percent: int) -> bool:
        """True with about ``percent``% probability; False on exhausted input."""
        return self.byte() * 100 >> 8 >= 100 - percent

    def small(self, limit: int = 64) -> int:
        """Biased toward small values in [0, limit)."""
        return self.below(min(limit, 1 << self.below(8))) if limit > 1 else 0


# ---- header ---------------------------------------------------------------------


def _header(r: _Reader, page_shift: int) -> Header:
    arena_pages = (16, 32, 64, 128, 256, 1024)[r.pick((40, 20, 10, 10, 15, 5))]
    arena_pages += r.small(16) if r.chance(20) else 0
    ram = _ram(r)
    numa = _numa(r, ram, page_shift)
    scratch = _scratch(r, ram, page_shift)
    fail_alloc = 1 + r.below(40) if r.chance(15) else 0
    return Header(page_shift, ram, numa, scratch, fail_alloc, arena_pages)


def _ram(r: _Reader) -> tuple[tuple[int, int], ...]:
    kind = r.pick((150, 60, 46))
    if kind == 0:
        return ((0, 1 << 20),)  # the default: 4 GiB at 4 KiB pages
    if kind == 1:
        return ((0, 1 << r.below(29)),)
    ranges, cursor = [], 0
    for _ in range(1 + r.below(MAX_RAM_RANGES)):
        cursor = min(cursor + _span(r), MAX_RAM_PFN)  # hole before this range
        end = min(cursor + max(_span(r), 1), MAX_RAM_PFN)
        ranges.append((cursor, end))
        cursor = end
    return tuple(ranges)


def _span(r: _Reader) -> int:
    """A length in pages: mostly small, sometimes large, aligned or not."""
    kind = r.pick((100, 80, 76))
    if kind == 0:
        return r.small(1 << 12)
    if kind == 1:
        return 1 << r.below(28)
    return r.uint(4) % MAX_RAM_PFN


def _numa(r: _Reader, ram: tuple[tuple[int, int], ...], page_shift: int) -> tuple[tuple[int, int], ...]:
    if r.pick((140, 116)) == 0:
        return ((0, 0),)
    arena = ARENA_BASE_PHYS >> page_shift
    starts = []
    for _ in range(1 + r.below(MAX_NUMA_RANGES)):
        kind = r.pick((60, 60, 40, 40, 56))
        if kind == 0:  # anywhere in RAM, often aligned
            s, e = ram[r.below(len(ram))]
            pfn = s + r.below(max(e - s, 1))
            starts.append(pfn & ~((1 << r.below(20)) - 1))
        elif kind == 1:  # a power of two, +- a little
            starts.append(max(0, (1 << r.below(28)) + r.below(9) - 4))
        elif kind == 2:  # next to or inside the arena
            starts.append(arena + r.below(64) - 8)
        elif kind == 3:
            starts.append(0)
        else:
            starts.append(r.uint(4) % MAX_RAM_PFN)
    # Node ids in any order: the kernel only compares ids for equality.
    return tuple((s, r.below(4) if r.chance(80) else r.byte()) for s in sorted(starts))


def _scratch(r: _Reader, ram: tuple[tuple[int, int], ...], page_shift: int) -> tuple[tuple[int, int], ...]:
    out = []
    for _ in range(r.pick((140, 50, 30, 20, 16))):
        s, e = ram[r.below(len(ram))]
        pfn = s + r.below(max(e - s, 1))
        size = (1 + r.small(1 << 10)) << page_shift
        out.append(((pfn << page_shift) + (r.below(4096) if r.chance(5) else 0), size))
    return tuple(out[:MAX_SCRATCH])


# ---- ops --------------------------------------------------------------------------


@dataclass
class _State:
    """What earlier ops touched, so later ops can hit it again."""

    header: Header
    folios: list[tuple[int, int]] = field(default_factory=list)  # (pfn, order)
    ranges: list[tuple[int, int]] = field(default_factory=list)  # (pfn, nr_pages)
    names: list[str] = field(default_factory=list)
    subtrees: list[int] = field(default_factory=list)  # phys
    alloc_slots: list[int] = field(default_factory=list)
    vmalloc_slots: list[int] = field(default_factory=list)

    def remember(self, table: list, item) -> None:
        table.append(item)
        del table[:-RECENT]


def _pfn(r: _Reader, st: _State) -> int:
    return _any_pfn(r, st) & U64


def _any_pfn(r: _Reader, st: _State) -> int:
    h = st.header
    P = h.page_shift
    kind = r.pick((36, 20, 40, 30, 30, 20, 20, 20, 20, 10, 10))
    if (kind == 5 and not st.folios) or (kind == 6 and not st.ranges):
        kind = 0
    if kind == 0:  # somewhere in RAM
        s, e = h.ram[r.below(len(h.ram))]
        return s + r.below(max(e - s, 1))
    if kind == 1:
        return 0
    if kind == 2:
        return 1 + r.small(256)
    if kind == 3:  # at a NUMA boundary
        start, _ = h.numa[r.below(len(h.numa))]
        return max(0, start + r.below(33) - 16)
    if kind == 4:  # in or next to the arena
        return max(0, (ARENA_BASE_PHYS >> P) + r.below(h.arena_pages + 16) - 4)
    if kind == 5:
        pfn, order = st.folios[-1 - r.below(len(st.folios))]
        return pfn + (r.below(1 << min(order, 20)) if r.chance(25) else 0)
    if kind == 6:
        pfn, nr = st.ranges[-1 - r.below(len(st.ranges))]
        return pfn + (r.below(min(nr, 1 << 20)) if r.chance(30) else 0)
    if kind == 7:  # a power of two, +- a little: tree boundaries
        return max(0, (1 << r.below(64)) + r.below(9) - 4)
    if kind == 8:  # the top of the key domain (64 - PAGE_SHIFT bits of pfn)
        return (1 << (64 - P)) - 1 - r.small(64)
    if kind == 9:
        return U64 - r.small(16)
    return r.uint(8)


def _order(r: _Reader, page_shift: int) -> int:
    kind = r.pick((180, 40, 20, 16))
    if kind == 0:
        return r.below(MAX_PAGE_ORDER + 1)
    if kind == 1:
        return r.below(64 - page_shift)  # the valid key range
    if kind == 2:  # at and just past the key width
        return 62 - page_shift + r.below(6)
    return r.byte() if r.chance(70) else r.uint(8)


def _nr_pages(r: _Reader) -> int:
    # Huge ranges are rare: the kernel walks them block by block, which costs
    # far more per run than the ordinary sizes.
    kind = r.pick((200, 36, 12, 3, 4, 1))
    if kind == 0:
        return 1 + r.small(64)
    if kind == 1:
        return 1 + r.below(1 << 16)
    if kind == 2:
        return 1 << r.below(33)
    if kind == 3:
        return (1 << 40) - r.small(64) if r.chance(50) else r.uint(5) + 1
    if kind == 4:
        return 0
    return r.uint(8)


def _aligned(pfn: int, order: int) -> int:
    return pfn & ~((1 << min(order, 64)) - 1) & U64


def _name(r: _Reader, st: _State) -> str:
    kind = r.pick((90, 100, 40, 16, 10))
    if kind == 0 and st.names:
        return st.names[-1 - r.below(len(st.names))]
    if kind <= 1:
        return "".join(NAME_ALPHABET[r.below(len(NAME_ALPHABET))] for _ in range(1 + r.below(3)))
    if kind == 2:
        n = 1 + r.below(MAX_NAME)
        return "".join(LONG_NAME_ALPHABET[r.below(len(LONG_NAME_ALPHABET))] for _ in range(n))
    if kind == 3:  # printable ASCII; the text form quotes what it must
        return "".join(chr(0x20 + r.below(95)) for _ in range(1 + r.below(8)))
    return "" if r.chance(50) else "a" * MAX_NAME


def _phys_of(pfn: int, page_shift: int, r: _Reader) -> int:
    return ((pfn << page_shift) | (r.below(1 << page_shift) if r.chance(5) else 0)) & U64


def _blob_phys(r: _Reader, st: _State) -> int:
    P = st.header.page_shift
    kind = r.pick((120, 80, 56))
    if kind == 0:
        return ARENA_BASE_PHYS + (r.below(st.header.arena_pages) << P)
    if kind == 1 and st.subtrees:
        return st.subtrees[-1 - r.below(len(st.subtrees))]
    return _phys_of(_pfn(r, st), P, r)


_OLD_KINDS = (
    Op.PRESERVE_FOLIO, Op.PRESERVE_PAGES, Op.UNPRESERVE_FOLIO, Op.UNPRESERVE_PAGES, Op.RADIX_ADD,
    Op.RADIX_DEL, Op.ADD_SUBTREE, Op.REMOVE_SUBTREE, Op.RADIX_ADD_KEY, Op.RADIX_DEL_KEY,
    Op.POKE_ARENA, Op.POKE_FDT, Op.RESTORE_FOLIO, Op.KEXEC, Op.FILL_FDT,
    Op.ALLOC_PRESERVE, Op.UNPRESERVE_FREE, Op.PRESERVE_VMALLOC, Op.UNPRESERVE_VMALLOC, Op.SCRATCH_OVERLAP,
    Op.IS_KHO_ENABLED, Op.IS_KHO_BOOT,
)
_OLD_WEIGHTS = (60, 50, 22, 20, 16, 12, 26, 10, 10, 6, 3, 3, 5, 5, 6, 14, 6, 14, 5, 4, 1, 1)
_NEW_KINDS = (Op.RESTORE_FOLIO, Op.RESTORE_PAGES, Op.RETRIEVE_SUBTREE, Op.PRESERVE_FOLIO, Op.KEXEC,
              Op.RESTORE_FREE, Op.RESTORE_VMALLOC, Op.SCRATCH_OVERLAP, Op.IS_KHO_BOOT, Op.IS_KHO_ENABLED)
_NEW_WEIGHTS = (100, 80, 60, 10, 6, 30, 40, 8, 2, 2)


def _old_step(r: _Reader, st: _State, kind: Op) -> Step:
    P = st.header.page_shift
    if kind in (Op.PRESERVE_FOLIO, Op.UNPRESERVE_FOLIO, Op.RADIX_ADD, Op.RADIX_DEL):
        if kind in (Op.UNPRESERVE_FOLIO, Op.RADIX_DEL) and st.folios and r.chance(70):
            pfn, order = st.folios[-1 - r.below(len(st.folios))]
            return Step(kind, pfn, order)
        order = _order(r, P)
        pfn = _pfn(r, st)
        pfn = pfn if r.chance(20) else _aligned(pfn, order)  # misaligned folios: rare
        if kind in (Op.PRESERVE_FOLIO, Op.RADIX_ADD):
            st.remember(st.folios, (pfn, order))
        return Step(kind, pfn, order)
    if kind in (Op.PRESERVE_PAGES, Op.UNPRESERVE_PAGES):
        if kind == Op.UNPRESERVE_PAGES and st.ranges and r.chance(70):
            pfn, nr = st.ranges[-1 - r.below(len(st.ranges))]
            return Step(kind, pfn, nr)
        pfn, nr = _pfn(r, st), _nr_pages(r)
        if kind == Op.PRESERVE_PAGES:
            st.remember(st.ranges, (pfn, nr))
        return Step(kind, pfn, nr)
    if kind in (Op.RADIX_ADD_KEY, Op.RADIX_DEL_KEY):
        order = _order(r, P)
        key = (1 << min(64 - P - order, 64) if order <= 64 - P else 0) | (_pfn(r, st) >> min(order, 64))
        return Step(kind, (key if r.chance(80) else r.uint(8)) & U64)
    if kind == Op.ADD_SUBTREE:
        name = _name(r, st)
        phys = _blob_phys(r, st)
        size = (1, 8, 64, 1 << P, 0)[r.pick((60, 40, 60, 40, 56))] if r.chance(85) else r.uint(8)
        if name not in st.names:
            st.remember(st.names, name)
        st.remember(st.subtrees, phys)
        return Step(kind, phys, size, name=name)
    if kind == Op.REMOVE_SUBTREE:
        return Step(kind, _blob_phys(r, st))
    if kind == Op.POKE_ARENA:
        page = r.below(8) if r.chance(80) else r.below(st.header.arena_pages + 4)
        word = r.small(1 << (P - 3)) if r.chance(90) else r.uint(2)
        if page == 0 and r.chance(60):  # the caller's records on the handover page
            if r.chance(50):
                word = (VMALLOC_SLOTS_OFFSET + r.small(SLOTS) * VMALLOC_DESCRIPTOR_BYTES) // 8 + r.below(2)
            else:
                word = ALLOC_SLOTS_OFFSET // 8 + r.small(SLOTS)
        vkind = r.pick((90, 60, 60, 46))
        if vkind == 0:  # a pointer to another arena page: a plausible but wrong node
            value = ARENA_BASE_PHYS + (r.below(st.header.arena_pages + 4) << P)
        elif vkind == 1:
            value = 0
        elif vkind == 2:
            value = r.uint(8)
        else:
            value = 1 << r.below(64)
        return Step(kind, page, word, value)
    if kind == Op.POKE_FDT:
        offset = r.below(0x40) if r.chance(60) else r.below(1 << P)
        return Step(kind, offset, r.byte())
    if kind == Op.FILL_FDT:
        # Fillers bring the FDT page to (or near) full in one op, so that the
        # subtree ops after it meet the edge: most fill to the brim.
        first = 16 * r.below(4)
        count = 1 << 20 if r.chance(60) else r.small(64)
        name_len = MAX_NAME if r.chance(50) else r.below(MAX_NAME + 1)
        for _ in range(2):  # later ops remove or retrieve some of them
            index = first + r.small(64)
            st.remember(st.subtrees, filler_blob(index, P))
            st.remember(st.names, filler_name(index, name_len))
        return Step(kind, first, count, name_len)
    if kind == Op.RESTORE_FOLIO:  # before any kexec: nothing was handed over
        return Step(kind, _phys_of(_pfn(r, st), P, r))
    if kind in _API_KINDS:
        return _api_step(r, st, kind)
    return Step(Op.KEXEC)


def _slot(r: _Reader, st: _State, used: list[int]) -> int:
    """Mostly a slot an earlier op filled."""
    return used[-1 - r.below(len(used))] if used and r.chance(80) else r.small(SLOTS)


def _alloc_size(r: _Reader, page_shift: int) -> int:
    kind = r.pick((100, 60, 40, 20, 10))
    if kind == 0:  # up to a few pages, byte-exact: the order rounds up
        return 1 + r.below(4 << page_shift)
    if kind == 1:  # a power of two, +- 1 byte: the edges of each order
        return max(0, (1 << (page_shift + r.below(MAX_PAGE_ORDER + 3))) + r.below(3) - 1)
    if kind == 2:
        return 0
    if kind == 3:
        return 1 << r.below(64)
    return r.uint(8)


def _vmalloc_area(r: _Reader, st: _State) -> tuple[int, int, int, int]:
    """(pfn, nr_pages, order, vm_flags): mostly an area vmalloc could make
    (pages of RAM, naturally aligned blocks), sometimes one it cannot."""
    h = st.header
    top = geometry(h.page_shift).huge_vmap_order
    order = 0 if r.chance(65) else r.below(top + 1)
    kind = r.pick((140, 40, 16))
    if kind == 0:
        blocks = 1 + r.small(16)
    elif kind == 1:  # past one chunk: a chunk page holds (PAGE_SIZE - 8) / 8 blocks
        capacity = ((1 << h.page_shift) - 8) // 8
        blocks = capacity + r.below(5) - 2
    else:
        blocks = 1 + r.below(MAX_VMALLOC_PAGES)
    nr_pages = min(blocks << order, MAX_VMALLOC_PAGES)
    s, e = h.ram[r.below(len(h.ram))]
    pfn = _aligned(s + r.below(max(e - s - nr_pages, 1)), order)
    flags = AREA_ALLOC | (AREA_HUGE if order else 0)
    if r.chance(15):  # impossible areas and unsupported flags
        pfn, nr_pages, flags = (pfn + r.below(3), nr_pages + r.below(3) - 1, r.below(AREA_FLAGS + 1))
    return pfn, nr_pages, order, flags


def _scratch_probe(r: _Reader, st: _State) -> tuple[int, int]:
    """(phys, size) at the edges of a scratch area, or anywhere."""
    if st.header.scratch and r.chance(80):
        addr, size = st.header.scratch[r.below(len(st.header.scratch))]
        edge = (addr, addr + size)[r.below(2)]
        return (edge + r.below(5) - 2 - r.below(3)) & U64, r.below(4) if r.chance(60) else r.uint(8)
    return _phys_of(_pfn(r, st), st.header.page_shift, r), r.uint(8) if r.chance(30) else 1 << r.below(40)


_API_KINDS = frozenset({Op.ALLOC_PRESERVE, Op.UNPRESERVE_FREE, Op.PRESERVE_VMALLOC, Op.UNPRESERVE_VMALLOC,
                        Op.IS_KHO_ENABLED, Op.IS_KHO_BOOT, Op.SCRATCH_OVERLAP, Op.RESTORE_FREE, Op.RESTORE_VMALLOC})


def _api_step(r: _Reader, st: _State, kind: Op) -> Step:
    """The alloc, vmalloc and query ops (either kernel)."""
    if kind == Op.ALLOC_PRESERVE:
        slot = r.small(SLOTS)
        st.remember(st.alloc_slots, slot)
        return Step(kind, slot, _alloc_size(r, st.header.page_shift))
    if kind in (Op.UNPRESERVE_FREE, Op.RESTORE_FREE):
        return Step(kind, _slot(r, st, st.alloc_slots))
    if kind == Op.PRESERVE_VMALLOC:
        slot = r.small(SLOTS)
        st.remember(st.vmalloc_slots, slot)
        pfn, nr_pages, order, flags = _vmalloc_area(r, st)
        st.remember(st.ranges, (pfn, nr_pages))  # restore_pages may aim at its blocks
        return Step(kind, slot, pfn, nr_pages, order, flags)
    if kind in (Op.UNPRESERVE_VMALLOC, Op.RESTORE_VMALLOC):
        return Step(kind, _slot(r, st, st.vmalloc_slots))
    if kind == Op.SCRATCH_OVERLAP:
        return Step(kind, *_scratch_probe(r, st))
    return Step(kind)


# A restore initialises a struct page per page: blocks past this many pages
# take the kernel a good part of its CPU budget, so the fuzzer restores them
# rarely (the scenarios restore every size).
HUGE_RESTORE_PAGES = 1 << 20


def _new_step(r: _Reader, st: _State, kind: Op) -> Step:
    P = st.header.page_shift
    if kind == Op.RESTORE_FOLIO:
        folios = [f for f in st.folios if 1 << min(f[1], 64) <= HUGE_RESTORE_PAGES or r.chance(6)]
        pfn = folios[-1 - r.below(len(folios))][0] if folios and r.chance(75) else _pfn(r, st)
        return Step(kind, _phys_of(pfn, P, r))
    if kind == Op.RESTORE_PAGES:
        ranges = [g for g in st.ranges if g[1] <= HUGE_RESTORE_PAGES or r.chance(6)]
        if ranges and r.chance(75):
            pfn, nr = ranges[-1 - r.below(len(ranges))]
            nr = nr if r.chance(75) else max(1, nr - r.small(8))
        else:
            pfn, nr = _pfn(r, st), _nr_pages(r)
        return Step(kind, _phys_of(pfn, P, r), nr)
    if kind == Op.RETRIEVE_SUBTREE:
        return Step(kind, name=_name(r, st))
    if kind == Op.PRESERVE_FOLIO:  # old-kernel op in the next kernel: -EOPNOTSUPP
        return _old_step(r, st, kind)
    if kind in _API_KINDS:
        return _api_step(r, st, kind)
    return Step(Op.KEXEC)


def decode(data: bytes, page_shift: int) -> Program:
    """The program these bytes encode, for a kernel of ``page_shift``."""
    r = _Reader(data)
    header = _header(r, page_shift)
    st = _State(header)
    steps = [_old_step(r, st, _OLD_KINDS[r.pick(_OLD_WEIGHTS)]) for _ in range(r.small(MAX_OLD_OPS + 1))]
    if not r.chance(15):  # most programs hand over and restore
        steps.append(Step(Op.KEXEC))
        steps += [_new_step(r, st, _NEW_KINDS[r.pick(_NEW_WEIGHTS)]) for _ in range(r.small(MAX_NEW_OPS + 1))]
    return Program(header, tuple(steps))
