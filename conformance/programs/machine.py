"""The hypothesis state machine over the op language.

``KhoMachine`` is a module-level ``RuleBasedStateMachine`` whose ``target``
class attribute is the kernel build under test (or a handover from one
kernel to another, a ``Pair``: the rules are the same); ``machine_for(target)`` is
the one-line subclass that binds it, and its ``TestCase`` is what pytest
collects. Rules write a program: random preserve/unpreserve/subtree
sequences, at most one ``kexec``, then restores of what was really
preserved. At teardown the program runs on the model and on the kernel's C
code (``compare.diff``) and ``compare.triage`` decides: only a divergence no
known finding explains fails the example.

Strategies that depend on the page shift are drawn from the machine itself
(``st.runner()``), so one class serves every target.

Domain (mostly realistic, as a caller of the KHO API would use it): folios of
order 0..12 aligned in RAM, page ranges of up to 4096 pages and vmalloc areas
(blocks of up to a PMD, sometimes more than a chunk holds), neither
overlapping each other nor the arena or the scratch area; kho_alloc_preserve
of any size up to past the largest order; the queries, in both kernels; the
standard layout with a NUMA boundary drawn per example (aligned or not); a
small chance of edge values: pfn 0 comes for free, huge orders at the top of
the pfn space, unpreserving what was never preserved, preserving the same
folio twice.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from hypothesis import HealthCheck, Verbosity, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from reference.geometry import MAX_PAGE_ORDER, geometry
from reference.program import AREA_ALLOC, AREA_HUGE, SLOTS, Header, Op, Program, Step
from reference.vmalloc import chunk_capacity

from ..compare.diff import Comparison, Divergence
from ..compare.target import Pair, Target
from ..compare.triage import screen
from .layouts import RAM_PFNS, SCRATCH, busy_pfns, standard_header

DENSE_PFNS = 0x2000  # most ops land here, so that they share tree nodes
ARENA_PAGES = 512
MAX_FOLIO_ORDER = 12
MAX_RANGE = 4096
SUBTREE_NAMES = ("a", "b", "blob", "luo", "memfd-0", "kexec-metadata")  # collisions: -EEXIST

# The default ~25 examples x ~20 steps of the test suite.
TEST_SETTINGS = settings(
    max_examples=25, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class UnknownDivergence(AssertionError):
    """The model and the kernel disagree, and no known finding explains it."""

    def __init__(self, target: Target | Pair, program: Program, cmp: Comparison, divergence: Divergence) -> None:
        self.program = program
        self.divergence = divergence
        self.comparison = cmp
        lines = [f"{target.label}: unknown divergence", f"first: {divergence.line()}  [signature {divergence.signature}]"]
        if cmp.first is not None and cmp.first is not divergence:
            lines.append(f"first overall: {cmp.first.line()}")
        lines += ["program:", program.text().rstrip()]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class _Span:
    start: int
    end: int  # exclusive


class _Free:
    """Pfn ranges in use, to place new preservations where nothing is."""

    def __init__(self, busy: list[tuple[int, int]]) -> None:
        self.busy = [_Span(s, e) for s, e in busy]

    def overlap(self, start: int, end: int) -> _Span | None:
        for span in self.busy:
            if start < span.end and span.start < end:
                return span
        return None

    def place(self, start: int, size: int, align: int, limit: int) -> int | None:
        """The first aligned start at or after ``start`` (wrapping once to 0)
        where [start, start + size) is free and below ``limit``."""
        start -= start % align
        wrapped = False
        for _ in range(4 * len(self.busy) + 4):
            if start + size > limit:
                if wrapped:
                    return None
                start, wrapped = 0, True
            hit = self.overlap(start, start + size)
            if hit is None:
                return start
            start = -(-hit.end // align) * align
        return None

    def take(self, start: int, size: int) -> None:
        self.busy.append(_Span(start, start + size))

    def give_back(self, start: int, size: int) -> None:
        try:
            self.busy.remove(_Span(start, start + size))
        except ValueError:
            pass


def _rare(common: st.SearchStrategy, edge: st.SearchStrategy, one_in: int = 16) -> st.SearchStrategy:
    """``common``, except one time in ``one_in`` (shrinks towards common)."""
    return st.integers(0, one_in - 1).flatmap(lambda k: edge if k == one_in - 1 else common)


def _per_target(strategy_of: Callable[[KhoMachine], st.SearchStrategy]) -> st.SearchStrategy:
    """A strategy that depends on the machine's target (its page shift)."""
    return st.runner().flatmap(strategy_of)


ANYWHERE = st.one_of(st.integers(0, DENSE_PFNS - 1), st.integers(0, RAM_PFNS - 1))
FOLIO_SPEC = _rare(
    st.tuples(st.just(False), ANYWHERE, st.integers(0, MAX_FOLIO_ORDER)),
    # huge folios at the top of the pfn space, outside RAM
    _per_target(lambda m: st.tuples(st.just(True), st.integers(0, 3), st.integers(MAX_FOLIO_ORDER + 1, m.geo.max_order))),
)
# (where, nr_pages, before): with ``before``, the range starts that many
# pages below the NUMA boundary, so that it crosses it
RANGE_SPEC = st.tuples(ANYWHERE, st.one_of(st.integers(1, 64), st.integers(1, MAX_RANGE)),
                       _rare(st.none(), st.integers(1, 64), 4))
NAMES = st.one_of(st.sampled_from(SUBTREE_NAMES),
                  st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=40))
ALLOC_SIZES = _per_target(lambda m: _rare(
    st.integers(1, 4 << m.P),
    st.one_of(st.just(0), st.integers(-1, 1).map(lambda d: (1 << (m.P + MAX_PAGE_ORDER)) + d)), 8))
# (where, blocks, around_a_chunk, huge): ``blocks`` blocks, or with
# ``around_a_chunk`` that many more than a chunk page lists; huge: PMD blocks
VMALLOC_SPEC = st.tuples(ANYWHERE, st.integers(1, 16), _rare(st.none(), st.integers(-2, 2), 8),
                         _rare(st.just(False), st.just(True), 4))
SCRATCH_PROBES = st.tuples(st.sampled_from([SCRATCH[0], SCRATCH[0] + SCRATCH[1]]), st.integers(-2, 2),
                           st.one_of(st.integers(0, 4), st.integers(0, (1 << 64) - 1)))
BOUNDARIES = st.one_of(
    st.sampled_from([0x8000, 0x2_0000, 0x8_0000]),  # section-aligned, as on real machines
    st.integers(1, DENSE_PFNS),  # anywhere among the ops: crosses ranges at odd places
)


class KhoMachine(RuleBasedStateMachine):
    """Bind to a build with ``machine_for(target)``."""

    target: ClassVar[Target | Pair]
    examples_run: ClassVar[int] = 0
    steps_run: ClassVar[int] = 0

    folios = Bundle("folios")  # (pfn, order) really preserved
    ranges = Bundle("ranges")  # (pfn, nr_pages) really preserved
    subtrees = Bundle("subtrees")  # (name, phys) added (or refused: -EEXIST)
    allocations = Bundle("allocations")  # alloc slots kho_alloc_preserve wrote
    areas = Bundle("areas")  # (slot, pfn, nr_pages) of vmalloc preservations

    def __init__(self) -> None:
        super().__init__()
        self.P = self.target.page_shift
        self.geo = geometry(self.P)
        self.steps: list[Step] = []
        self.kexeced = False
        self.boundary = 0x8_0000
        self.free = _Free(busy_pfns(self.header()))
        self.free_slots = {Op.ALLOC_PRESERVE: list(range(SLOTS)), Op.PRESERVE_VMALLOC: list(range(SLOTS))}

    # ---- helpers -------------------------------------------------------
    def emit(self, op: Op, *operands: int, name: str = "") -> None:
        self.steps.append(Step(op, *operands, name=name))

    def header(self) -> Header:
        return standard_header(self.P, numa=((0, 0), (self.boundary, 1)), arena_pages=ARENA_PAGES)

    def program(self) -> Program:
        steps = list(self.steps)
        if not self.kexeced:
            steps.append(Step(Op.KEXEC))  # always check the handover
        return Program(self.header(), tuple(steps))

    def place_folio(self, spec: tuple[bool, int, int]) -> tuple[int, int] | None:
        huge, where, order = spec
        if huge:  # aligned near the top of the pfn space, far outside RAM
            pfn_limit = 1 << (64 - self.P)
            slots = (pfn_limit >> order) - 1  # never slot 0: that block would cover RAM
            return pfn_limit - ((where % slots + 1) << order), order
        pfn = self.free.place(where, 1 << order, 1 << order, RAM_PFNS)
        if pfn is None:
            return None
        self.free.take(pfn, 1 << order)
        return pfn, order

    def drop_folio(self, op: Op, folio: tuple[int, int]) -> None:
        pfn, order = folio
        self.emit(op, pfn, order)
        self.free.give_back(pfn, 1 << order)

    # ---- the header ----------------------------------------------------
    @initialize(boundary=BOUNDARIES)
    def numa_layout(self, boundary: int) -> None:
        self.boundary = boundary

    # ---- old kernel ----------------------------------------------------
    # Rules are drawn uniformly, so variants of one op (the direct radix
    # API, a duplicate, an absent folio) are branches of one rule rather
    # than rules of their own: folios and page ranges get equal shares.
    @precondition(lambda self: not self.kexeced)
    @rule(target=folios, spec=FOLIO_SPEC, direct=st.booleans())
    def preserve_folio(self, spec, direct):
        placed = self.place_folio(spec)
        if placed is None:
            return multiple()
        self.emit(Op.RADIX_ADD if direct else Op.PRESERVE_FOLIO, *placed)
        return placed

    @precondition(lambda self: not self.kexeced)
    @rule(target=folios, folio=folios)
    def preserve_folio_again(self, folio):
        """The same folio twice: one bit, two bundle entries."""
        self.emit(Op.PRESERVE_FOLIO, *folio)
        return folio

    @precondition(lambda self: not self.kexeced)
    @rule(folio=consumes(folios), direct=st.booleans())
    def unpreserve_folio(self, folio, direct):
        self.drop_folio(Op.RADIX_DEL if direct else Op.UNPRESERVE_FOLIO, folio)

    @precondition(lambda self: not self.kexeced)
    @rule(target=ranges, spec=RANGE_SPEC)
    def preserve_pages(self, spec):
        where, n, before = spec
        if before is not None:
            where, n = max(self.boundary - before, 0), max(n, before + 1)
        pfn = self.free.place(where, n, 1, RAM_PFNS)
        if pfn is None:
            return multiple()
        self.free.take(pfn, n)
        self.emit(Op.PRESERVE_PAGES, pfn, n)
        return pfn, n

    @precondition(lambda self: not self.kexeced)
    @rule(pages=consumes(ranges))
    def unpreserve_pages(self, pages):
        pfn, n = pages
        self.emit(Op.UNPRESERVE_PAGES, pfn, n)
        self.free.give_back(pfn, n)

    @precondition(lambda self: not self.kexeced)
    @rule(where=ANYWHERE, order=st.integers(0, MAX_FOLIO_ORDER), pages=st.booleans())
    def unpreserve_absent(self, where, order, pages):
        """Unpreserve what nobody preserved: the kernel warns per block."""
        pfn = self.free.place(where, 1 << order, 1 << order, RAM_PFNS)
        if pfn is not None:
            self.emit(Op.UNPRESERVE_PAGES if pages else Op.UNPRESERVE_FOLIO, pfn, (1 << order) if pages else order)

    @precondition(lambda self: not self.kexeced)
    @rule(target=subtrees, name=NAMES, where=st.integers(0, RAM_PFNS - 1), size=st.integers(0, 1 << 20))
    def add_subtree(self, name, where, size):
        phys = where << self.P
        self.emit(Op.ADD_SUBTREE, phys, size, name=name)
        return name, phys

    @precondition(lambda self: not self.kexeced)
    @rule(subtree=consumes(subtrees))
    def remove_subtree(self, subtree):
        self.emit(Op.REMOVE_SUBTREE, subtree[1])

    @precondition(lambda self: not self.kexeced and self.free_slots[Op.ALLOC_PRESERVE])
    @rule(target=allocations, size=ALLOC_SIZES)
    def alloc_preserve(self, size):
        slot = self.free_slots[Op.ALLOC_PRESERVE].pop()
        self.emit(Op.ALLOC_PRESERVE, slot, size)
        return slot

    @precondition(lambda self: not self.kexeced)
    @rule(slot=consumes(allocations))
    def unpreserve_free(self, slot):
        self.emit(Op.UNPRESERVE_FREE, slot)
        self.free_slots[Op.ALLOC_PRESERVE].append(slot)

    @precondition(lambda self: not self.kexeced and self.free_slots[Op.PRESERVE_VMALLOC])
    @rule(target=areas, spec=VMALLOC_SPEC)
    def preserve_vmalloc(self, spec):
        """An area of whole blocks; now and then about a chunk's worth of them."""
        where, blocks, around_a_chunk, huge = spec
        order = self.geo.huge_vmap_order if huge else 0
        if around_a_chunk is not None:
            blocks = chunk_capacity(self.geo.page_size) + around_a_chunk
        nr_pages = blocks << order
        pfn = self.free.place(where, nr_pages, 1 << order, RAM_PFNS)
        if pfn is None:
            return multiple()
        self.free.take(pfn, nr_pages)
        slot = self.free_slots[Op.PRESERVE_VMALLOC].pop()
        self.emit(Op.PRESERVE_VMALLOC, slot, pfn, nr_pages, order, AREA_ALLOC | (AREA_HUGE if order else 0))
        return slot, pfn, nr_pages

    @precondition(lambda self: not self.kexeced)
    @rule(area=consumes(areas))
    def unpreserve_vmalloc(self, area):
        slot, pfn, nr_pages = area
        self.emit(Op.UNPRESERVE_VMALLOC, slot)
        self.free.give_back(pfn, nr_pages)
        self.free_slots[Op.PRESERVE_VMALLOC].append(slot)

    @rule(kind=st.integers(0, 2), probe=SCRATCH_PROBES)
    def query(self, kind, probe):
        """is_kho_enabled, is_kho_boot, kho_scratch_overlap: either kernel."""
        if kind == 2:
            edge, delta, size = probe
            self.emit(Op.SCRATCH_OVERLAP, (edge + delta) % (1 << 64), size)
        else:
            self.emit(Op.IS_KHO_ENABLED if kind else Op.IS_KHO_BOOT)

    # ---- handover ------------------------------------------------------
    @precondition(lambda self: not self.kexeced)
    @rule()
    def kexec(self):
        self.emit(Op.KEXEC)
        self.kexeced = True

    # ---- next kernel ---------------------------------------------------
    @precondition(lambda self: self.kexeced)
    @rule(folio=folios)
    def restore_folio(self, folio):
        self.emit(Op.RESTORE_FOLIO, folio[0] << self.P)

    @precondition(lambda self: self.kexeced)
    @rule(pages=ranges)
    def restore_pages(self, pages):
        self.emit(Op.RESTORE_PAGES, pages[0] << self.P, pages[1])

    @precondition(lambda self: self.kexeced)
    @rule(subtree=subtrees, other=_rare(st.none(), NAMES, 8))
    def retrieve_subtree(self, subtree, other):
        """A name that was added, or now and then any name (-ENOENT)."""
        self.emit(Op.RETRIEVE_SUBTREE, name=subtree[0] if other is None else other)

    @precondition(lambda self: self.kexeced)
    @rule(slot=allocations)
    def restore_free(self, slot):
        self.emit(Op.RESTORE_FREE, slot)

    @precondition(lambda self: self.kexeced)
    @rule(area=areas)
    def restore_vmalloc(self, area):
        self.emit(Op.RESTORE_VMALLOC, area[0])

    @precondition(lambda self: self.kexeced)
    @rule(where=ANYWHERE, name=NAMES, kind=st.integers(0, 2))
    def restore_never_preserved(self, where, name, kind):
        """Always possible after kexec: a page or a name nobody handed over."""
        pfn = self.free.place(where, 1, 1, RAM_PFNS)
        if kind == 2 or pfn is None:
            self.emit(Op.RETRIEVE_SUBTREE, name=name)
        elif kind == 1:
            self.emit(Op.RESTORE_PAGES, pfn << self.P, 1)
        else:
            self.emit(Op.RESTORE_FOLIO, pfn << self.P)

    # ---- the check -----------------------------------------------------
    def teardown(self) -> None:
        cls = type(self)
        cls.examples_run += 1
        cls.steps_run += len(self.steps)
        program = self.program()
        cmp, verdict = screen(program, self.target)
        if verdict.status == "fail":
            raise UnknownDivergence(self.target, program, cmp, verdict.divergence)


def machine_for(target: Target | Pair) -> type[KhoMachine]:
    """``KhoMachine`` bound to ``target``; its ``TestCase`` runs with the
    test suite's settings."""
    name = "KhoMachine_" + re.sub(r"\W+", "_", target.label).strip("_")
    machine = type(name, (KhoMachine,), {"target": target, "examples_run": 0, "steps_run": 0})
    machine.TestCase.settings = TEST_SETTINGS
    return machine


def run_stateful(target: Target | Pair, max_examples: int = 25, seed: int | None = None, step_count: int = 20,
                 on_failure: Callable[[Program, Divergence], None] | None = None) -> tuple[bool, str]:
    """Run the machine against ``target`` (for ``kho-conform check``).
    Returns (ok, one line): the examples run, or the (shrunk) failing
    program's first unknown divergence. ``on_failure`` receives that program
    and divergence (to save a reproducer)."""
    machine = machine_for(target)
    runner = hypothesis_seed(seed)(machine) if seed is not None else machine
    s = settings(
        max_examples=max_examples, stateful_step_count=step_count, deadline=None, database=None,
        verbosity=Verbosity.quiet, report_multiple_bugs=False, print_blob=False,
        suppress_health_check=list(HealthCheck),
    )
    try:
        run_state_machine_as_test(runner, settings=s)
    except UnknownDivergence as e:
        if on_failure is not None:
            on_failure(e.program, e.divergence)
        nsteps = len(e.program.steps)
        return False, f"{e.divergence.line()} [signature {e.divergence.signature}; shrunk program of {nsteps} ops]"
    except Exception as e:  # a crash in the driver or the model is a failure too
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return False, f"{type(e).__name__}: {first}"
    return True, f"{machine.examples_run} examples, {machine.steps_run} ops, no unknown divergence"
