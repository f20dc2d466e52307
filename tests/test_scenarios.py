"""The scenario library (conformance.scenarios): every program is valid and
survives the text form, and on 7.2 at page shift 12 the model and the kernel
agree where they should and diverge exactly where a documented kernel bug
says they do.

Kernel bugs asserted here (7.2.13; see the report for 7.1 and 7.3):
- restore_pages sizes its blocks by alignment alone, while preserve_pages
  split the range at the NUMA boundary: a restore of exactly the preserved
  range hands back only the first block and reports success;
- preserve_pages checks the NUMA node of a block's two ends only: with a
  non-monotonic layout (node 0, 1, 0) one block spans node 1;
- preserve_pages/unpreserve_pages/restore_pages advance with ``1 << order`` in
  int: a block of order >= 31 (a range of 2^40 pages) never ends;
- no validation of the (pfn, order) domain: an order past the key width and a
  pfn one past the top are accepted (the model refuses them, -EINVAL);
- the next kernel trusts the tree: a pointer outside RAM is dereferenced, a
  loop is walked.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from conformance.programs.scenarios import HUGE_FOLIO_ORDERS, HUGE_RANGE_ORDERS, allocations, by_name, scenarios
from reference.geometry import PAGE_SHIFTS
from reference.program import NOT_RUN, Op, Program, parse_program

FIXED = {
    "scenario.empty-tree", "scenario.every-order", "scenario.widest-orders", "scenario.pfn-zero",
    "scenario.highest-pfns", "scenario.numa-crossing", "scenario.ram-holes", "scenario.subtrees",
    "scenario.subtree-overflow", "scenario.fdt-edge", "scenario.restore-pages-numa", "scenario.range-2^40",
    "scenario.corrupt-bad-magic", "scenario.corrupt-compatible", "scenario.corrupt-truncated-property",
    "scenario.corrupt-pointer-outside-ram", "scenario.corrupt-tree-loop",
    *(f"scenario.restore-huge-folio-{k}" for k in HUGE_FOLIO_ORDERS),
    *(f"scenario.restore-huge-pages-{k}" for k in HUGE_RANGE_ORDERS),
    "scenario.api-queries", "scenario.api-queries-refused", "scenario.api-queries-kho-off",
    "scenario.alloc-preserve", "scenario.vmalloc",
    *(f"scenario.vmalloc-corrupt-{k}" for k in ("total", "order", "order-40", "first-null", "first-unpreserved")),
    "scenario.restore-aliases", "scenario.corrupt-subtree-preserved-data", "scenario.corrupt-subtree-blob-size",
    "scenario.large-scratch",
}
# Fault-injection sweeps: one scenario per allocation after boot (from 1 for
# the base program, whose boot allocations fail KHO init).
SWEEPS = ("scenario.alloc-failure-", "scenario.alloc-preserve-failure-", "scenario.vmalloc-failure-")
CLEAN = ("scenario.empty-tree", "scenario.pfn-zero", "scenario.subtrees", "scenario.every-order",
         "scenario.subtree-overflow", "scenario.restore-aliases", "scenario.corrupt-subtree-preserved-data",
         "scenario.corrupt-subtree-blob-size", "scenario.large-scratch")
EINVAL = -22


# ---- the library itself (every page shift, no kernel needed) ---------------------


@pytest.mark.parametrize("ps", PAGE_SHIFTS)
def test_library_shape(ps):
    lib = scenarios(ps)
    names = [s.name for s in lib]
    assert len(names) == len(set(names))
    assert FIXED <= set(names)
    failures = sorted(int(n.rsplit("-", 1)[1]) for n in names if n.startswith("scenario.alloc-failure-"))
    base = by_name(ps)["scenario.alloc-failure-1"].program
    assert failures == list(range(1, allocations(replace(base, header=replace(base.header, fail_alloc=0))) + 1))
    swept = {n for n in names if n.startswith(SWEEPS)}
    assert set(names) == FIXED | swept
    for prefix in SWEEPS[1:]:
        numbers = sorted(int(n.rsplit("-", 1)[1]) for n in swept if n.startswith(prefix))
        assert numbers and numbers == list(range(numbers[0], numbers[-1] + 1)), prefix
        last = by_name(ps)[f"{prefix}{numbers[-1]}"].program
        assert allocations(replace(last, header=replace(last.header, fail_alloc=0))) == numbers[-1], prefix
    for s in lib:
        assert re.fullmatch(r"scenario\.[a-z0-9^.-]+", s.name), s.name
        assert s.description
        assert s.program.header.page_shift == ps
        assert s.program.kexec_index() is not None, f"{s.name} has no kexec"
        after = s.program.steps[s.program.kexec_index() + 1 :]
        assert any(st.op in (Op.RESTORE_FOLIO, Op.RESTORE_PAGES, Op.RETRIEVE_SUBTREE) for st in after), s.name


@pytest.mark.parametrize("ps", PAGE_SHIFTS)
def test_programs_validate_and_round_trip(ps):
    for s in scenarios(ps):
        s.program.header.validate()
        assert parse_program(s.program.text()) == s.program, s.name


def test_deterministic():
    assert scenarios(12) == scenarios(12)


# ---- against the kernel: 7.2, page shift 12 ----------------------------------------


@pytest.fixture(scope="module")
def target():
    from kernels import newest_per_series

    from conformance.compare.target import target_for
    from conformance.native.build import build

    source = newest_per_series().get("7.2")
    if source is None:
        pytest.skip("kernel 7.2 is not in the cache: run `kho-conform fetch 7.2`")
    return target_for(build(source, 12))


@pytest.fixture(scope="module")
def results(target):
    from conformance.compare.diff import compare

    return {s.name: compare(s.program, target) for s in scenarios(12)}


def _boot_allocations() -> int:
    base = by_name(12)["scenario.alloc-failure-1"].program
    return allocations(Program(replace(base.header, fail_alloc=0)))


def test_every_scenario_runs_through_compare(results):
    assert set(results) == {s.name for s in scenarios(12)}
    for name, c in results.items():
        assert len(c.model.ops) == len(c.kernel.ops) == len(c.program.steps), name


@pytest.mark.parametrize("name", CLEAN)
def test_clean_scenarios_agree(results, name):
    c = results[name]
    assert c.ok, f"{name}: {c.first.line()}"


def test_the_corners_mutation_testing_found(results):
    """Scenarios added for mutants nothing killed (kho-conform mutate): what
    the model expects there is what a 32-bit pfn or size, or a skipped length
    check, would get wrong."""
    aliases = results["scenario.restore-aliases"].model.ops
    assert [r.rc for r in aliases[-6:-3]] == [-1, -1, -1]  # NULL: no RAM at pfn + 2^32
    assert [(r.rc, r.value) for r in aliases[-3:]] == [(0, 0x100), (0, 0x200), (0, 0x400)]  # the real pages are still there
    for prop in ("preserved-data", "blob-size"):
        c = results[f"scenario.corrupt-subtree-{prop}"]
        assert c.model.next.accepted and c.model.ops[-1].rc == EINVAL
    marks = results["scenario.large-scratch"].model.next.scratch_marks
    assert (1 << 32, (1 << 32) + (1 << 24)) in marks


def test_allocation_failures_after_boot_agree(results):
    boot = _boot_allocations()
    failing = [n for n in results if n.startswith("scenario.alloc-failure-")]
    assert len(failing) > boot
    for name in failing:
        n = int(name.rsplit("-", 1)[1])
        if n > boot:
            c = results[name]
            assert c.ok, f"{name}: {c.first.line()}"
            assert any(r.rc == -12 for r in c.model.ops), f"{name}: allocation {n} failed no op"


def test_allocation_failures_in_boot_agree(results):
    """KHO init fails: every old-kernel op is -EOPNOTSUPP, there is no
    handover, and the restore ops of the (non-KHO) next kernel find nothing."""
    for n in range(1, _boot_allocations() + 1):
        c = results[f"scenario.alloc-failure-{n}"]
        assert c.model.boot.rc == c.kernel.boot.rc == -12
        assert c.ok, f"alloc-failure-{n}: {c.first.line()}"


# -- documented kernel bugs --------------------------------------------------------


def _first(c, check: str, op_index: int | None = None):
    """The first divergence of one check (at one op): the order of records
    that share an op is the diff's business, not these tests'."""
    found = [d for d in c.divergences if d.check == check and (op_index is None or d.op_index == op_index)]
    assert found, f"no {check} divergence at op {op_index}: {[d.line() for d in c.divergences]}"
    return found[0]


def test_restore_pages_ignores_numa_split(results):
    """Preserved as (0x100, 2) (0x104, 1) (0x106, 1) (0x108, 3) because node 1
    starts at 0x106; kho_restore_pages(0x100, 16) restores (0x100, order 4):
    the head's magic says order 2, so 4 pages come back, 12 stay preserved,
    and the call returns success."""
    c = results["scenario.restore-pages-numa"]
    assert min(d.op_index for d in c.divergences) == 3  # the preserve side and the handover agree
    d = _first(c, "ops")
    assert (d.op_index, d.field, d.expected, d.actual) == (3, "value2", "16", "4")
    assert c.kernel.ops[3].rc == 0 and c.kernel.ops[3].value == 0x100  # "success"
    assert c.model.ops[4] == c.kernel.ops[4]  # a range over an aligned node boundary is fine
    # (0x104, 1) kept its magic: restoring it again succeeds in the kernel;
    # in the model it was handed back already (NULL, first bad-magic warning)
    assert (c.kernel.ops[5].rc, c.kernel.ops[5].value2) == (0, 2)
    assert (c.model.ops[5].rc, len(c.model.ops[5].warnings)) == (-1, 1)


def test_preserve_pages_checks_only_the_ends(results):
    """Layout node 0, node 1 at [0x1006, 0x1007), node 0: preserve_pages(0x1000,
    16) has both ends in node 0 and makes one order-4 block across node 1."""
    c = results["scenario.numa-crossing"]
    assert _first(c, "tree").op_index == 0
    walk = {p >> 12: o for p, o in c.kernel.next.walk}
    assert walk[0x1000] == 4
    assert {p >> 12: o for p, o in c.model.next.walk}[0x1000] == 2
    restore = _first(c, "ops")
    assert (restore.op_index, restore.field, restore.expected, restore.actual) == (7, "value2", "16", "4")


def test_range_of_2_40_pages_never_ends(results):
    """``pfn += 1 << order`` in int: a block of order >= 31 overflows; the
    kernel loops until the runtime's CPU budget stops it."""
    c = results["scenario.range-2^40"]
    assert all(r.rc == 0 for r in c.model.ops)
    assert c.kernel.ops[0].rc == NOT_RUN
    assert any("timeout" in e for e in c.kernel.events)
    assert min(d.op_index for d in c.divergences) == 0
    assert "timeout" in _first(c, "events", 0).actual


def test_out_of_domain_accepted(results):
    top = 63 - 12
    c = results["scenario.widest-orders"]
    assert [r.rc for r in c.model.ops[:3]] == [0, 0, 0]  # the largest valid orders agree
    assert min(d.op_index for d in c.divergences) == 3
    d = _first(c, "ops")
    assert (d.op_index, d.op, d.expected, d.actual) == (3, f"preserve_folio 0x0 {top + 1}", str(EINVAL), "0")
    c = results["scenario.highest-pfns"]
    assert [r.rc for r in c.model.ops[:4]] == [r.rc for r in c.kernel.ops[:4]] == [0] * 4
    assert min(d.op_index for d in c.divergences) == 4
    d = _first(c, "ops")
    assert (d.op_index, d.expected, d.actual) == (4, str(EINVAL), "0")
    assert d.op == f"preserve_folio {1 << 52:#x} 0"


@pytest.mark.parametrize("name, reason", [
    ("scenario.corrupt-bad-magic", "FDT header invalid"),
    ("scenario.corrupt-compatible", "not compatible"),
    ("scenario.corrupt-truncated-property", "length 4"),
    ("scenario.corrupt-pointer-outside-ram", "tree pointer outside RAM"),
    ("scenario.corrupt-tree-loop", "tree loop"),
])
def test_corrupt_images_are_refused_by_the_model(results, name, reason):
    c = results[name]
    k = c.program.kexec_index()
    assert c.model.next is not None and c.model.next.accepted is False
    assert reason in c.model.next.reason
    assert c.model.ops[k].rc == EINVAL
    assert [r.rc for r in c.model.ops[k + 1 :]] == [-1, -1, -2]  # nothing restored, no subtree
    assert all(r.rc == 0 for r in c.kernel.ops[:k])  # the pokes themselves agree


@pytest.mark.parametrize("name", ["scenario.corrupt-bad-magic", "scenario.corrupt-compatible",
                                  "scenario.corrupt-truncated-property"])
def test_corrupt_fdt_is_refused_by_the_kernel(results, name):
    c = results[name]
    k = c.program.kexec_index()
    assert c.kernel.next.accepted is False and c.kernel.ops[k].rc == EINVAL
    assert [r.rc for r in c.kernel.ops[k + 1 :]] == [-1, -1, -2]
    assert not any(d.check in ("ops", "next") and d.field in ("rc", "accepted") for d in c.divergences)


def test_kernel_dereferences_pointer_outside_ram(results):
    c = results["scenario.corrupt-pointer-outside-ram"]
    k = c.program.kexec_index()
    assert c.kernel.ops[k].rc == NOT_RUN
    assert any("outside the arena" in e for e in c.kernel.events)


def test_kernel_walks_a_tree_loop(results):
    c = results["scenario.corrupt-tree-loop"]
    k = c.program.kexec_index()
    assert c.kernel.next.accepted is True and c.kernel.ops[k].rc == 0
    d = _first(c, "ops")
    assert (d.op_index, d.field, d.expected, d.actual) == (k, "rc", str(EINVAL), "0")
    assert len(c.kernel.next.walk) > len(c.model.tree)  # root-page words decoded as keys


# -- agreements that once were runtime or model bugs --------------------------------


def test_restore_after_refused_handover_agrees(results):
    """kho_restore_page's WARN_ON_ONCE(magic) fires on a RAM page without the
    magic whether or not a handover was accepted."""
    for name in ("scenario.corrupt-bad-magic", "scenario.corrupt-compatible", "scenario.corrupt-truncated-property"):
        assert results[name].ok, f"{name}: {results[name].first.line()}"


def test_ram_holes_agree(results):
    """A restore_pages that fails on a hole after restoring the blocks before
    it returns NULL, and those blocks' pages stay counted (value2)."""
    c = results["scenario.ram-holes"]
    assert c.ok, c.first.line()
    k = c.program.kexec_index()
    assert (c.kernel.ops[k + 4].rc, c.kernel.ops[k + 4].value2) == (-1, 4)


@pytest.mark.parametrize("ps", (12, 14))
def test_subtree_overflow_fills_the_page_exactly(ps):
    """The count of subtrees that fit is computed, not probed: the model's own
    run must fail exactly where the scenario says the page is full."""
    from reference.model import run
    from reference.profiles import KHO_V4

    s = by_name(ps)["scenario.subtree-overflow"]
    adds = [i for i, st in enumerate(s.program.steps) if st.op == Op.ADD_SUBTREE]
    ops = run(s.program, KHO_V4).ops
    rcs = [ops[i].rc for i in adds]
    fits = len(adds) - 6
    assert rcs == [0] * fits + [-12, -12] + [0, 0, 0, -12]
