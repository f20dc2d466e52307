"""The deterministic scenario library: small named programs, one per corner of
the KHO contract, run by the conformance report on every (kernel, page shift)
cell and by the test suite.

Every scenario is built for one page shift, ends its old-kernel part with a
``kexec`` and restores what it preserved where that means something. Programs
are correct by construction for the reference model: whatever a scenario needs
to know about the model's memory layout (how many page allocations a program
makes, where the FDT keeps a property, which arena page holds the tree root)
is read from the model's own run of the uncorrupted program, never hard-coded.

The layout is ``layouts.standard_header``, varied where a scenario says so.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from reference import model
from reference.fdt import Fdt, kho_add_subtree
from reference.geometry import MAX_PAGE_ORDER, geometry
from reference.outcome import Outcome
from reference.profiles import KHO_V4, Profile
from reference.program import (
    AREA_ALLOC,
    AREA_HUGE,
    AREA_MAPPED,
    ARENA_BASE_PHYS,
    MAX_NAME,
    MAX_RAM_PFN,
    Header,
    Op,
    Program,
    Step,
    filler_blob,
    filler_name,
)
from reference.vmalloc import chunk_capacity, vmalloc_slot_word

from .layouts import BOOT_SUBTREE, NUMA_SPLIT, RAM_PFNS, SCRATCH, arena_index, standard_header

# The allocation counts and FDT offsets the scenarios derive do not depend on
# the compatible string's value (all profiles' strings have one length).
_LAYOUT_PROFILE: Profile = KHO_V4


@dataclass(frozen=True)
class Scenario:
    name: str
    program: Program
    description: str


class _Ops:
    """A tiny builder: pfns in, phys where the op takes phys."""

    def __init__(self, page_shift: int) -> None:
        self.P = page_shift
        self.steps: list[Step] = []

    def __iter__(self):
        return iter(self.steps)

    def add(self, op: Op, a: int = 0, b: int = 0, c: int = 0, name: str = "") -> _Ops:
        self.steps.append(Step(op, a, b, c, name=name))
        return self

    def folio(self, pfn: int, order: int) -> _Ops:
        return self.add(Op.PRESERVE_FOLIO, pfn, order)

    def unfolio(self, pfn: int, order: int) -> _Ops:
        return self.add(Op.UNPRESERVE_FOLIO, pfn, order)

    def pages(self, pfn: int, n: int) -> _Ops:
        return self.add(Op.PRESERVE_PAGES, pfn, n)

    def unpages(self, pfn: int, n: int) -> _Ops:
        return self.add(Op.UNPRESERVE_PAGES, pfn, n)

    def subtree(self, name: str, phys: int, size: int) -> _Ops:
        return self.add(Op.ADD_SUBTREE, phys, size, name=name)

    def unsubtree(self, phys: int) -> _Ops:
        return self.add(Op.REMOVE_SUBTREE, phys)

    def kexec(self) -> _Ops:
        return self.add(Op.KEXEC)

    def restore_folio(self, pfn: int) -> _Ops:
        return self.add(Op.RESTORE_FOLIO, (pfn << self.P) & ((1 << 64) - 1))

    def restore_pages(self, pfn: int, n: int) -> _Ops:
        return self.add(Op.RESTORE_PAGES, (pfn << self.P) & ((1 << 64) - 1), n)

    def retrieve(self, name: str) -> _Ops:
        return self.add(Op.RETRIEVE_SUBTREE, name=name)

    def fill(self, first: int, count: int, name_len: int) -> _Ops:
        return self.add(Op.FILL_FDT, first, count, name_len)

    def alloc(self, slot: int, size: int) -> _Ops:
        return self.add(Op.ALLOC_PRESERVE, slot, size)

    def vmalloc(self, slot: int, pfn: int, nr_pages: int, order: int = 0, vm_flags: int = AREA_ALLOC) -> _Ops:
        if order:
            vm_flags |= AREA_HUGE
        self.steps.append(Step(Op.PRESERVE_VMALLOC, slot, pfn, nr_pages, order, vm_flags))
        return self


def _program(header: Header, ops: Iterable[Step]) -> Program:
    p = Program(header, tuple(ops))
    header.validate()
    return p


def _old_kernel(program: Program) -> model.OldKernel:
    """The model's old kernel after every step before ``kexec``."""
    old = model.OldKernel(program.header, _LAYOUT_PROFILE)
    old.boot()
    k = program.kexec_index()
    for s in program.steps if k is None else program.steps[:k]:
        old.apply(s)
    return old


def allocations(program: Program) -> int:
    """Page allocations the old kernel attempts for ``program`` (boot
    included), by the model's allocator: the range of useful fail_alloc."""
    return _old_kernel(program).arena.attempts


def _outcome(program: Program) -> Outcome:
    return model.run(program, _LAYOUT_PROFILE)


# ---- the scenarios -------------------------------------------------------------


def _empty_tree(P: int) -> list[Scenario]:
    ops = _Ops(P).kexec().retrieve(BOOT_SUBTREE).restore_pages(0x100, 1).restore_folio(0x200)
    return [Scenario("scenario.empty-tree", _program(standard_header(P), ops),
                     "No preservation: only the boot's FDT and metadata keys cross; "
                     "restoring an unpreserved page fails (one warning).")]


def _spread(order: int, max_order: int) -> int:
    """A pfn for a folio of ``order`` such that the folios of all orders
    0..max_order-1 are pairwise disjoint and miss the arena and the scratch
    area: [3 * 2^k, 4 * 2^k). Both of those start at a power of two, which
    this layout never covers."""
    return 3 << order if order < max_order else 1 << order


def _every_order(P: int) -> list[Scenario]:
    max_order = geometry(P).max_order
    ops = _Ops(P)
    for k in range(max_order + 1):
        ops.folio(_spread(k, max_order), k)
    ops.kexec()
    for k in range(max_order + 1):
        ops.restore_folio(_spread(k, max_order))
    header = standard_header(P, arena_pages=1024)
    return [Scenario("scenario.every-order", _program(header, ops),
                     f"One folio of every order 0..{max_order} at [3*2^k, 4*2^k) (the largest order at "
                     f"2^{max_order}), then restore each: RAM folios come back (the huge ones may run out of CPU budget), "
                     "folios past RAM only touch phantom struct pages.")]


def _widest_orders(P: int) -> list[Scenario]:
    g = geometry(P)
    top = g.max_order
    ops = _Ops(P)
    ops.folio(1 << top, top)  # the upper half of the pfn space
    ops.folio(1 << (top - 1), top - 1)
    ops.add(Op.RADIX_ADD, 1 << (top - 2), top - 2)
    ops.folio(0, top + 1)  # one past: the order bit would fall off the key (out of domain)
    ops.add(Op.RADIX_ADD, 0, top + 2)  # two past: the kernel's shift goes negative
    ops.unfolio(1 << (top - 1), top - 1)
    ops.unfolio(0, top + 1)
    ops.kexec()
    ops.restore_folio(1 << top).restore_folio(1 << (top - 1)).restore_folio(1 << (top - 2))
    return [Scenario("scenario.widest-orders", _program(standard_header(P), ops),
                     f"The largest valid orders ({top}, {top - 1}, {top - 2}) and orders {top + 1} and "
                     f"{top + 2}, past the key width, which the model refuses with -EINVAL.")]


def _pfn_zero(P: int) -> list[Scenario]:
    ops = _Ops(P)
    ops.folio(0, 0).unfolio(0, 0).folio(0, 3).pages(8, 8).add(Op.RADIX_ADD, 0x10, 4)
    ops.kexec()
    ops.restore_folio(0).restore_folio(0).restore_pages(8, 8).restore_folio(0x10)
    return [Scenario("scenario.pfn-zero", _program(standard_header(P), ops),
                     "pfn 0 (key: the order bit alone) preserved, unpreserved, preserved at order 3, "
                     "with neighbours; restored twice (the second one fails and warns once).")]


def _highest_pfns(P: int) -> list[Scenario]:
    limit = 1 << (64 - P)  # first pfn a key cannot hold
    ops = _Ops(P)
    ops.folio(limit - 1, 0)
    ops.folio(limit - 8, 3)
    ops.folio(limit - (1 << 12), 12)
    ops.pages(limit - 0x13, 0x10)  # ends 3 pages below the top
    ops.folio(limit, 0)  # one beyond: PFN_PHYS wraps to 0 in C
    ops.pages(limit - 2, 4)  # runs past the top
    ops.unfolio(limit - 8, 3)
    ops.kexec()
    ops.restore_folio(limit - 1).restore_folio(limit - (1 << 12)).restore_pages(limit - 0x13, 0x10)
    ops.restore_folio(0)
    return [Scenario("scenario.highest-pfns", _program(standard_header(P), ops),
                     f"The top representable pfns (2^{64 - P}-1 and aligned blocks below it), a range "
                     "ending just below the top; then one pfn beyond and a range running past it (out of "
                     "domain). None of it is RAM: the next kernel touches only phantom struct pages.")]


def _numa_crossing(P: int) -> list[Scenario]:
    # Node 1 sits inside node 0's span at [0x1006, 0x1007): 0 appears twice.
    header = standard_header(P, numa=((0, 0), (0x1006, 1), (0x1007, 0), (0x2005, 2), (NUMA_SPLIT, 1)))
    ops = _Ops(P)
    ops.pages(0x1000, 0x10)  # both ends in node 0, node 1 inside
    ops.pages(0x2000, 0x10)  # crosses 0 -> 2 at 0x2005
    ops.pages(NUMA_SPLIT - 0x20, 0x40)  # crosses 2 -> 1 at an aligned boundary
    ops.pages(0x3000, 0x10)
    ops.unpages(0x3000, 0x10)
    ops.kexec()
    ops.restore_pages(NUMA_SPLIT - 0x20, 0x40).restore_pages(0x2000, 0x10).restore_pages(0x1000, 0x10)
    return [Scenario("scenario.numa-crossing", _program(header, ops),
                     "preserve_pages ranges crossing NUMA boundaries, aligned and not, and one in a "
                     "non-monotonic layout (0, 1, 0) whose two ends share a node while the middle "
                     "does not; then restore_pages of each range.")]


def _ram_holes(P: int) -> list[Scenario]:
    # Holes at [0x5000, 0x6000) and [0x20000, 0x20100): clear of the arena
    # and the scratch area at every page shift.
    header = standard_header(P, ram=((0, 0x5000), (0x6000, 0x2_0000), (0x2_0100, RAM_PFNS)))
    ops = _Ops(P)
    ops.folio(0x4FF0, 3)  # RAM just before the first hole
    ops.folio(0x6000, 4)  # first RAM pages after it
    ops.folio(0x5800, 2)  # inside the hole
    ops.pages(0x4FFC, 8)  # straddles the hole's start
    ops.pages(0x2_00F0, 0x20)  # straddles the second hole's end
    ops.kexec()
    ops.restore_folio(0x4FF0).restore_folio(0x6000).restore_folio(0x5800)
    ops.restore_pages(0x4FFC, 8).restore_pages(0x2_00F0, 0x20).restore_folio(0x5801)
    return [Scenario("scenario.ram-holes", _program(header, ops),
                     "Folios and ranges beside, inside and across holes in RAM; restoring a hole pfn "
                     "finds no struct page and fails without a warning.")]


def _alloc_failures(P: int) -> list[Scenario]:
    ops = _Ops(P)
    ops.folio(0x10, 0).folio(0x400, 3)
    ops.pages(0x1003, 0x2D)  # several orders: the allocation can fail mid-range
    ops.pages(0x1_2345, 0x40)
    ops.subtree("blob", 0x1234_0000, 0x99)
    ops.folio(0x7_0000, 6)
    ops.kexec()
    ops.restore_folio(0x10).restore_folio(0x400).restore_pages(0x1003, 0x2D)
    ops.restore_pages(0x1_2345, 0x40).restore_folio(0x7_0000).retrieve("blob").retrieve(BOOT_SUBTREE)
    base = _program(standard_header(P), ops)
    n = allocations(base)
    boot = allocations(_program(base.header, ()))
    return [
        Scenario(f"scenario.alloc-failure-{i}", replace(base, header=replace(base.header, fail_alloc=i)),
                 f"The base allocation program (boot + 3 folios + 2 ranges, {n} page allocations) with "
                 f"allocation {i} failing: " + ("KHO init fails and stays off." if i <= boot else
                                               "one op fails with -ENOMEM and rolls back."))
        for i in range(1, n + 1)
    ]


def _subtrees(P: int) -> list[Scenario]:
    ops = _Ops(P)
    ops.subtree("alpha", 0x1111_0000, 0x10).subtree("beta", 0x2222_0000, 0x20)
    ops.unsubtree(0x1111_0000)
    ops.subtree("alpha", 0x3333_0000, 0x30)  # re-added with another blob
    ops.subtree("beta", 0x4444_0000, 0x40)  # duplicate: -EEXIST
    ops.subtree(BOOT_SUBTREE, 0x5555_0000, 0x50)  # duplicate of the boot's own: -EEXIST
    ops.unsubtree(0x9999_0000)  # no such blob: nothing happens
    ops.subtree("gamma", 0x2222_0000, 0x60)  # same blob as beta
    ops.unsubtree(0x2222_0000)  # removes one of them
    ops.kexec()
    for name in ("alpha", "beta", "gamma", BOOT_SUBTREE, "missing"):
        ops.retrieve(name)
    return [Scenario("scenario.subtrees", _program(standard_header(P), ops),
                     "Add, remove, re-add; duplicate names get -EEXIST; two names for one blob and a "
                     "removal by that blob; retrieve each name after kexec.")]


def _long_name(i: int) -> str:
    return f"subtree-{i:04d}-".ljust(MAX_NAME, "x")


@functools.cache
def _subtrees_that_fit(P: int) -> int:
    """How many long-named subtrees the boot FDT page takes, by the model's
    own FDT code (the sequence kho_add_subtree runs). Every such subtree
    grows the packed FDT by the same number of bytes (the property names are
    already in the strings block), so two real additions give the step and
    the rest is arithmetic: filling a 64 KiB page one by one would cost
    seconds of pure-Python FDT editing."""
    fdt = _old_kernel(_program(standard_header(P), ())).fdt
    assert fdt is not None
    page_size = 1 << P
    probe = Fdt(bytearray(fdt.buf))
    sizes = [probe.totalsize()]
    for i in range(2):
        assert kho_add_subtree(probe, page_size, _long_name(i), 0x1_0000_0000 + (i << 12), i) == 0
        sizes.append(probe.totalsize())
    step = sizes[1] - sizes[0]
    assert sizes[2] - sizes[1] == step
    return 2 + (page_size - sizes[2]) // step


def _subtree_overflow(P: int) -> list[Scenario]:
    """Fill the FDT page: the count is found by running the model's FDT, so
    the program is right by construction for every page size."""
    header = standard_header(P)
    fits = _subtrees_that_fit(P)
    ops = _Ops(P)
    for i in range(fits + 2):  # the last two fail with -ENOMEM
        ops.subtree(_long_name(i), 0x1_0000_0000 + (i << 12), i)
    for i in (0, fits // 2, fits - 1):
        ops.unsubtree(0x1_0000_0000 + (i << 12))
    for i in (fits, fits + 1, fits + 2, fits + 3):  # three fit again, the fourth does not
        ops.subtree(_long_name(i), 0x1_0000_0000 + (i << 12), i)
    ops.kexec()
    for i in (0, 1, fits // 2, fits - 1, fits, fits + 2, fits + 3):
        ops.retrieve(_long_name(i))
    return [Scenario("scenario.subtree-overflow", _program(header, ops),
                     f"Add subtrees with {MAX_NAME}-byte names until the FDT page is full ({fits} fit at "
                     f"page shift {P}, then -ENOMEM), remove three, add again until full.")]


PROBE = "probe".ljust(MAX_NAME, "x")  # the subtree whose addition meets the full page
_SUBTREE_FIXED_BYTES = 48  # FDT growth of a subtree besides its name: node tags and two u64 properties


def _growth(name_len: int) -> int:
    return _SUBTREE_FIXED_BYTES + (name_len + 4) // 4 * 4  # the name with its NUL, 4-aligned


def _parts(consume: int, smallest: int, largest: int) -> list[int] | None:
    """Growths in [smallest, largest] (multiples of 4) adding up to ``consume``."""
    if consume == 0:
        return []
    count = -(-consume // largest)
    if consume < count * smallest:
        return None
    parts = [consume // count // 4 * 4] * count
    parts[0] += consume - sum(parts)
    return parts if all(smallest <= p <= largest for p in parts) else None


def _fdt_edge(P: int) -> list[Scenario]:
    """The FDT page exhausted at every offset of a subtree's growth: fill it
    to the brim, bring the free space down to the lowest value the layout
    can reach, then raise it 4 bytes at a time (a filler swapped for one with
    a shorter name: every value the layout can reach, checked on the model's
    FDT) up to the probe subtree's growth, adding the probe at each: it fails
    in add_subnode, in either setprop (which must leave no half node behind),
    or fits."""
    header = standard_header(P)
    old = model.OldKernel(header, _LAYOUT_PROFILE)
    old.boot()
    ops = _Ops(P)

    def emit(op: Op, a: int = 0, b: int = 0, c: int = 0, name: str = "") -> int:
        ops.add(op, a, b, c, name=name)
        return old.apply(ops.steps[-1]).value

    def free() -> int:
        return old.geo.page_size - old.fdt.totalsize()

    probe_growth, smallest = _growth(MAX_NAME), _growth(15)
    fillers = dict.fromkeys(range(emit(Op.FILL_FDT, 0, 1 << 20, MAX_NAME)), probe_growth)  # index -> growth

    def swap(index: int, growth: int) -> None:
        emit(Op.REMOVE_SUBTREE, filler_blob(index, P))
        del fillers[index]
        if growth:
            new = max(fillers) + 1
            emit(Op.FILL_FDT, new, 1, growth - _SUBTREE_FIXED_BYTES - 1)
            fillers[new] = growth

    lowest = free() % 4
    for removals in (1, 2, 3):
        plan = _parts(free() + removals * probe_growth - lowest, smallest, probe_growth)
        if plan is not None:
            break
    assert plan is not None
    for _ in range(removals):
        swap(max(fillers), 0)
    for growth in plan:
        new = max(fillers) + 1
        emit(Op.FILL_FDT, new, 1, growth - _SUBTREE_FIXED_BYTES - 1)
        fillers[new] = growth
    covered = []
    while True:
        assert free() % 4 == lowest, (P, free())
        covered.append(free())
        emit(Op.ADD_SUBTREE, 0x5_0000_0000, 0x42, name=PROBE)
        emit(Op.REMOVE_SUBTREE, 0x5_0000_0000)
        if free() >= probe_growth:
            break
        shrinkable = [i for i, g in fillers.items() if g - 4 >= smallest]
        swap(shrinkable[-1], fillers[shrinkable[-1]] - 4)
    assert covered == list(range(lowest, probe_growth + 4, 4)), covered  # up to the first that fits
    ops.kexec().retrieve(PROBE).retrieve(filler_name(0, MAX_NAME)).retrieve(BOOT_SUBTREE)
    return [Scenario("scenario.fdt-edge", _program(header, ops),
                     f"Fill the FDT page, then add a subtree with {lowest} + 4k bytes free for every k up to its "
                     f"growth of {probe_growth} bytes ({len(covered)} offsets): it fails in add_subnode, in the first "
                     "or second setprop, or fits; a failure must leave the FDT as it was.")]


def _restore_pages_numa(P: int) -> list[Scenario]:
    # [0x100, 0x110) with node 1 from 0x106: preserved as (0x100, 2) (0x104, 1)
    # (0x106, 1) (0x108, 3). A restore that sizes blocks by alignment alone
    # sees one order-4 block at 0x100.
    header = standard_header(P, numa=((0, 0), (0x106, 1), (0x200, 0), (NUMA_SPLIT, 1)))
    ops = _Ops(P)
    ops.pages(0x100, 0x10)
    ops.pages(0x1F8, 0x10)  # node boundary at 0x200, aligned for the restore side too
    ops.kexec()
    ops.restore_pages(0x100, 0x10).restore_pages(0x1F8, 0x10)
    ops.restore_pages(0x104, 2)  # a block of the first range, if the first restore left it
    return [Scenario("scenario.restore-pages-numa", _program(header, ops),
                     "preserve_pages over a NUMA boundary that is not aligned to the block the restore "
                     "side computes, then restore_pages of exactly the same range: the ABI promises the "
                     "same pages back (and a range over an aligned boundary for contrast).")]


def _range_2_40(P: int) -> list[Scenario]:
    n = 1 << 40
    ops = _Ops(P)
    ops.pages(0x123, n)
    ops.unpages(0x123, n)
    ops.pages(0x5000, n)  # aligned start: one block per node and order
    ops.unpages(0x5000, n)
    ops.pages(0x7_0010, 0x30)  # a small piece to hand over
    ops.kexec()
    ops.restore_pages(0x7_0010, 0x30)
    return [Scenario("scenario.range-2^40", _program(standard_header(P, arena_pages=1024), ops),
                     "preserve then unpreserve a range of 2^40 pages (memory and time must follow the "
                     "number of blocks, not pages); then preserve, hand over and restore a small piece.")]


# Orders of the huge restores: 2^20 struct pages (runs), 2^31 (an int shift
# goes negative: the page loop never ends), 2^32 and 2^40 (an int shift
# wraps: a handful of pages); restore_pages skips 31, the same loop.
HUGE_FOLIO_ORDERS = (20, 31, 32, 40)
HUGE_RANGE_ORDERS = (20, 32, 40)


def _restore_huge(P: int) -> list[Scenario]:
    """One block of 2^k pages headed at pfn 0 (RAM), restored as a folio or a
    range: every struct page of the block is initialised, however far past
    RAM it reaches. One NUMA node, so that the range is one block. (The
    block is preserved as a folio: preserve_pages of 2^32 pages or more
    never ends, finding range-int-shift.)"""
    header = standard_header(P, numa=((0, 0),))
    out = []
    for k in HUGE_FOLIO_ORDERS:
        ops = _Ops(P).folio(0, k).kexec().restore_folio(0).restore_folio(0)
        out.append(Scenario(f"scenario.restore-huge-folio-{k}", _program(header, ops),
                            f"A folio of order {k} at pfn 0, restored: 2^{k} struct pages initialised and "
                            "handed to the managed count; restored again: no magic, NULL and a warning."))
    for k in HUGE_RANGE_ORDERS:
        ops = _Ops(P).folio(0, k).kexec().restore_pages(0, 1 << k)
        out.append(Scenario(f"scenario.restore-huge-pages-{k}", _program(header, ops),
                            f"A folio of order {k} at pfn 0, restored by restore_pages of its 2^{k} pages (the "
                            "one block the range makes)."))
    return out


def _queries(P: int) -> list[Scenario]:
    """is_kho_enabled, is_kho_boot and kho_scratch_overlap in both kernels,
    around the scratch area's edges, after a good and a refused handover."""
    addr, size = SCRATCH
    probes = ((addr, 1), (addr - 1, 1), (addr - 1, 2), (addr + size - 1, 1), (addr + size, 1), (addr + size, 0),
              (0, addr), (0, addr + 1), (addr + 1, (1 << 64) - 1))

    def program(refused: bool) -> Program:
        ops = _Ops(P).add(Op.IS_KHO_ENABLED).add(Op.IS_KHO_BOOT)
        for phys, n in probes:
            ops.add(Op.SCRATCH_OVERLAP, phys, n)
        if refused:
            ops.add(Op.POKE_FDT, 0, 0)
        ops.kexec().add(Op.IS_KHO_ENABLED).add(Op.IS_KHO_BOOT)
        for phys, n in probes[:5]:
            ops.add(Op.SCRATCH_OVERLAP, phys, n)
        return _program(standard_header(P), ops.retrieve(BOOT_SUBTREE))

    off = _program(replace(standard_header(P), fail_alloc=1), _Ops(P).add(Op.IS_KHO_ENABLED).kexec()
                   .add(Op.IS_KHO_BOOT).add(Op.SCRATCH_OVERLAP, addr, 1).restore_folio(0x100))
    return [
        Scenario("scenario.api-queries", program(False),
                 "is_kho_enabled/is_kho_boot before and after kexec, and kho_scratch_overlap (7.3 on; "
                 "-EOPNOTSUPP before) at and around both ends of the scratch area, also wrapping past 2^64."),
        Scenario("scenario.api-queries-refused", program(True),
                 "The same queries when the next kernel refuses the handover (FDT magic poked): not a KHO "
                 "boot, and no scratch areas handed over."),
        Scenario("scenario.api-queries-kho-off", off,
                 "KHO init fails (its first allocation): kho_is_enabled() is false, there is no handover."),
    ]


def _alloc_base(P: int) -> _Ops:
    page = 1 << P
    ops = _Ops(P)
    ops.alloc(0, 1).alloc(1, page + 1).alloc(2, page << MAX_PAGE_ORDER)  # orders 0, 1 and the largest
    ops.alloc(3, (page << MAX_PAGE_ORDER) + 1).alloc(4, 0)  # -E2BIG, -EINVAL
    ops.alloc(5, 3 * page).add(Op.UNPRESERVE_FREE, 5).alloc(6, 4 * page)  # freed: the same block again
    ops.add(Op.UNPRESERVE_FREE, 4)  # an empty slot: nothing
    return ops


def _alloc_preserve(P: int) -> list[Scenario]:
    header = standard_header(P, arena_pages=4096)  # room for an order-10 block
    ops = _alloc_base(P).kexec()
    for slot in (0, 1, 2, 3, 5, 6, 6):  # 3 and 5: empty; 6 twice: the second warns
        ops.add(Op.RESTORE_FREE, slot)
    ops.restore_folio(0)
    base = _program(header, ops)
    n = allocations(base)
    boot = allocations(_program(header, ()))
    return [Scenario("scenario.alloc-preserve", base,
                     "kho_alloc_preserve of 1 byte, a page and a byte, 2^MAX_PAGE_ORDER pages (the largest), one "
                     "byte more (-E2BIG) and 0 (-EINVAL); unpreserve_free and allocate again; after kexec "
                     "restore_free of each slot (an emptied slot does nothing; twice warns).")] + [
        Scenario(f"scenario.alloc-preserve-failure-{i}", replace(base, header=replace(header, fail_alloc=i)),
                 f"scenario.alloc-preserve with allocation {i} of {n} failing: in the folio's allocation "
                 "(-ENOMEM) or in its preservation (the folio is freed again).")
        for i in range(boot + 1, n + 1)
    ]


def _vmalloc(P: int) -> list[Scenario]:
    header = standard_header(P, arena_pages=1024)
    top = geometry(P).huge_vmap_order
    many = chunk_capacity(1 << P) + 1  # one block more than a chunk holds
    ops = _Ops(P)
    ops.vmalloc(0, 0x1000, 8)
    ops.vmalloc(1, 0x4_0000, 2 << top, top)  # two PMD-sized blocks
    ops.vmalloc(2, 0x2_0000, many)  # two chunks
    ops.vmalloc(3, 0x3_0000, 2 * (many - 1))  # a chunk filled exactly: a third, empty one follows
    ops.vmalloc(4, 0x5000, 4, vm_flags=AREA_ALLOC | AREA_MAPPED)  # vmap()'d: -EOPNOTSUPP
    ops.vmalloc(5, 0x5001, 4, 1)  # blocks not aligned: no such area, -EINVAL
    ops.vmalloc(6, 0, 4)  # physical page 0: the chunk list could not hold it
    ops.vmalloc(7, 0x6000, 4).add(Op.UNPRESERVE_VMALLOC, 7)
    ops.kexec()
    for slot in range(8):
        ops.add(Op.RESTORE_VMALLOC, slot)
    ops.add(Op.RESTORE_VMALLOC, 0)  # already restored
    ops.restore_pages(0x6000, 4)  # unpreserved with its area
    return [Scenario("scenario.vmalloc", _program(header, ops),
                     f"kho_preserve_vmalloc of areas of one chunk, of two PMD-sized (order {top}) blocks, of "
                     f"{many} blocks (two chunks) and of a chunk filled exactly; a vmap() area; an area that "
                     "cannot exist; one at physical page 0; one unpreserved again. After kexec each slot is "
                     "restored: the same pages, in order.")]


def _vmalloc_failures(P: int) -> list[Scenario]:
    """Allocation failures inside kho_preserve_vmalloc, for an area of order-1
    blocks whose later blocks need a new leaf (the blocks before it are
    already preserved when it fails) and an area of two chunks."""
    boundary = 1 << (P + 4)  # order-1 keys of pfns from here on start a new leaf
    header = standard_header(P, ram=((0, max(RAM_PFNS, 2 * boundary)),), numa=((0, 0),))
    ops = _Ops(P).vmalloc(0, boundary - 4, 8, 1).vmalloc(1, 0x2_0000, chunk_capacity(1 << P) + 1).kexec()
    ops.add(Op.RESTORE_VMALLOC, 0).add(Op.RESTORE_VMALLOC, 1)
    ops.restore_pages(boundary - 4, 2).restore_pages(boundary - 2, 2)
    base = _program(header, ops)
    n = allocations(base)
    boot = allocations(_program(header, ()))
    return [
        Scenario(f"scenario.vmalloc-failure-{i}", replace(base, header=replace(header, fail_alloc=i)),
                 f"Two vmalloc areas ({n - boot} page allocations after boot) with allocation {i} failing: what "
                 "the failed call preserved must be unpreserved again, block by block.")
        for i in range(boot + 1, n + 1)
    ]


def _vmalloc_corrupt(P: int) -> list[Scenario]:
    """The caller's descriptor corrupted in transit (a poke on the handover
    page at kexec): the next kernel must not restore what it does not list."""
    header = standard_header(P)
    first, meta = vmalloc_slot_word(0), vmalloc_slot_word(0) + 1

    def base() -> _Ops:
        return _Ops(P).folio(0x300, 0).vmalloc(0, 0x1000, 8)

    old = _old_kernel(_program(header, base()))
    handover = old.arena.read(ARENA_BASE_PHYS)
    assert handover is not None and handover.get(first), "the area's descriptor is on the handover page"
    spare = old.arena.hwm + 4  # an arena page no one allocated
    spare_phys = ARENA_BASE_PHYS + (spare << P)
    total_pages, order = 8, 0

    def variant(name: str, description: str, pokes: list[tuple[int, int, int]]) -> Scenario:
        ops = base()
        for page, word, value in pokes:
            ops.add(Op.POKE_ARENA, page, word, value)
        ops.kexec().add(Op.RESTORE_VMALLOC, 0).restore_pages(0x1000, 1).restore_pages(0x1007, 1).restore_folio(0x300)
        return Scenario(f"scenario.vmalloc-corrupt-{name}", _program(header, ops), description)

    return [
        variant("total", "total_pages one more than the chunks list: NULL; the blocks restored so far stay restored.",
                [(0, meta, total_pages + 1 | order << 48)]),
        variant("order", "order 1 instead of 0: the first entry's block does not match: NULL.",
                [(0, meta, total_pages | 1 << 48)]),
        variant("order-40", "order 40: 2^40 pages a block, past total_pages at once: NULL (in int, 1 << 40 "
                "is undefined).", [(0, meta, total_pages | 40 << 48)]),
        variant("first-null", "first chunk 0: an empty list for 8 pages: NULL.", [(0, first, 0)]),
        variant("first-unpreserved",
                "first pointing at a page never preserved, listing a folio that was (0x300): a kernel that "
                "checks the chunk first restores nothing.",
                [(spare, 1, 0x300 << P), (0, first, spare_phys), (0, meta, 1)]),
    ]


def _corrupt_base(P: int) -> _Ops:
    return (_Ops(P).folio(0x10, 0).pages(0x100, 8).folio(0x2_0000, 5)
            .subtree("blob", 0x1234_0000, 0x99))


def _corrupt_tail(ops: _Ops) -> _Ops:
    return ops.kexec().restore_folio(0x10).restore_pages(0x100, 8).retrieve("blob")


def _corrupt(P: int) -> list[Scenario]:
    header = standard_header(P)
    clean = _program(header, _corrupt_base(P))
    o = _outcome(clean)
    fdt = o.fdt
    root_index = arena_index(o.root_phys, P)
    root = o.tree[0]
    assert root.path == () and root.entries, "the root always holds the boot's keys"
    slot = root.entries[0]
    outside = MAX_RAM_PFN << P  # the first page no RAM range can reach

    compat_value = Fdt(fdt).value_offset(0, "compatible")
    map_len = Fdt(fdt).value_offset(0, model.MEMORY_MAP_PROP) - 8

    def variant(name: str, description: str, pokes: Callable[[_Ops], object]) -> Scenario:
        ops = _corrupt_base(P)
        pokes(ops)
        return Scenario(f"scenario.corrupt-{name}", _program(header, _corrupt_tail(ops)), description)

    return [
        variant("bad-magic", "The FDT header magic's first byte zeroed: the next kernel refuses the handover.",
                lambda ops: ops.add(Op.POKE_FDT, 0, 0)),
        variant("compatible", "The first byte of the root's compatible string changed: refused.",
                lambda ops: ops.add(Op.POKE_FDT, compat_value, ord("X"))),
        variant("truncated-property",
                "The preserved-memory-map property's length cut from 8 to 4 bytes: refused.",
                lambda ops: ops.add(Op.POKE_FDT, map_len + 3, 4)),
        variant("pointer-outside-ram",
                f"Root table slot {slot} pointed at {outside:#x}, outside RAM and the image: the "
                "model refuses the tree; the kernel must not dereference it.",
                lambda ops: ops.add(Op.POKE_ARENA, root_index, slot, outside)),
        variant("tree-loop", f"Root table slot {slot} pointed back at the root: the model refuses the loop.",
                lambda ops: ops.add(Op.POKE_ARENA, root_index, slot, o.root_phys)),
    ]


# ---- found by kho-conform mutate: corners the kernel's code has and no scenario reached ----


def _restore_aliases(P: int) -> list[Scenario]:
    alias = 1 << 32  # a pfn outside RAM whose low 32 bits name a preserved page
    ops = _Ops(P).folio(0x100, 0).pages(0x200, 4).folio(0x400, 2)
    ops.kexec()
    ops.restore_folio(alias + 0x100).restore_pages(alias + 0x200, 4).restore_folio(alias + 0x400)
    ops.restore_folio(0x100).restore_pages(0x200, 4).restore_folio(0x400)
    return [Scenario("scenario.restore-aliases", _program(standard_header(P), ops),
                     "Restores at pfn + 2^32 of preserved pages: no RAM there, so they fail and leave "
                     "the real pages preserved; pfns held in 32 bits would restore those instead.")]


def _corrupt_subtree(P: int) -> list[Scenario]:
    header = standard_header(P)
    fdt = Fdt(_outcome(_program(header, _corrupt_base(P))).fdt)
    node = fdt.subnode_offset(0, "blob")
    assert node > 0, "the base program adds the subtree 'blob'"

    def truncated(prop: str) -> Scenario:
        length = fdt.value_offset(node, prop) - 8  # the property's big-endian length, 8 bytes
        # 7 bytes still occupy 8 in the structure block: the other property stays readable.
        ops = _corrupt_base(P).add(Op.POKE_FDT, length + 3, 7)
        return Scenario(f"scenario.corrupt-subtree-{prop}", _program(header, _corrupt_tail(ops)),
                        f"The subtree's {prop} property said to be 7 bytes long in the handover FDT: the "
                        "next kernel takes the handover, and retrieving that subtree fails with -EINVAL.")

    return [truncated(model.SUBTREE_DATA_PROP), truncated(model.SUBTREE_SIZE_PROP)]


def _large_scratch(P: int) -> list[Scenario]:
    # 16 GiB of RAM at 4 KiB pages (more at larger ones); the area starts at 4 GiB.
    scratch = ((1 << 32, (1 << 32) + (1 << 24)),)
    header = standard_header(P, ram=((0, 1 << 22),), scratch=scratch)
    ops = _Ops(P).folio(0x10, 0).kexec().restore_folio(0x10)
    return [Scenario("scenario.large-scratch", _program(header, ops),
                     "A scratch area of 4 GiB + 16 MiB at 4 GiB: the next kernel marks all of it as "
                     "scratch (a size held in 32 bits would mark 16 MiB).")]


_BUILDERS: tuple[Callable[[int], list[Scenario]], ...] = (
    _empty_tree, _every_order, _widest_orders, _pfn_zero, _highest_pfns, _numa_crossing, _ram_holes,
    _alloc_failures, _subtrees, _subtree_overflow, _fdt_edge, _restore_pages_numa, _range_2_40, _restore_huge, _corrupt,
    _queries, _alloc_preserve, _vmalloc, _vmalloc_failures, _vmalloc_corrupt,
    _restore_aliases, _corrupt_subtree, _large_scratch,
)


@functools.cache
def scenarios(page_shift: int) -> tuple[Scenario, ...]:
    """Every scenario for one page shift, in a fixed order (built once: some
    are derived from the model's own runs)."""
    Header(page_shift=page_shift).validate()  # 12, 14 or 16
    out: list[Scenario] = []
    for build in _BUILDERS:
        out += build(page_shift)
    names = [s.name for s in out]
    assert len(names) == len(set(names)), "scenario names must be unique"
    return tuple(out)


def by_name(page_shift: int) -> dict[str, Scenario]:
    return {s.name: s for s in scenarios(page_shift)}
