"""Tree layout, raw node pages, the allocator and walk order."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from reference.arena import Arena
from reference.geometry import PAGE_SHIFTS, geometry
from reference.keys import pfn_key
from reference.program import ARENA_BASE_PHYS, Header
from reference.tree import RadixTree, leaf_bits, traverse

PAGE = 0x1000


def page(i: int) -> int:
    return ARENA_BASE_PHYS + i * PAGE


def new_tree(arena_pages: int = 64, fail_alloc: int = 0, shift: int = 12) -> RadixTree:
    arena = Arena(Header(page_shift=shift, arena_pages=arena_pages, fail_alloc=fail_alloc))
    return RadixTree(arena, geometry(shift), arena.alloc())


def canonical(tree: RadixTree) -> list[tuple]:
    return [
        (v.path, v.level, v.phys, tuple(sorted(v.words)) if v.level else tuple(leaf_bits(v.words)))
        for v in tree.nodes()
    ]


def test_canonical_tree_after_adds():
    t = new_tree()
    assert t.root == page(1)
    assert t.add(pfn_key(0x10, 0, 12)) == 0  # root slot 2 (order bit 52), pages 2..6
    assert t.add(pfn_key(0x8003, 0, 12)) == 0  # level-1 slot 1: a second leaf, page 7
    assert t.add(pfn_key(0, 1, 12)) == 0  # order 1: order bit 51 -> root slot 1, pages 8..12
    assert t.add(pfn_key(0x12, 0, 12)) == 0  # same leaf as the first: no allocation
    assert canonical(t) == [
        ((), 5, page(1), (1, 2)),
        ((1,), 4, page(8), (0,)),
        ((1, 0), 3, page(9), (0,)),
        ((1, 0, 0), 2, page(10), (0,)),
        ((1, 0, 0, 0), 1, page(11), (0,)),
        ((1, 0, 0, 0, 0), 0, page(12), (0,)),
        ((2,), 4, page(2), (0,)),
        ((2, 0), 3, page(3), (0,)),
        ((2, 0, 0), 2, page(4), (0,)),
        ((2, 0, 0, 0), 1, page(5), (0, 1)),
        ((2, 0, 0, 0, 0), 0, page(6), (0x10, 0x12)),
        ((2, 0, 0, 0, 1), 0, page(7), (3,)),
    ]


def test_raw_page_bytes():
    t = new_tree()
    t.add(pfn_key(0x10, 0, 12))
    t.add(pfn_key(0x8003, 0, 12))
    root = t.arena.page_bytes(page(1))
    assert len(root) == PAGE
    assert root == bytes(16) + page(2).to_bytes(8, "little") + bytes(PAGE - 24)  # slot 2 only
    level1 = t.arena.page_bytes(page(5))
    assert struct.unpack_from("<2Q", level1, 0) == (page(6), page(7))
    leaf = t.arena.page_bytes(page(6))
    assert struct.unpack_from("<Q", leaf, 0)[0] == 1 << 0x10  # bit 16 of word 0
    assert t.arena.page_bytes(page(7))[0] == 0b1000
    t.add(pfn_key(0x7FFF, 0, 12))  # last bit of the first leaf: top bit of its last word
    assert t.arena.page_bytes(page(6))[-8:] == (1 << 63).to_bytes(8, "little")


def test_delete_keeps_empty_nodes():
    t = new_tree()
    key = pfn_key(0x10, 0, 12)
    t.add(key)
    assert t.delete(key)
    assert canonical(t)[-1] == ((2, 0, 0, 0, 0), 0, page(6), ())
    assert len(canonical(t)) == 6
    assert t.delete(key)  # bit already clear, path present: nothing to warn about
    assert not t.delete(pfn_key(0, 1, 12))  # root slot 1 empty
    assert t.arena.allocated() == {1, 2, 3, 4, 5, 6}


def test_alloc_failure_leaves_tree_and_allocator_unchanged():
    # Attempt 1 is the root, 2 and 3 succeed, 4 fails mid-chain.
    t = new_tree(fail_alloc=4)
    assert t.add(pfn_key(0x10, 0, 12)) == -12
    assert canonical(t) == [((), 5, page(1), ())]
    assert t.arena.allocated() == {1}
    assert t.arena.attempts == 4
    assert t.arena.page_bytes(page(1)) == bytes(PAGE)
    # The freed pages are reused lowest first.
    assert t.add(pfn_key(0x10, 0, 12)) == 0
    assert [n[2] for n in canonical(t)] == [page(i) for i in range(1, 7)]


def test_failure_below_existing_nodes_unlinks_only_the_new_chain():
    t = new_tree(fail_alloc=8)  # root + 5 for the first key, then one new leaf (7) + a failure
    t.add(pfn_key(0x10, 0, 12))
    before = canonical(t)
    assert t.add(pfn_key(0x1_0000_0000, 0, 12)) == -12  # level-2 slot 256: level-1 table (page 7) ok, leaf fails
    assert canonical(t) == before
    assert t.arena.allocated() == {1, 2, 3, 4, 5, 6}


def test_arena_full():
    t = new_tree(arena_pages=4)
    assert t.add(pfn_key(0, 0, 12)) == -12  # needs 5 nodes, only 2 pages left
    assert t.arena.allocated() == {1}


def test_poke_redirects_the_walk():
    t = new_tree()
    t.add(pfn_key(0x10, 0, 12))
    t.arena.poke(1, 2, 0)  # cut the root's only entry
    assert canonical(t) == [((), 5, page(1), ())]
    t.arena.poke(1, 3, page(1))  # a loop back to the root is listed, not followed
    assert canonical(t) == [((), 5, page(1), (3,))]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(PAGE_SHIFTS), st.lists(st.integers(0, 1 << 36), min_size=1, max_size=40), st.data())
def test_walk_order_is_key_order(shift, pfns, data):
    t = new_tree(arena_pages=4096, shift=shift)
    keys = set()
    for pfn in pfns:
        order = data.draw(st.integers(0, 12))
        key = pfn_key(pfn >> order << order, order, shift)
        keys.add(key)
        assert t.add(key) == 0
    walked = [v.base | b for v in t.nodes() if v.level == 0 for b in leaf_bits(v.words)]
    assert walked == sorted(keys)
    strict = [v.phys for v in traverse(t.root, t.geo, t.arena.words, strict=True)]
    assert strict == [v.phys for v in t.nodes()]


@settings(max_examples=200, deadline=None)
@given(preset=st.lists(st.tuples(st.integers(0, 3 << 15), st.integers(1, 200)), max_size=4), runs=st.lists(st.tuples(
    st.booleans(), st.integers(0, 3 << 15) | st.integers(1, 3).map(lambda k: (k << 15) - 70), st.integers(1, 200)),
    min_size=1, max_size=6), arena_pages=st.sampled_from((8, 10, 12, 64)), fail_alloc=st.just(0) | st.integers(2, 20))
def test_runs_are_one_key_at_a_time(preset, runs, arena_pages, fail_alloc):
    """add_run and delete_run (whole leaves at a time) leave the tree, its
    pages and the allocator as key-by-key adds and deletes do, and report
    the same: keys set before an allocation fails, deletes that find no
    leaf. Runs cross leaves (2^15 keys each at page shift 12). (Allocation
    1 is the root.)"""
    base = pfn_key(0, 0, 12)
    one, run = new_tree(arena_pages, fail_alloc), new_tree(arena_pages, fail_alloc)
    for t in (one, run):
        for first, n in preset:
            for k in range(base + first, base + first + n):
                t.add(k)
    for add, first, n in runs:
        if add:
            done, rc = 0, 0
            for k in range(base + first, base + first + n):
                rc = one.add(k)
                if rc:
                    break
                done += 1
            assert run.add_run(base + first, n) == (done, rc)
        else:
            absent = sum(not one.delete(k) for k in range(base + first, base + first + n))
            assert run.delete_run(base + first, n) == absent
        assert canonical(run) == canonical(one)
        assert run.arena.attempts == one.arena.attempts and run.arena.content() == one.arena.content()
