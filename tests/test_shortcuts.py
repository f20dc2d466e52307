"""Every speed shortcut (reference/shortcuts.py) gives the same results as
the long way: the model's outcome, the comparison's divergences and the
triage verdict, over the seed corpus, the saved findings and a hypothesis
sample of fuzzer inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, get_build
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conformance.bench import fixed_program
from conformance.compare.diff import compare
from conformance.compare.target import target_for
from conformance.compare.triage import screen, triage
from conformance.native.contract import pack_image, pack_memory
from fuzz.decode import decode
from fuzz.findings import iter_findings
from reference import model, quirks, shortcuts
from reference.fdt import Fdt, kho_add_subtree, kho_remove_subtree, kho_root_fdt
from reference.keys import NUMA_ENDPOINTS, NUMA_INSIDE, one_block, range_blocks
from reference.profiles import PROFILES
from reference.program import AREA_ALLOC, AREA_HUGE, Header, Op, Program, Step, parse_program

PAGE_SHIFT = 12


def _target():
    return target_for(get_build("7.2", PAGE_SHIFT))


def _results(program: Program, target, enabled: bool, monkeypatch) -> tuple:
    monkeypatch.setattr(shortcuts, "ENABLED", enabled)
    c = compare(program, target)
    v = triage(c, target)
    # screen(): the same status; what a new divergence is, exactly
    _, s = screen(program, target)
    screened = (s.status, s.divergence, s.new) if s.status == "fail" else s.status
    return (model.run(program, target.profile), [d.to_json() for d in c.divergences],
            v.status, v.divergence, v.new, tuple(k.id for k in v.known), v.quirks, v.next_quirks, screened)


def _same_both_ways(program: Program, target, monkeypatch) -> tuple:
    long_way = _results(program, target, False, monkeypatch)
    short = _results(program, target, True, monkeypatch)
    assert short == long_way, program.text()
    return short


SEEDS = sorted((REPO / "corpus" / "seeds").iterdir())
FINDINGS = [p for p in iter_findings(REPO / "corpus" / "crashes")
            if parse_program((p / "program.txt").read_text()).header.page_shift == PAGE_SHIFT]


@pytest.mark.parametrize("seed", SEEDS, ids=lambda p: p.name)
def test_seed_same_with_and_without_shortcuts(seed: Path, monkeypatch):
    _same_both_ways(decode(seed.read_bytes(), PAGE_SHIFT), _target(), monkeypatch)


def test_findings_same_with_and_without_shortcuts(monkeypatch):
    """Programs that diverge (known findings, planted-free kernels): the
    verdicts, divergences and credited findings do not move."""
    assert FINDINGS
    statuses = {_same_both_ways(parse_program((p / "program.txt").read_text()), _target(), monkeypatch)[2]
                for p in FINDINGS}
    assert statuses - {"pass"}  # the sample has divergences to keep


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=8, max_size=512))
def test_fuzz_inputs_same_with_and_without_shortcuts(data: bytes, monkeypatch):
    _same_both_ways(decode(data, PAGE_SHIFT), _target(), monkeypatch)


def _native_views(calls: list[tuple], enabled: bool, monkeypatch) -> list:
    """The kernel's outcomes of ``calls`` run in turn in one child process
    (each program's reset is what the native shortcut changes), as compared."""
    from conftest import run_in_child

    from conformance.compare.diff import _view

    monkeypatch.setenv("KHO_CONFORM_SHORTCUTS", "1" if enabled else "0")  # read once by the native runtime
    return [(_view(o), o.image) for o in run_in_child("7.2", PAGE_SHIFT, calls)]


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(inputs=st.lists(st.binary(min_size=8, max_size=512), min_size=10, max_size=30))
def test_native_reset_same_with_and_without_shortcuts(inputs: list[bytes], monkeypatch):
    """The runtime zeroes what a program used with memset instead of handing
    it back to the system: the next programs and restores, large and small,
    see the same memory."""
    # A program that leaves many arena pages written, then one that reads
    # them back unallocated (pokes raise the high-water mark): stale bytes
    # would show in its image.
    big = fixed_program(256, PAGE_SHIFT)
    pokes = Program(big.header, tuple(Step(Op.POKE_ARENA, i, 0, 1) for i in range(1, 300)) + (Step(Op.KEXEC),))
    programs = [big, pokes] + [decode(p.read_bytes(), PAGE_SHIFT) for p in SEEDS] + [decode(d, PAGE_SHIFT) for d in inputs]
    calls: list[tuple] = []
    for program in programs:
        calls.append(("run", program))
        k = program.kexec_index()
        image = model.run(program, _target().profile).image
        if k is not None and image is not None:
            calls.append(("restore", image, program.header, program.steps[k + 1 :]))
    assert _native_views(calls, True, monkeypatch) == _native_views(calls, False, monkeypatch)


@settings(max_examples=400, deadline=None)
@given(pfn=st.one_of(st.integers(0, 1 << 20), st.integers(0, (1 << 64) - 1)),
       log2=st.integers(0, 66), kernel=st.booleans(), int_shift=st.booleans(),
       numa=st.sampled_from((NUMA_INSIDE, NUMA_ENDPOINTS)),
       nodes=st.lists(st.tuples(st.integers(0, 1 << 21), st.integers(0, 3)), max_size=4))
def test_one_block_is_the_walk(pfn, log2, kernel, int_shift, numa, nodes):
    """Where one_block answers, the range walk visits exactly that block."""
    header = Header(page_shift=PAGE_SHIFT, ram=((0, 1 << 20),), numa=tuple(sorted(nodes)) or ((0, 0),))
    nr = 1 << log2
    pfn &= ~(nr - 1)  # mostly aligned: the case it answers
    order = one_block(pfn, nr, header, numa, kernel=kernel, int_shift=int_shift)
    if order is None:
        return
    end = (pfn + nr) & ((1 << 64) - 1) if kernel else pfn + nr
    assert list(range_blocks(pfn, end, header, numa, kernel=kernel, int_shift=int_shift)) == [(pfn, order)]


LEAF_KEYS = 1 << 15  # keys per leaf at page shift 12: runs of pages cross leaves here
VMALLOC_QUIRKS = (quirks.VMALLOC_ROLLBACK_ORDER, quirks.VMALLOC_PHYS_ZERO, quirks.NUMA_ENDPOINT_CHECK,
                  quirks.UNVALIDATED_DOMAIN, quirks.RANGE_INT_SHIFT, quirks.PRESERVE_PAGES_ROLLBACK)
AREAS = st.tuples(st.integers(0, 3), st.one_of(st.integers(0, 64), st.integers(1, 40).map(lambda k: k * LEAF_KEYS - 700),
                                              st.integers(0, 1 << 20)),
                  st.integers(1, 3000), st.sampled_from((0, 0, 1, 3, 9)), st.sampled_from((AREA_HUGE, AREA_ALLOC | AREA_HUGE)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(areas=st.lists(AREAS, min_size=1, max_size=4), pages=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 64)),
       max_size=3), unpreserve=st.lists(st.integers(0, 3), max_size=3), fail_alloc=st.sampled_from((0, 0)) | st.integers(8, 40),
       arena_pages=st.sampled_from((12, 20, 256)), numa=st.lists(st.integers(1, 1 << 20), max_size=2),
       profile=st.sampled_from(sorted(PROFILES)), on=st.sets(st.sampled_from(VMALLOC_QUIRKS)))
def test_vmalloc_runs_same_with_and_without_shortcuts(areas, pages, unpreserve, fail_alloc, arena_pages, numa,
                                                      profile, on, monkeypatch):
    """kho_preserve_vmalloc's pages preserved a leaf at a time, and
    unpreserved (by the op, or rolled back after a failure) the same way:
    areas across leaves and chunk pages, over keys already set, running out
    of pages or failing an allocation midway, across NUMA nodes, under the
    quirks that change a range walk. The model's outcome, exactly."""
    pfn_of = {}
    steps = [Step(Op.PRESERVE_PAGES, pfn, n) for pfn, n in pages]
    for slot, pfn, nr, order, flags in areas:
        block = 1 << order
        pfn_of[slot] = pfn - pfn % block
        steps.append(Step(Op.PRESERVE_VMALLOC, slot, pfn - pfn % block, max(nr - nr % block, block), order, flags))
    steps += [Step(Op.UNPRESERVE_VMALLOC, slot) for slot in unpreserve]
    steps += [Step(Op.KEXEC)] + [Step(Op.RESTORE_VMALLOC, slot) for slot in pfn_of]
    header = Header(page_shift=PAGE_SHIFT, fail_alloc=fail_alloc, arena_pages=arena_pages,
                    numa=((0, 0), *((start, i + 1) for i, start in enumerate(sorted(set(numa))))))
    program = Program(header, tuple(steps))
    outcomes = []
    for enabled in (False, True):
        monkeypatch.setattr(shortcuts, "ENABLED", enabled)
        outcomes.append(model.run(program, PROFILES[profile], frozenset(on)))
    assert outcomes[0] == outcomes[1], program.text()
    for step, r in zip(steps, outcomes[1].ops):
        if step.op in (Op.PRESERVE_VMALLOC, Op.UNPRESERVE_VMALLOC):
            event(f"{step.op.name.lower()} rc {r.rc}" + (" warned" if r.warnings else ""))



def _packed_both_ways(programs: list[Program]) -> int:
    """The old kernel's image packed from its pages in memory is the image
    packed from its Outcome (pack_image), byte for byte: how many images."""
    kernel = _target().native
    images = 0
    for program in programs:
        old, memory = kernel._run_old(program)
        if old.image is not None:
            image = old.image
            assert pack_memory(image.fdt_phys, image.scratch_phys, len(image.scratch), image.arena_hwm, memory,
                               kernel.page_size) == pack_image(image, kernel.page_size), program.text()
            images += 1
    return images


def test_native_image_packed_from_memory():
    """Over the seeds, the saved findings and programs whose images hold a
    zero tree page (a leaf emptied), pokes into tree and free pages, and a
    corrupted FDT."""
    programs = [decode(p.read_bytes(), PAGE_SHIFT) for p in SEEDS]
    programs += [parse_program((p / "program.txt").read_text()) for p in FINDINGS]
    programs += [parse_program("page_shift 12\n---\nkexec\n"),
                 parse_program("page_shift 12\n---\npreserve_folio 0x1000 0\nunpreserve_folio 0x1000 0\n"
                               "poke_arena 1 0 0\npoke_arena 40 3 7\nkexec\n"),
                 parse_program("page_shift 12\n---\npreserve_folio 0x1000 0\npoke_fdt 0 0\nkexec\n")]
    assert _packed_both_ways(programs) > len(SEEDS) // 2


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.lists(st.binary(min_size=8, max_size=512), min_size=1, max_size=5))
def test_native_image_packed_from_memory_fuzz_inputs(data: list[bytes]):
    _packed_both_ways([decode(d, PAGE_SHIFT) for d in data])


FDT_NAMES = st.one_of(st.sampled_from(["foo", "foo@1", "bar", "", "@", "preserved-data", "blob-size", "n" * 63]),
                      st.text(alphabet="ab@1-", max_size=8))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(page=st.sampled_from((4096, 4096, 16384)), fill=st.integers(0, 120), width=st.integers(0, 63),
       removes=st.lists(st.integers(0, 120), max_size=6),
       pokes=st.lists(st.tuples(st.integers(0, 200) | st.integers(0, 4095), st.integers(0, 255)), max_size=2),
       adds=st.lists(st.tuples(FDT_NAMES, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), min_size=1, max_size=4))
def test_fdt_add_subtree_same_with_and_without_shortcuts(page, fill, width, removes, pokes, adds, monkeypatch):
    """kho_add_subtree written at once on a packed tree is the long way's
    page, byte for byte (past the tree's end too), return code and
    out-of-bounds flag: on trees filled to no room, with holes from
    removes, with a poked byte (header, reservation map, structure), with
    names already there and names of the properties themselves."""
    monkeypatch.setattr(shortcuts, "ENABLED", False)
    start = kho_root_fdt(page, "kho-v1", 0x1000)
    for i in range(fill):
        kho_add_subtree(start, page, f"{i}".rjust(width, "s"), i, i)
    for i in removes:
        kho_remove_subtree(start, page, i)
    for off, v in pokes:
        start.buf[off] = v
    results = []
    for enabled in (False, True):
        monkeypatch.setattr(shortcuts, "ENABLED", enabled)
        fdt = Fdt(bytearray(start.buf))
        rcs = [kho_add_subtree(fdt, page, name, phys, size) for name, phys, size in adds]
        results.append((rcs, bytes(fdt.buf), fdt.out_of_bounds))
    assert results[0] == results[1]
    event(f"rcs {sorted(set(results[1][0]))}" + (" poked" if pokes else ""))


def _tree_taken_both_ways(programs: list[Program], others: list[Program], monkeypatch) -> tuple[int, int]:
    """The kernel's outcome of each program is the same whether the binding
    reads its tree or takes the model's (``like``): offered the model's
    outcome of the program itself, under every quirk, and of ``others``.
    How often the model's tree was taken, and refused."""
    from conformance.native import binding

    target = _target()
    kernel = target.native
    verdicts: list[bool] = []
    same_tree = binding._same_tree
    monkeypatch.setattr(binding, "_same_tree", lambda *a: verdicts.append(same_tree(*a)) or verdicts[-1])
    likes = [model.run(p, target.profile) for p in others]
    for program in programs:
        read = kernel.run_parts(program)[0]
        for like in (model.run(program, target.profile), model.run(program, target.profile, quirks.ALL), *likes):
            assert kernel.run_parts(program, like=like)[0] == read, program.text()
    return verdicts.count(True), verdicts.count(False)


def test_native_tree_taken_from_the_model_only_when_read_alike(monkeypatch):
    """Over the seeds, the saved findings and trees poked where the kernel
    reads them: a root entry sent outside memory, to an arena page past the
    highest one written, to a table already linked; a table entry back to
    the root; a leaf word changed. (The root is arena page 1, its slot 0
    leads to page 10, the leaves are pages 13 and 14.) A model's tree that
    misses a page the kernel has must not be taken."""
    programs = [decode(p.read_bytes(), PAGE_SHIFT) for p in SEEDS]
    programs += [parse_program((p / "program.txt").read_text()) for p in FINDINGS]
    base = "page_shift 12\narena_pages 64\n---\npreserve_folio 0x1000 0\npreserve_folio 0x80000 3\n"
    poked = [parse_program(base + tail) for tail in (
        "kexec\n", "poke_arena 1 0 0x7fffffffff000\nkexec\n", "poke_arena 1 0 0x40030000\nkexec\n",
        "poke_arena 1 5 0x4000b000\nkexec\n", "poke_arena 10 128 0x40001000\nkexec\n", "poke_arena 14 0 9\nkexec\n",
        # the same entry, to a page this kernel has written (zeros): read as an empty table here, missing in the above
        "poke_arena 48 0 0\npoke_arena 1 0 0x40030000\nkexec\n")]
    taken, refused = _tree_taken_both_ways(programs + poked, poked, monkeypatch)
    assert taken > len(SEEDS) // 2 and refused > len(programs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.lists(st.binary(min_size=8, max_size=512), min_size=1, max_size=4))
def test_native_tree_taken_from_the_model_only_when_read_alike_fuzz_inputs(data: list[bytes], monkeypatch):
    programs = [decode(d, PAGE_SHIFT) for d in data]
    _tree_taken_both_ways(programs, programs, monkeypatch)
