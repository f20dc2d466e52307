"""Geometry, key encoding and range splitting, against vectors derived by
hand from the ABI diagrams in include/linux/kho/abi/kexec_handover.h."""

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.geometry import PAGE_SHIFTS, geometry
from reference.keys import decode, encode, in_domain, page_chunks, pfn_key, range_in_domain
from reference.program import Header


@pytest.mark.parametrize(
    "shift, table, bitmap, width, depth",
    [(12, 9, 15, 53, 6), (14, 11, 17, 51, 5), (16, 13, 19, 49, 4)],
)
def test_geometry(shift, table, bitmap, width, depth):
    g = geometry(shift)
    assert (g.table_log2, g.bitmap_log2, g.key_width, g.depth) == (table, bitmap, width, depth)
    assert g.root_level == depth - 1
    # The root table reaches the top key bit and no table reaches past bit 63.
    assert g.shift(g.root_level) <= width - 1 < g.shift(g.root_level) + table <= 64


def test_diagram_bit_ranges_4k():
    # "63:60 0 | 59:51 Lv5 | 50:42 Lv4 | 41:33 Lv3 | 32:24 Lv2 | 23:15 Lv1 | 14:0 bitmap"
    g = geometry(12)
    assert [g.shift(lv) for lv in (5, 4, 3, 2, 1)] == [51, 42, 33, 24, 15]


@pytest.mark.parametrize(
    "shift, phys, order, key",
    [
        (12, 0, 0, 1 << 52),  # pfn 0: only the order bit
        (12, 0x1000, 0, (1 << 52) | 1),
        (12, 0x2000, 1, (1 << 51) | 1),  # "order 1: order bit at 51, pa >> 13"
        (12, 0x4000, 2, (1 << 50) | 1),
        (12, 0xFFFF_FFFF_FFFF_F000, 0, (1 << 53) - 1),  # top pfn
        (12, 1 << 63, 51, 3),  # largest valid order: order bit at 1
        (12, 0, 51, 2),
        (14, 0, 0, 1 << 50),
        (14, 0xFFFF_FFFF_FFFF_C000, 0, (1 << 51) - 1),
        (16, 0x10000, 0, (1 << 48) | 1),
        (16, 1 << 63, 47, 3),
    ],
)
def test_encode_decode_vectors(shift, phys, order, key):
    assert encode(phys, order, shift) == key
    assert decode(key, shift) == (phys, order)
    assert in_domain(phys >> shift, order, shift)


def test_domain_edges():
    assert not in_domain(1 << 52, 0, 12)  # pfn past the key
    assert not in_domain(0, 52, 12)  # order bit would be bit 0
    assert not in_domain(1, 1, 12)  # unaligned
    assert in_domain((1 << 52) - 1, 0, 12)
    # Keys 0 and 1 (reachable through the raw-key API) still decode.
    assert decode(1, 12) == (0, 52)
    assert decode(0, 12) == (0, 53)


def test_table_indices_of_a_key():
    g = geometry(12)
    key = pfn_key(0x1_2345_6789, 0, 12)
    assert key == (1 << 52) | 0x1_2345_6789
    # pfn bits 14:0 = 0x6789; 23:15 = 0x08a; 32:24 = 0x123; bit 52 -> root index 2
    assert g.path(key) == (2, 0, 0, 0x123, 0x8A)
    assert g.leaf_bit(key) == 0x6789
    g16 = geometry(16)
    key = pfn_key(0xABC_DEF0, 0, 16)  # levels 3..1 index bits 57:45, 44:32, 31:19
    assert g16.path(key) == ((1 << 48) >> 45, 0, 0xABCDEF0 >> 19)
    assert g16.leaf_bit(key) == 0xABCDEF0 & ((1 << 19) - 1)


@given(st.sampled_from(PAGE_SHIFTS), st.data())
def test_round_trip(shift, data):
    g = geometry(shift)
    order = data.draw(st.integers(0, g.max_order))
    pfn = data.draw(st.integers(0, (1 << (64 - shift - order)) - 1)) << order
    key = pfn_key(pfn, order, shift)
    assert key.bit_length() <= g.key_width
    assert decode(key, shift) == (pfn << shift, order)


def H(numa=((0, 0),), shift=12):
    return Header(page_shift=shift, numa=numa)


def test_chunks_alignment_and_remainder():
    assert list(page_chunks(0, 1, H())) == [(0, 0)]
    assert list(page_chunks(0, 7, H())) == [(0, 2), (4, 1), (6, 0)]
    assert list(page_chunks(3, 13, H())) == [(3, 0), (4, 2), (8, 3)]
    assert list(page_chunks(6, 4, H())) == [(6, 1), (8, 1)]
    assert list(page_chunks(5, 0, H())) == []


def test_chunks_numa_boundary_inside_block():
    # Nodes 0 | 1 at pfn 6 | 0 again at pfn 7: the ends of [0, 8) are both in
    # node 0, but the block crosses two boundaries.
    h = H(numa=((0, 0), (6, 1), (7, 0)))
    assert list(page_chunks(0, 8, h)) == [(0, 2), (4, 1), (6, 0), (7, 0)]
    # Same nid on both sides of a range start is no boundary.
    h = H(numa=((0, 0), (4, 0)))
    assert list(page_chunks(0, 8, h)) == [(0, 3)]


def test_chunks_huge_range_is_instant():
    t = time.perf_counter()
    assert list(page_chunks(1 << 40, 1 << 40, H())) == [(1 << 40, 40)]
    assert len(list(page_chunks(1, (1 << 52) - 2, H()))) == 2 * 51
    assert time.perf_counter() - t < 0.5


def test_range_domain():
    assert range_in_domain(0, 1 << 52, 12)
    assert not range_in_domain(1, 1 << 52, 12)
    # Model policy: the block order stays in the key domain.
    assert list(page_chunks(0, 1 << 52, H())) == [(0, 51), (1 << 51, 51)]
