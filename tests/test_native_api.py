"""The rest of the public KHO API on every kernel series (page shift 12),
checked against values derived by hand from the ABI header and the runtime's
allocator policy (program.py: arena page 0 is the handover page; single pages
lowest free first from page 1; a block of 2^k pages at the lowest free
naturally aligned index), and the same programs on the model.

Boot, as in test_native_smoke: page 1 the root, page 2 the FDT folio, pages
3..7 the five nodes below the root on the FDT key's path, page 8 the
metadata folio. At 4 KiB pages the root indexes key bits 51..59: an order-0
key (order bit 52) sits under root slot 2, an order-1 key (bit 51) under
slot 1, so the first order-1 key needs five new nodes. Level 1 indexes key
bits 15..23: pfns 0x1000 and 0x40000 (the arena) share every node down to
level 1 and need different leaves.
"""

from __future__ import annotations

import pytest
from conftest import SERIES

from reference import model
from reference.outcome import E2BIG, EINVAL, EOPNOTSUPP
from reference.profiles import KHO_V3, KHO_V4, KHO_V4_KEYAPI
from reference.program import ARENA_BASE_PHYS, parse_program

PROFILE = {"7.1": KHO_V3, "7.2": KHO_V4, "7.3": KHO_V4_KEYAPI}
PS = 12
PAGE = 1 << PS


def page(index: int) -> int:
    return ARENA_BASE_PHYS + index * PAGE


ALLOC = """
page_shift 12
---
alloc_preserve 0 1
alloc_preserve 1 0x1001
alloc_preserve 2 0
alloc_preserve 3 0x400001
unpreserve_free 0
alloc_preserve 4 0x1000
kexec
is_kho_boot
is_kho_enabled
restore_free 1
restore_free 1
restore_free 0
restore_free 4
"""
ALLOC_EXPECTED = [
    (0, page(9), 0, 0),  # 1 byte: order 0, the first page after boot
    (0, page(10), 0, 0),  # a page and a byte: order 1, the first free aligned pair (10, 11)
    (-EINVAL, 0, 0, 0),  # size 0
    (-E2BIG, 0, 0, 0),  # 1025 pages: order 11 > MAX_PAGE_ORDER
    (0, 0, 0, 0),  # unpreserved and freed (void)
    (0, page(9), 0, 0),  # the freed page again (the order-1 key's nodes took 12..16)
    (0, 0, 0, 0),  # kexec accepted
    (0, 1, 0, 0),  # is_kho_boot
    (0, 0, 0, 0),  # is_kho_enabled: the next kernel boots without kho=on
    (0, 0, 2, 0),  # restore_free: both pages of the order-1 folio to the managed count
    (0, 0, 0, 2),  # again: no magic (WARN_ON_ONCE), no folio (WARN_ON)
    (0, 0, 0, 0),  # slot 0 was emptied by unpreserve_free: nothing
    (0, 0, 1, 0),
]

VMALLOC = """
page_shift 12
---
preserve_vmalloc 0 0x1000 8 0 1
preserve_vmalloc 1 0x2000 0x400 1 3
preserve_vmalloc 2 0x5000 4 0 5
preserve_vmalloc 3 0x5001 4 1 3
kexec
restore_vmalloc 0
restore_vmalloc 1
restore_vmalloc 0
restore_vmalloc 2
restore_pages 0x2000000 2
"""
VMALLOC_EXPECTED = [
    # chunk page 9 (its key shares the arena's leaf); the 8 blocks need one
    # leaf (page 10) for pfns 0x1000..
    (0, page(9), 0, 0, ()),
    # 512 blocks of 2 pages: chunk 11, the order-1 path 12..16, the chunk
    # full at 511 entries: a second chunk, page 17
    (0, page(11), 0, 0, ()),
    (-EOPNOTSUPP, 0, 0, 0, ()),  # VM_ALLOC | VM_MAP: a vmap() area
    (-EINVAL, 0, 0, 0, ()),  # blocks of 2 pages from an odd pfn: no such area
    (0, 0, 0, 0, ()),
    (0, 8, 9, 0, ((0x1000, 8),)),  # 8 pages mapped; 8 + the chunk to the managed count
    (0, 1024, 1026, 0, ((0x2000, 1024),)),  # 1024 pages, two chunk pages
    (-1, 0, 0, 1, ()),  # restored already: the chunk page's magic is gone (one warning)
    (-1, 0, 0, 0, ()),  # the failed preservation's slot is empty: no pages, no area
    (-1, 0, 0, 0, ()),  # the first block went with its area
]

SCRATCH = (0x1000_0000, 0x100_0000)
PROBES = ((0x1000_0000, 1), (0x0FFF_FFFF, 1), (0x0FFF_FFFF, 2), (0x10FF_FFFF, 1), (0x1100_0000, 1),
          (0x1100_0000, 0), (0x1000_0001, (1 << 64) - 1))
# The last wraps: phys + size is 0x1000_0000 in 64 bits, not above the area's start.
OVERLAPS = (1, 0, 1, 1, 0, 0, 0)


def queries_text() -> str:
    probes = "\n".join(f"scratch_overlap {p:#x} {n:#x}" for p, n in PROBES)
    return f"page_shift 12\nscratch {SCRATCH[0]:#x} {SCRATCH[1]:#x}\n---\n{probes}\nkexec\n{probes}\n"


def queries_expected(series: str) -> list[tuple]:
    if PROFILE[series].scratch_overlap:
        answers = [(0, v) for v in OVERLAPS]
    else:
        answers = [(-EOPNOTSUPP, 0)] * len(OVERLAPS)  # not public API before 7.3
    return answers + [(0, 0)] + answers


def _view(outcome, with_pages=False):
    return [(r.rc, r.value, r.value2, len(r.warnings), *((r.pages,) if with_pages else ())) for r in outcome.ops]


@pytest.mark.parametrize("series", SERIES)
def test_alloc_preserve(series, native_for):
    program = parse_program(ALLOC)
    o = native_for(series, PS).run(program)
    assert o.events == () and o.reports == ()
    assert _view(o) == ALLOC_EXPECTED
    assert _view(model.run(program, PROFILE[series])) == ALLOC_EXPECTED


@pytest.mark.parametrize("series", SERIES)
def test_vmalloc(series, native_for):
    program = parse_program(VMALLOC)
    o = native_for(series, PS).run(program)
    assert o.events == () and o.reports == ()
    assert _view(o, with_pages=True) == VMALLOC_EXPECTED
    assert _view(model.run(program, PROFILE[series]), with_pages=True) == VMALLOC_EXPECTED
    # the descriptors cross on the handover page: struct kho_vmalloc at 512 + 16 * slot
    handover = o.image.other_pages[ARENA_BASE_PHYS]
    assert handover[512:528] == page(9).to_bytes(8, "little") + (8).to_bytes(4, "little") + bytes([1, 0, 0, 0])
    assert handover[528:544] == page(11).to_bytes(8, "little") + (1024).to_bytes(4, "little") + bytes([3, 0, 1, 0])
    assert handover[544:576] == bytes(32)  # the refused ones stay zero


@pytest.mark.parametrize("series", SERIES)
def test_queries(series, native_for):
    program = parse_program(queries_text())
    o = native_for(series, PS).run(program)
    assert [(r.rc, r.value) for r in o.ops] == queries_expected(series)
    assert [(r.rc, r.value) for r in model.run(program, PROFILE[series]).ops] == queries_expected(series)
