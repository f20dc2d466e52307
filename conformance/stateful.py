"""A hypothesis ``RuleBasedStateMachine`` over the op language, run against one
kernel build (a ``Target``): random preserve/unpreserve/subtree sequences, at
most one ``kexec``, then restores of what was really preserved; at the end the
program the rules wrote is run on the model and on the kernel's C code and
must agree (``conformance.diff.compare``).

Divergences that ``conformance.known`` documents as kernel bugs do not fail a
run: the module is imported lazily and, when it is absent, nothing is known.
The cross-image records of the same op (``handover:*``) follow the direct
record's verdict (``unexplained``).

Domain (mostly realistic, as a caller of the KHO API would use it): folios of
order 0..12 aligned in RAM, page ranges of up to 4096 pages, neither
overlapping each other nor the arena or the scratch area; a header with RAM
[0, 2^20) and two NUMA nodes whose boundary is drawn per example (aligned or
not); a small chance of edge values: pfn 0 comes for free, huge orders at the
top of the pfn space, unpreserving what was never preserved, preserving the
same folio twice.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import HealthCheck, Verbosity, seed as hypothesis_seed, settings
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

from reference.geometry import geometry
from reference.program import ARENA_BASE_PHYS, Header, Op, Program, Step

from .diff import Comparison, Divergence, Target, compare

RAM_PFNS = 1 << 20
DENSE_PFNS = 0x2000  # most ops land here, so that they share tree nodes
SCRATCH = (0x1000_0000, 0x100_0000)
ARENA_PAGES = 512
MAX_FOLIO_ORDER = 12
MAX_RANGE = 4096
SUBTREE_NAMES = ("a", "b", "blob", "luo", "memfd-0", "kexec-metadata")  # collisions: -EEXIST

# The default ~25 examples x ~20 steps of the test suite.
TEST_SETTINGS = settings(
    max_examples=25, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def is_known(divergence: Divergence, version: str) -> bool:
    """Whether ``conformance.known`` documents this divergence as a kernel
    bug of ``version``. Imported lazily: without the module nothing is known."""
    try:
        from conformance import known
    except ImportError:
        return False
    return bool(known.is_known(divergence, version))


def unexplained(cmp: Comparison, version: str) -> list[Divergence]:
    """The divergences no known kernel bug explains. A ``handover:*`` record
    (the same next-kernel steps run on the other implementation's image) is
    explained by a known divergence of the direct comparison at the same op:
    it is that bug seen through the other image, not a new one. Every other
    record needs a known signature of its own."""
    known_at = {d.op_index for d in cmp.divergences if not d.check.startswith("handover:") and is_known(d, version)}
    return [
        d for d in cmp.divergences
        if not is_known(d, version) and not (d.check.startswith("handover:") and d.op_index in known_at)
    ]


class UnknownDivergence(AssertionError):
    """The model and the kernel disagree, and no known bug explains it."""

    def __init__(self, target: Target, program: Program, cmp: Comparison, unknown: list[Divergence]) -> None:
        self.program = program
        self.divergence = unknown[0]
        self.comparison = cmp
        lines = [
            f"{target.label}: {len(unknown)} unknown divergence(s) "
            f"({len(cmp.divergences) - len(unknown)} known)",
            f"first: {unknown[0].line()}  [signature {unknown[0].signature}]",
        ]
        if cmp.first is not None and cmp.first is not unknown[0]:
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


def machine_for(target: Target) -> type[RuleBasedStateMachine]:
    """A state machine class bound to one kernel build. Its ``TestCase``
    attribute is a unittest class pytest collects."""
    P = target.build.page_shift
    version = target.build.source.version
    geo = geometry(P)
    pfn_limit = 1 << (64 - P)
    arena_first = ARENA_BASE_PHYS >> P
    scratch_first, scratch_pages = SCRATCH[0] >> P, SCRATCH[1] >> P

    anywhere = st.one_of(st.integers(0, DENSE_PFNS - 1), st.integers(0, RAM_PFNS - 1))
    folio_spec = _rare(
        st.tuples(st.just(False), anywhere, st.integers(0, MAX_FOLIO_ORDER)),
        # huge folios at the top of the pfn space, outside RAM
        st.tuples(st.just(True), st.integers(0, 3), st.integers(MAX_FOLIO_ORDER + 1, geo.max_order)),
    )
    # (where, nr_pages, before): with ``before``, the range starts that many
    # pages below the NUMA boundary, so that it crosses it
    range_spec = st.tuples(anywhere, st.one_of(st.integers(1, 64), st.integers(1, MAX_RANGE)),
                           _rare(st.none(), st.integers(1, 64), 4))
    names = st.one_of(st.sampled_from(SUBTREE_NAMES), st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=40))
    boundaries = st.one_of(
        st.sampled_from([0x8000, 0x2_0000, 0x8_0000]),  # section-aligned, as on real machines
        st.integers(1, DENSE_PFNS),  # anywhere among the ops: crosses ranges at odd places
    )

    class KhoMachine(RuleBasedStateMachine):
        folios = Bundle("folios")  # (pfn, order) really preserved
        ranges = Bundle("ranges")  # (pfn, nr_pages) really preserved
        subtrees = Bundle("subtrees")  # (name, phys) added (or refused: -EEXIST)

        examples_run = 0
        steps_run = 0

        def __init__(self) -> None:
            super().__init__()
            self.steps: list[Step] = []
            self.kexeced = False
            self.boundary = 0x8_0000
            self.free = _Free([(arena_first, arena_first + ARENA_PAGES), (scratch_first, scratch_first + scratch_pages)])

        # ---- helpers -------------------------------------------------------
        def emit(self, op: Op, a: int = 0, b: int = 0, name: str = "") -> None:
            self.steps.append(Step(op, a, b, name=name))

        def header(self) -> Header:
            return Header(
                page_shift=P, ram=((0, RAM_PFNS),), numa=((0, 0), (self.boundary, 1)),
                scratch=(SCRATCH,), arena_pages=ARENA_PAGES,
            )

        def program(self) -> Program:
            steps = list(self.steps)
            if not self.kexeced:
                steps.append(Step(Op.KEXEC))  # always check the handover
            return Program(self.header(), tuple(steps))

        def place_folio(self, spec: tuple[bool, int, int]) -> tuple[int, int] | None:
            huge, where, order = spec
            if huge:  # aligned near the top of the pfn space, far outside RAM
                slots = (pfn_limit >> order) - 1  # never slot 0: that block would cover RAM
                return pfn_limit - ((where % slots + 1) << order), order
            pfn = self.free.place(where, 1 << order, 1 << order, RAM_PFNS)
            if pfn is None:
                return None
            self.free.take(pfn, 1 << order)
            return pfn, order

        def add_folio(self, op: Op, spec: tuple[bool, int, int]):
            placed = self.place_folio(spec)
            if placed is None:
                return multiple()
            self.emit(op, *placed)
            return placed

        def drop_folio(self, op: Op, folio: tuple[int, int]) -> None:
            pfn, order = folio
            self.emit(op, pfn, order)
            self.free.give_back(pfn, 1 << order)

        # ---- the header ----------------------------------------------------
        @initialize(boundary=boundaries)
        def numa_layout(self, boundary: int) -> None:
            self.boundary = boundary

        # ---- old kernel ----------------------------------------------------
        # Rules are drawn uniformly, so variants of one op (the direct radix
        # API, a duplicate, an absent folio) are branches of one rule rather
        # than rules of their own: folios and page ranges get equal shares.
        @precondition(lambda self: not self.kexeced)
        @rule(target=folios, spec=folio_spec, direct=st.booleans())
        def preserve_folio(self, spec, direct):
            return self.add_folio(Op.RADIX_ADD if direct else Op.PRESERVE_FOLIO, spec)

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
        @rule(target=ranges, spec=range_spec)
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
        @rule(where=anywhere, order=st.integers(0, MAX_FOLIO_ORDER), pages=st.booleans())
        def unpreserve_absent(self, where, order, pages):
            """Unpreserve what nobody preserved: the kernel warns per block."""
            pfn = self.free.place(where, 1 << order, 1 << order, RAM_PFNS)
            if pfn is not None:
                self.emit(Op.UNPRESERVE_PAGES if pages else Op.UNPRESERVE_FOLIO, pfn, (1 << order) if pages else order)

        @precondition(lambda self: not self.kexeced)
        @rule(target=subtrees, name=names, where=st.integers(0, RAM_PFNS - 1), size=st.integers(0, 1 << 20))
        def add_subtree(self, name, where, size):
            phys = where << P
            self.emit(Op.ADD_SUBTREE, phys, size, name=name)
            return name, phys

        @precondition(lambda self: not self.kexeced)
        @rule(subtree=consumes(subtrees))
        def remove_subtree(self, subtree):
            self.emit(Op.REMOVE_SUBTREE, subtree[1])

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
            self.emit(Op.RESTORE_FOLIO, folio[0] << P)

        @precondition(lambda self: self.kexeced)
        @rule(pages=ranges)
        def restore_pages(self, pages):
            self.emit(Op.RESTORE_PAGES, pages[0] << P, pages[1])

        @precondition(lambda self: self.kexeced)
        @rule(subtree=subtrees, other=_rare(st.none(), names, 8))
        def retrieve_subtree(self, subtree, other):
            """A name that was added, or now and then any name (-ENOENT)."""
            self.emit(Op.RETRIEVE_SUBTREE, name=subtree[0] if other is None else other)

        @precondition(lambda self: self.kexeced)
        @rule(where=anywhere, name=names, kind=st.integers(0, 2))
        def restore_never_preserved(self, where, name, kind):
            """Always possible after kexec: a page or a name nobody handed over."""
            pfn = self.free.place(where, 1, 1, RAM_PFNS)
            if kind == 2 or pfn is None:
                self.emit(Op.RETRIEVE_SUBTREE, name=name)
            elif kind == 1:
                self.emit(Op.RESTORE_PAGES, pfn << P, 1)
            else:
                self.emit(Op.RESTORE_FOLIO, pfn << P)

        # ---- the check -----------------------------------------------------
        def teardown(self) -> None:
            cls = type(self)
            cls.examples_run += 1
            cls.steps_run += len(self.steps)
            program = self.program()
            cmp = compare(program, target)
            unknown = unexplained(cmp, version)
            if unknown:
                raise UnknownDivergence(target, program, cmp, unknown)

    KhoMachine.__name__ = KhoMachine.__qualname__ = f"KhoMachine_{_ident(target.label)}"
    KhoMachine.TestCase.settings = TEST_SETTINGS
    return KhoMachine


def _ident(label: str) -> str:
    return re.sub(r"\W+", "_", label).strip("_")


def run_stateful(target: Target, max_examples: int = 25, seed: int | None = None,
                 step_count: int = 20,
                 on_failure: Callable[[Program, Divergence], None] | None = None) -> tuple[bool, str]:
    """Run the state machine against ``target`` (for ``kho-conform check``).
    Returns (ok, one line): the examples run, or the (shrunk) failing
    program's first unknown divergence. ``on_failure`` receives that program
    and divergence (to save a reproducer)."""
    base = machine_for(target)
    runner = type(base.__name__, (base,), {"examples_run": 0, "steps_run": 0})
    if seed is not None:
        runner = hypothesis_seed(seed)(runner)
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
    except Exception as e:  # a crash in the harness or the model is a failure too
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return False, f"{type(e).__name__}: {first}"
    return True, f"{runner.examples_run} examples, {runner.steps_run} ops, no unknown divergence"
