"""The KHO radix tree as a set of keys laid out in page-sized nodes.

Levels ``depth-1`` (root) .. 1 are tables of child physical addresses (0:
empty), level 0 is a leaf bitmap whose bit b is bit b % 64 of little-endian
word b // 64. Nodes are reached through the physical addresses stored in their
parents, so a corrupted table entry (see POKE_ARENA) is followed exactly as
memory says.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from . import shortcuts
from .arena import Arena
from .geometry import Geometry
from .keys import RunawayLoop
from .outcome import ENOMEM

PageOf = Callable[[int], Mapping[int, int] | None]


class TreeError(Exception):
    """A strict traversal found a tree the next kernel must refuse."""


def leaf_bits(words: Mapping[int, int]) -> list[int]:
    """Set bits of a leaf bitmap, ascending."""
    out = []
    for w in sorted(words):
        v, base = words[w], w << 6
        while v:
            low = v & -v
            out.append(base | (low.bit_length() - 1))
            v ^= low
    return out


def _set_bits(words: dict[int, int], lo: int, n: int, value: bool) -> None:
    """Set (or clear) bits lo .. lo+n-1 of a leaf bitmap; zero words are absent."""
    hi = lo + n
    while lo < hi:
        w, bit = lo >> 6, lo & 63
        width = min(hi - lo, 64 - bit)
        mask = ((1 << width) - 1) << bit
        word = words.get(w, 0) | mask if value else words.get(w, 0) & ~mask
        if word:
            words[w] = word
        else:
            words.pop(w, None)
        lo += width


@dataclass(frozen=True)
class Visit:
    path: tuple[int, ...]  # table indices from the root
    level: int
    phys: int
    words: Mapping[int, int]
    base: int  # key bits contributed by the path


def traverse(root: int, geo: Geometry, page_of: PageOf, strict: bool) -> list[Visit]:
    """Nodes depth first, ascending slot order, a node before its children (so
    leaves come in ascending key order).

    strict (the next kernel): an entry to a page that page_of does not know, or
    a page reached twice, raises TreeError. Lenient (capturing the old
    kernel's state): such entries are listed in their table but not followed.
    """
    out: list[Visit] = []
    words = page_of(root)
    if words is None:
        if strict:
            raise TreeError("tree root not in the image")
        return out
    _visit(out, {root}, geo, page_of, strict, (), geo.root_level, root, words, 0)
    return out


def _visit(out: list[Visit], seen: set[int], geo: Geometry, page_of: PageOf, strict: bool,
           path: tuple[int, ...], level: int, phys: int, words: Mapping[int, int], base: int) -> None:
    """``traverse`` below one node, into ``out``. A list, not nested
    generators: each visit would pass through one generator per level
    above it. A function of its own, not a closure: a closure that calls
    itself is a reference cycle, which kept the whole list alive until the
    garbage collector's next pass."""
    out.append(Visit(path, level, phys, words, base))
    if level == 0:
        return
    shift = geo.shift(level)
    for slot in sorted(words):
        child = words[slot]
        child_words = page_of(child)
        if child_words is None or child in seen:
            if strict:
                raise TreeError("tree pointer outside RAM" if child_words is None else "tree loop")
            continue
        seen.add(child)
        _visit(out, seen, geo, page_of, strict, (*path, slot), level - 1, child, child_words, base | (slot << shift))


class RadixTree:
    """The old kernel's tree: nodes allocated from the arena."""

    def __init__(self, arena: Arena, geo: Geometry, root: int) -> None:
        self.arena = arena
        self.geo = geo
        self.root = root
        # Lowest key bit indexed by each table, root first: the hot path.
        self._shifts = tuple(geo.shift(lv) for lv in range(geo.root_level, 0, -1))
        self._slot_mask = (1 << geo.table_log2) - 1
        self._bit_mask = (1 << geo.bitmap_log2) - 1
        self._leaf_shift = geo.bitmap_log2
        # Leaves by key >> bitmap_log2 (shortcut): a path, once complete, never
        # changes while the old kernel runs (nodes are never freed, pokes apply
        # at kexec, a failed add unlinks only a chain it made, which had no leaf).
        self._leaves: dict[int, dict[int, int]] = {}

    def _node(self, phys: int) -> dict[int, int]:
        words = self.arena.words(phys)
        # The old kernel's tree is never corrupted (pokes apply at kexec).
        assert words is not None, f"table entry {phys:#x} is not a tree page"
        return words

    def _leaf(self, key: int) -> dict[int, int] | None:
        """The leaf holding key, or None when a table on the path is empty."""
        leaf = self._leaves.get(key >> self._leaf_shift)
        if leaf is not None:
            return leaf
        table = self._node(self.root)
        for shift in self._shifts:
            child = table.get((key >> shift) & self._slot_mask, 0)
            if not child:
                return None
            table = self._node(child)
        if shortcuts.ENABLED:
            self._leaves[key >> self._leaf_shift] = table
        return table

    def contains(self, key: int) -> bool:
        leaf = self._leaf(key)
        bit = key & self._bit_mask
        return leaf is not None and bool(leaf.get(bit >> 6, 0) >> (bit & 63) & 1)

    def add(self, key: int) -> int:
        """Set key, creating missing nodes top-down. 0, or -ENOMEM with the
        tree and the free pages as they were (only the attempt count moved)."""
        bit = key & self._bit_mask
        leaf = self._leaves.get(key >> self._leaf_shift)
        if leaf is not None:
            leaf[bit >> 6] = leaf.get(bit >> 6, 0) | (1 << (bit & 63))
            return 0
        table = self._node(self.root)
        fresh: list[int] = []
        first_link: tuple[dict[int, int], int] | None = None
        for shift in self._shifts:
            slot = (key >> shift) & self._slot_mask
            child = table.get(slot, 0)
            if not child:
                fresh_phys = self.arena.alloc()
                if fresh_phys is None:
                    # Unlinking the first new entry drops the whole new chain.
                    if first_link is not None:
                        del first_link[0][first_link[1]]
                    for phys in fresh:
                        self.arena.free(phys)
                    return -ENOMEM
                child = table[slot] = fresh_phys
                fresh.append(child)
                first_link = first_link or (table, slot)
            table = self._node(child)
        if shortcuts.ENABLED:
            self._leaves[key >> self._leaf_shift] = table
        table[bit >> 6] = table.get(bit >> 6, 0) | (1 << (bit & 63))
        return 0

    def delete(self, key: int) -> bool:
        """Clear key. False when a table on its path is empty (nothing to
        clear). Nodes are never freed, even when left empty."""
        leaf = self._leaf(key)
        if leaf is None:
            return False
        bit = key & self._bit_mask
        word = leaf.get(bit >> 6, 0) & ~(1 << (bit & 63))
        if word:
            leaf[bit >> 6] = word
        else:
            leaf.pop(bit >> 6, None)
        return True

    def _leaf_runs(self, key: int, count: int) -> Iterator[tuple[int, int]]:
        """Keys key .. key+count-1 cut where they change leaf: (first, how many)."""
        end, size = key + count, self._bit_mask + 1
        while key < end:
            n = min(end - key, size - (key & self._bit_mask))
            yield key, n
            key += n

    def add_run(self, key: int, count: int) -> tuple[int, int]:
        """Shortcut: keys key .. key+count-1 set in turn as ``add`` sets
        them: (how many were, 0 or the error of the one that failed). Only
        the first key of a leaf can need nodes; the others of that leaf are
        set together."""
        done = 0
        for first, n in self._leaf_runs(key, count):
            rc = self.add(first)
            if rc:
                return done, rc
            leaf = self._leaf(first)
            assert leaf is not None  # just added
            _set_bits(leaf, (first & self._bit_mask) + 1, n - 1, True)
            done += n
        return done, 0

    def delete_run(self, key: int, count: int) -> int:
        """Shortcut: keys key .. key+count-1 cleared as ``delete`` clears
        them, a leaf at a time: how many found an empty table on their path."""
        absent = 0
        for first, n in self._leaf_runs(key, count):
            leaf = self._leaf(first)
            if leaf is None:
                absent += n
            else:
                _set_bits(leaf, first & self._bit_mask, n, False)
        return absent

    def nodes(self) -> list[Visit]:
        """The tree as memory shows it (after pokes, wherever entries point)."""
        return traverse(self.root, self.geo, self.arena.read, strict=False)


WALK_LIMIT = 1 << 22  # keys and nodes of a walk beyond which the next kernel is taken to run away


def kernel_walk(root: int, geo: Geometry, read: Callable[[int], Mapping[int, int]]) -> Iterator[tuple[bool, int]]:
    """The next kernel's walk of a handed-over tree that it does not
    validate (quirk next-kernel-trusts-tree): (True, phys) for each node
    visited, (False, key) for each set bit, in the kernel's order. Every
    non-zero entry is followed, one level down, wherever it points; ``read``
    raises when the memory is not there."""
    for n, event in enumerate(_kernel_walk(geo, read, root, geo.root_level, 0)):
        if n > WALK_LIMIT:
            raise RunawayLoop(f"the walk visits more than {WALK_LIMIT} keys and nodes")
        yield event


def _kernel_walk(geo: Geometry, read: Callable[[int], Mapping[int, int]], phys: int, level: int,
                 base: int) -> Iterator[tuple[bool, int]]:
    """``kernel_walk`` below one table (not a closure: see ``_visit``)."""
    words = read(phys)
    yield True, phys
    for slot in sorted(words):
        key = base | (slot << geo.shift(level))
        if level > 1:
            yield from _kernel_walk(geo, read, words[slot], level - 1, key)
            continue
        leaf = read(words[slot])
        yield True, words[slot]
        yield from ((False, key | bit) for bit in leaf_bits(leaf))
