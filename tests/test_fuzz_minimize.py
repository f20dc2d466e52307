"""fuzz.minimize: delta debugging keeps the divergence and drops the rest."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import get_build

from conformance.compare.diff import compare
from conformance.compare.target import target_for
from fuzz.minimize import minimize, minimize_file, signature_predicate
from reference.program import Header, Op, Program, Step, parse_program

# Pages 0..0x1ff: node 0, with node 1 in the middle. The kernel checks only a
# block's two ends, so preserve_pages(0, 0x200) becomes one order-9 block
# across node 1; the model splits at every boundary.
NUMA_BUG = "preserve_pages 0x0 0x200"
NOISE = """\
preserve_folio 0x1000 3
preserve_folio 0x2000 0
add_subtree t1 0x40004000 0x100
preserve_folio 0x3000 2
unpreserve_folio 0x2000 0
preserve_pages 0x8000 0x10
preserve_folio 0x4000 1
{bug}
preserve_folio 0x5000 4
add_subtree t2 0x40008000 0x10
preserve_pages 0x9000 0x3
preserve_folio 0x6000 0
unpreserve_pages 0x9000 0x3
preserve_folio 0x7000 5
kexec
restore_folio 0x1000000
retrieve_subtree t1
restore_pages 0x8000000 0x10
"""
HEADER = """\
page_shift 12
arena_pages 64
ram 0x0 0x100000
ram 0x200000 0x300000
numa 0x0 0
numa 0x100 1
numa 0x180 0
numa 0x90000 2
scratch 0x10000000 0x100000
fail_alloc 40
---
"""


@pytest.fixture(scope="module")
def target():
    return target_for(get_build("7.2", 12))


def long_program() -> Program:
    return parse_program(HEADER + NOISE.format(bug=NUMA_BUG))


def test_fake_predicate_keeps_the_one_op():
    bad = Step(Op.PRESERVE_FOLIO, 0x12345, 3)
    steps = [Step(Op.PRESERVE_FOLIO, i * 8, i % 4) for i in range(40)]
    steps.insert(23, bad)
    program = Program(Header(fail_alloc=7, arena_pages=512, numa=((0, 0), (0x100, 1))), tuple(steps))
    calls = []

    def still_fails(p: Program) -> bool:
        calls.append(p)
        return any(s.op == Op.PRESERVE_FOLIO and s.b == 3 and s.a >= 0x10000 for s in p.steps)

    small = minimize(program, still_fails, budget_runs=400)
    assert len(small.steps) == 1
    (step,) = small.steps
    assert (step.op, step.b) == (Op.PRESERVE_FOLIO, 3) and step.a == 0x10000  # shrunk to a power of two
    assert small.header.fail_alloc == 0 and small.header.numa == ((0, 0),) and small.header.arena_pages == 16
    assert len(calls) <= 400


def test_budget_is_respected():
    program = Program(Header(), tuple(Step(Op.PRESERVE_FOLIO, i, 0) for i in range(40)))
    calls = []
    small = minimize(program, lambda p: calls.append(p) or len(p.steps) > 20, budget_runs=25)
    assert len(calls) <= 25
    assert len(small.steps) > 20  # the predicate still holds for what is returned


def test_real_divergence_minimizes_to_the_numa_op(target):
    program = long_program()
    first = compare(program, target).first
    assert first is not None and first.op == NUMA_BUG, first
    small = minimize(program, signature_predicate(target, first.signature))
    assert [s.text() for s in small.steps] == [NUMA_BUG]
    # the layout that makes it a bug survives: node 1 between two node-0 ranges
    assert (0x100, 1) in small.header.numa and (0x180, 0) in small.header.numa
    assert small.header.fail_alloc == 0 and small.header.scratch == ()
    assert compare(small, target).first.signature == first.signature


def test_minimize_file_writes_beside_the_input(tmp_path, target):
    src = tmp_path / "numa.txt"
    src.write_text(long_program().text())
    out = minimize_file(src, target)
    assert out == tmp_path / "numa.min.txt"
    small = parse_program(out.read_text())
    assert len(small.steps) <= 2 and NUMA_BUG in out.read_text()


def test_minimize_file_refuses_a_passing_program(tmp_path, target):
    from conformance.errors import KhoConformError

    src = tmp_path / "fine.txt"
    src.write_text(replace(long_program(), steps=(Step(Op.PRESERVE_FOLIO, 0x1000, 0),)).text())
    with pytest.raises(KhoConformError, match="does not diverge"):
        minimize_file(src, target)
