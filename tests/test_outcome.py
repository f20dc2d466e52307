"""``Pairs``, the packed pair lists of a next kernel's boot, stands for the
tuple of pairs it holds: it reads, compares, hashes, pickles and serializes
as that tuple does."""

from __future__ import annotations

import pickle
from dataclasses import asdict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.outcome import NextBoot, OpResult, Outcome, Pairs

U64 = st.integers(0, 2**64 - 1)
PAIR_LISTS = st.lists(st.tuples(U64 | st.integers(0, 70), U64 | st.integers(0, 70)), max_size=12)


@given(PAIR_LISTS, PAIR_LISTS)
def test_pairs_are_the_tuple_they_hold(xs, ys):
    x, y = tuple(xs), tuple(ys)
    p, q = Pairs(xs), Pairs(iter(ys))
    assert tuple(p) == x and list(p) == xs and len(p) == len(x) and repr(p) == repr(x)
    for i in range(-len(x), len(x)):
        assert p[i] == x[i]
    with pytest.raises(IndexError):
        p[len(x)]
    assert (p == q) == (x == y) and (p != q) == (x != y)
    assert p == x and x == p and (q == x) == (y == x)
    assert p != list(x)  # as the tuple is not the list
    assert hash(p) == hash(x)
    assert pickle.loads(pickle.dumps(p)) == p and Pairs(p) == p


@given(PAIR_LISTS, PAIR_LISTS)
def test_a_next_boot_holds_pair_lists_as_pairs_and_serializes_them_as_tuples(walk, magic):
    boot = NextBoot(True, walk=walk, reserved=tuple(walk), noinit=iter(walk), scratch_marks=(), magic=Pairs(magic))
    assert all(isinstance(getattr(boot, f), Pairs) for f in ("walk", "reserved", "noinit", "scratch_marks", "magic"))
    assert boot == NextBoot(True, walk=tuple(walk), reserved=walk, noinit=walk, magic=tuple(magic))
    assert asdict(boot)["walk"] == tuple(walk) and type(asdict(boot)["magic"]) is tuple
    assert Outcome(OpResult(), (), next=boot).to_json()["next"]["reserved"] == [list(pair) for pair in walk]
    assert pickle.loads(pickle.dumps(boot)) == boot


def test_pairs_hold_u64_only():
    with pytest.raises(OverflowError):
        Pairs([(2**64, 0)])
    with pytest.raises(OverflowError):
        Pairs([(-1, 0)])
