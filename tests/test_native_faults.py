"""Fault injection and containment in the native kernel library (driver and runtime).

- ``fail_alloc N``: the N-th page allocation of the old kernel fails. At page
  shift 12 the boot (kho_init) makes 8 allocations: root (1), FDT folio (2),
  the 5 nodes below the root on the FDT's key path (3..7), the kexec-metadata
  folio (8). The program's ops then allocate as annotated in FAULT_PROG.
- a ``poke_arena`` that sends a tree pointer outside the arena: the next
  kernel's walk faults; the runtime records an event and the rest of the
  program is NOT_RUN, the process survives. These run in a child process
  (conftest.run_in_child), see test_fault_in_earlier_loaded_library_is_contained.
- ``restore`` from an image: a corrupted FDT is refused; the C's own image
  reproduces the in-process kexec.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import REPO, SERIES, child_env, get_build
from test_native_smoke import smoke_text

from conformance.native.sanitizer import SANITIZER_ENV, sanitizer_preload
from reference.outcome import EINVAL, ENOENT, ENOMEM, EOPNOTSUPP
from reference.program import ARENA_BASE_PHYS, NOT_RUN, Program, parse_program

BOOT_ALLOCS = 8  # page shift 12, see the module docstring
FAULT_HEADER = "page_shift 12\nscratch 0x100000 0x100000\n"
FAULT_PROG = FAULT_HEADER + """---
preserve_folio 0x10 2          # op 0: a new order-2 path: 5 nodes, allocations 9..13
preserve_folio 0x14 2          # op 1: the same leaf, no allocation
preserve_pages 0x20 5          # op 2: (0x20, 2) in that leaf, (0x24, 0) a new leaf under
                               #       the FDT's level-1 node: allocation 14
add_subtree blob 0x10000 0x40  # op 3: no allocation
kexec                          # op 4: the next kernel never has fault injection armed
restore_folio 0x10000
restore_folio 0x14000
restore_pages 0x20000 5
retrieve_subtree blob
"""
FAILING_OP = {**{n: 0 for n in range(9, 14)}, 14: 2}  # allocation -> the op it belongs to
LAST_ALLOC = 14


def with_fail(program: Program, n: int) -> Program:
    return replace(program, header=replace(program.header, fail_alloc=n))


def without_step(program: Program, i: int) -> Program:
    return replace(program, steps=program.steps[:i] + program.steps[i + 1 :])


@pytest.fixture(scope="module", params=SERIES)
def series(request):
    return request.param


@pytest.mark.parametrize("n", range(1, BOOT_ALLOCS + 1))
def test_boot_allocation_failure(series, n, native_for):
    """Any of the boot's allocations failing: kho_init returns -ENOMEM, KHO
    stays disabled, every old-kernel op and the kexec are -EOPNOTSUPP, no
    handover; with no next kernel, restores return NULL (-1) and
    retrieve_subtree -ENOENT, without running kernel code (no warning)."""
    o = native_for(series, 12).run(with_fail(parse_program(FAULT_PROG), n))
    assert o.boot.rc == -ENOMEM and o.boot.warnings == ()
    assert [r.rc for r in o.ops] == [-EOPNOTSUPP] * 5 + [-1] * 3 + [-ENOENT]
    assert all(r.value == r.value2 == 0 and r.warnings == () for r in o.ops)
    assert o.next is None and o.events == ()
    assert o.tree == () and o.fdt == b"" and o.image is None


@pytest.mark.parametrize("n", range(BOOT_ALLOCS + 1, LAST_ALLOC + 1))
def test_op_allocation_failure_is_rolled_back(series, n, native_for):
    """The failing op returns -ENOMEM and leaves no trace: the whole outcome
    equals that of the program without the op (the nodes a failed add
    allocated are freed, so later adds reuse the same pages)."""
    h = native_for(series, 12)
    prog = parse_program(FAULT_PROG)
    o = h.run(with_fail(prog, n))
    k = FAILING_OP[n]
    assert o.boot.rc == 0
    assert [r.rc for r in o.ops][k] == -ENOMEM
    assert o.events == ()

    ref = h.run(without_step(prog, k))
    assert o.ops[:k] + o.ops[k + 1 :] == ref.ops
    for f in ("root_phys", "tree", "node_pages", "fdt", "image", "next", "events"):
        assert getattr(o, f) == getattr(ref, f), f
    # spelled out: the failed preservation is absent after kexec
    walked = {p for p, _ in o.next.walk}
    if k == 0:
        assert 0x10000 not in walked and 0x14000 in walked
    else:
        assert 0x20000 not in walked and 0x24000 not in walked and 0x10000 in walked


@pytest.mark.parametrize("n", [0, LAST_ALLOC + 1, LAST_ALLOC + 2, 100])
def test_allocation_failure_past_the_old_kernel_is_inert(series, n, native_for):
    """fail_alloc beyond the old kernel's allocations never fires (the next
    kernel, which on 7.3 allocates its busy-block tree, is never armed)."""
    h = native_for(series, 12)
    prog = parse_program(FAULT_PROG)
    o = h.run(with_fail(prog, n))
    assert o == h.run(with_fail(prog, 0))
    assert [(r.rc, r.value, r.value2) for r in o.ops] == [
        (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0),
        (0, 0x10, 4), (0, 0x14, 4), (0, 0x20, 5), (0, 0x10000, 0x40),
    ]


# ---- faults in kernel code ---------------------------------------------------

OUTSIDE = 0x10_0000_0000  # 64 GiB: in the direct map, not backed


def _fault_event(events) -> None:
    assert len(events) == 1, events
    assert re.search(r"fault: Segmentation fault at 0x[0-9a-f]+ \(phys 0x1000000000\), outside the arena", events[0]), events


def test_poked_tree_pointer_faults_the_next_kernel(series, in_child):
    """Root slot 2 holds the order-0 subtree (FDT, metadata). Pointing it at
    unbacked memory makes the next kernel's walk fault: one event, kexec and
    everything after it NOT_RUN, and the child process lives on."""
    bad = parse_program(FAULT_HEADER + f"""---
preserve_folio 0x10 2
poke_arena 1 2 {OUTSIDE:#x}
kexec
restore_folio 0x10000
retrieve_subtree kexec-metadata
""")
    clean = parse_program(FAULT_PROG)
    first, o, last = in_child(series, 12, [("run", clean), ("run", bad), ("run", clean)])
    assert o.boot.rc == 0
    assert [r.rc for r in o.ops] == [0, 0, NOT_RUN, NOT_RUN, NOT_RUN]
    _fault_event(o.events)
    assert o.next is not None and o.next.accepted is False and o.next.walk == ()
    # the old kernel's state at kexec was captured before the fault: the root
    # lists slot 2, whose target is not an arena page and is not followed
    root = o.tree[0]
    assert root.path == () and root.phys == ARENA_BASE_PHYS + 0x1000 and 2 in root.entries
    assert not any(n.path[:1] == (2,) for n in o.tree)
    # containment leaves nothing behind
    assert first == last and first.events == ()


def test_poke_corrupts_only_the_image(series, in_child):
    """Pokes stand for corruption in transit: applied at kexec, so the old
    kernel's add after the poke runs on a sound tree, and the next kernel is
    the one that follows the poisoned slot and faults."""
    bad = parse_program(FAULT_HEADER + f"""---
poke_arena 1 2 {OUTSIDE:#x}
preserve_folio 0x30 0
kexec
restore_folio 0x30000
""")
    (o,) = in_child(series, 12, [("run", bad)])
    assert [r.rc for r in o.ops] == [0, 0, NOT_RUN, NOT_RUN]
    _fault_event(o.events)
    assert o.event_ops == (2,)
    root = o.node_pages[o.root_phys]
    assert int.from_bytes(root[16:24], "little") == OUTSIDE  # the image carries the poke


_TWO_LIBS = r"""
import sys
from conformance.native.build import build
from conformance.source import fetch
from conformance.native.binding import NativeKernel
from reference.program import parse_program
first = NativeKernel(build(fetch(sys.argv[1]), 12))
second = NativeKernel(build(fetch(sys.argv[2]), 12))
ok = parse_program("page_shift 12\n---\npreserve_folio 0x10 0\nkexec\n")
bad = parse_program("page_shift 12\n---\npoke_arena 1 2 0x1000000000\nkexec\n")
first.run(ok)    # initialises the first library's runtime
second.run(ok)   # ... then the second's: its signal handlers replace the first's
print(first.run(bad).events, flush=True)
"""


def test_fault_in_earlier_loaded_library_is_contained():
    get_build("7.1", 12), get_build("7.2", 12)
    proc = subprocess.run([sys.executable, "-c", _TWO_LIBS, "7.1", "7.2"], capture_output=True, text=True,
                          cwd=REPO, env=child_env(), timeout=120)
    assert proc.returncode == 0, f"the process died with {proc.returncode}"
    assert "outside the arena" in proc.stdout


# ---- restore from an image -----------------------------------------------------


def _after_kexec(program: Program) -> tuple[int, tuple]:
    k = program.kexec_index()
    return k, program.steps[k + 1 :]


@pytest.mark.parametrize("ps", [12, 16])
def test_restore_of_own_image_matches_in_process_kexec(series, ps, native_for):
    h = native_for(series, ps)
    prog = parse_program(smoke_text(ps))
    o = h.run(prog)
    k, rest = _after_kexec(prog)
    r = h.restore(o.image, prog.header, rest)
    assert r.ops == o.ops[k:]
    assert r.next == o.next  # walk, walk_nodes, reserved, noinit, scratch marks, magic, phantom
    assert r.next.accepted and len(r.next.walk) == 7
    assert r.events == ()
    # a foreign boot has no old kernel: no old-kernel state is reported
    assert r.boot.rc == 0 and r.tree == () and r.image is None


def test_restore_from_image_with_corrupted_fdt_magic_is_refused(series, native_for):
    h = native_for(series, 12)
    prog = parse_program(FAULT_PROG)
    o = h.run(prog)
    assert o.next.accepted
    bad_fdt = bytes([o.image.fdt[0] ^ 0xFF]) + o.image.fdt[1:]
    image = dataclasses.replace(o.image, fdt=bad_fdt)
    _, rest = _after_kexec(prog)
    r = h.restore(image, prog.header, rest)
    assert r.ops[0].rc == -EINVAL
    n = r.next
    assert n.accepted is False and "invalid" in n.reason
    assert n.walk == n.reserved == n.noinit == n.magic == n.scratch_marks == n.walk_nodes == ()
    # not a KHO boot: restores find no magic (one WARN_ON_ONCE for the
    # first), retrieve_subtree finds no FDT
    assert [(x.rc, x.value, x.value2, len(x.warnings)) for x in r.ops[1:]] == [
        (-1, 0, 0, 1), (-1, 0, 0, 0), (-1, 0, 0, 0), (-ENOENT, 0, 0, 0),
    ]
    assert r.events == ()


def test_poke_fdt_magic_before_kexec_is_refused(series, native_for):
    prog = parse_program(FAULT_HEADER + "---\npreserve_folio 0x10 0\npoke_fdt 0 0\nkexec\nrestore_folio 0x10000\n")
    o = native_for(series, 12).run(prog)
    assert [r.rc for r in o.ops[:3]] == [0, 0, -EINVAL]
    assert o.next.accepted is False and o.next.walk == ()
    assert o.fdt[:4] == b"\x00\r\xfe\xed"
    assert (o.ops[3].rc, len(o.ops[3].warnings)) == (-1, 1)


_WILD = r"""
import ctypes, json, mmap, re
from conformance.native.build import build
from conformance.source import fetch
from conformance.native.binding import NativeKernel
from reference.program import parse_program
h = NativeKernel(build(fetch("7.3"), 12))
# learn the direct map's base from a contained fault at a known phys
o = h.run(parse_program("page_shift 12\n---\npoke_arena 1 2 0x1000000000\nkexec\n"))
base = int(re.search(r"at (0x[0-9a-f]+)", o.events[0]).group(1), 16) - 0x1000000000
# a zero-filled page of this (Python) process, outside the direct map
buf = mmap.mmap(-1, 1 << 16)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
phys = (addr - base) % (1 << 64)
o = h.run(parse_program(f"page_shift 12\n---\npoke_arena 1 2 {phys:#x}\npreserve_folio 0x30 0\nkexec\n"))
print(json.dumps({"phys": hex(phys), "events": list(o.events), "rcs": [r.rc for r in o.ops],
                  "host_memory_written": any(buf[:4096])}))
"""


def test_tree_pointer_beyond_the_direct_map_faults_instead_of_writing_host_memory():
    import json

    get_build("7.3", 12)
    proc = subprocess.run([sys.executable, "-c", _WILD], capture_output=True, text=True, cwd=REPO,
                          env=child_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not r["host_memory_written"], r
    assert r["events"] and "outside the arena" in r["events"][0], r


_BUDGET_CHILD = """
import json, sys
from conformance.compare.target import target_for
from conformance.native.build import build
from conformance.source import fetch
from reference.program import parse_program
program = parse_program("page_shift 12\\nnuma 0x0 0\\n---\\npreserve_pages 0x123 0x10000000000\\n")
outcome = target_for(build(fetch("7.2"), 12, sys.argv[1])).native.run(program)
print(json.dumps([list(outcome.events), [r.rc for r in outcome.ops]]))
"""


@pytest.mark.parametrize("flavor,budget", [("plain", "1 s"), ("fuzz", "500 ms")])
def test_each_flavor_has_its_cpu_budget(flavor, budget):
    """A range of 2^40 pages outlasts any budget (scenario.range-2^40): the
    event names the flavor's own (contract.CPU_BUDGET_MS); fuzzing trades it
    for executions."""
    env = child_env() | ({**SANITIZER_ENV, "LD_PRELOAD": sanitizer_preload(flavor)} if flavor != "plain" else {})
    proc = subprocess.run([sys.executable, "-c", _BUDGET_CHILD, flavor], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events, rcs = json.loads(proc.stdout)
    assert events == [f"timeout: over {budget} of CPU in kernel code"], (events, rcs)
