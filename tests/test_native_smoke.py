"""Smoke test of the built kernel library: every kernel series x page shift, one
program touching every part of an Outcome, checked against values derived by
hand from the kernel's documented behaviour and the runtime's allocator policy
(lowest free arena page first, arena page 0 = scratch descriptors).

Tree shape per page shift P = 2**ps (include/linux/kho/abi/kexec_handover.h):
a table holds P/8 entries (ps-3 key bits), a leaf P*8 bits (ps+3 key bits), a
key is 64-ps+1 bits wide, so the depth is ceil((64-ps+1 - (ps+3)) / (ps-3)) + 1:
  ps 12: ceil(38/9)+1 = 6,  ps 14: ceil(34/11)+1 = 5,  ps 16: ceil(30/13)+1 = 4.

Old-kernel boot (kho_init) allocates, in this order:
  arena page 1      the radix root (kzalloc / kho_radix_init_tree),
  arena page 2      the FDT folio (kho_alloc_preserve(PAGE_SIZE), order 0),
  pages 3..D+1      the D-1 nodes below the root on the FDT page's key path,
  page D+2          the kexec-metadata blob (73 bytes: u32 + char[65] + u32,
                    packed), an order-0 folio whose key shares the FDT's leaf.
"""

from __future__ import annotations

import gc
import struct

import libfdt
import pytest
from conftest import PAGE_SHIFTS, SERIES
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.native.binding import _op_results, _own_line_hash
from conformance.native.build import line_hash
from conformance.native.contract import _BOUNDED, HEADER, STEP, pack_program
from conformance.native.extract import C_DIR
from reference.outcome import OpResult
from reference.program import ARENA_BASE_PHYS, MAX_NAME, NOT_RUN, U64, Header, Op, Program, Step, is_vm_area, parse_program

GIB = 1 << 30
DEPTH = {12: 6, 14: 5, 16: 4}
API = {"7.1": "page", "7.2": "page", "7.3": "key"}
COMPATIBLE = {"7.1": "kho-v3", "7.2": "kho-v4", "7.3": "kho-v4"}
FDT_MAGIC = bytes.fromhex("d00dfeed")
METADATA_SIZE = 4 + 65 + 4  # struct kho_kexec_metadata, __packed

SCRATCH = ((0x2000_0000, 0x100_0000), (0x3000_0000, 0x80_0000))
SMALL_PFN, SMALL_ORDER = 0x1000, 3
PAGES_PFN, PAGES_NR, NUMA_SPLIT = 0x2000, 0x10, 0x2004
NEVER_PFN, NEVER_ORDER = 0x3000, 5  # the only order-5 key: its path diverges
BLOB_SIZE = 0x1234


def big_order(ps: int) -> int:
    """order + page_shift == 31: a 2 GiB folio, where 7.1's int shift overflows."""
    return 31 - ps


def smoke_text(ps: int) -> str:
    P = 1 << ps
    big_pfn = (4 * GIB) >> ps  # 4 GiB, aligned to 2 GiB
    return f"""
page_shift {ps}
ram 0x0 {(8 * GIB) >> ps:#x}
numa 0x0 0
numa {NUMA_SPLIT:#x} 1
scratch {SCRATCH[0][0]:#x} {SCRATCH[0][1]:#x}
scratch {SCRATCH[1][0]:#x} {SCRATCH[1][1]:#x}
---
preserve_folio {SMALL_PFN:#x} {SMALL_ORDER}
preserve_folio {big_pfn:#x} {big_order(ps)}
preserve_pages {PAGES_PFN:#x} {PAGES_NR:#x}
unpreserve_folio {NEVER_PFN:#x} {NEVER_ORDER}
add_subtree smoke-blob {SMALL_PFN * P:#x} {BLOB_SIZE:#x}
kexec
restore_folio {SMALL_PFN * P:#x}
restore_folio {4 * GIB:#x}
restore_pages {PAGES_PFN * P:#x} 4
restore_pages {NUMA_SPLIT * P:#x} 12
restore_folio {ARENA_BASE_PHYS + 2 * P:#x}
retrieve_subtree smoke-blob
retrieve_subtree kexec-metadata
"""


def key(phys: int, order: int, ps: int) -> int:
    return (1 << (64 - ps - order)) | (phys >> (ps + order))


def key_path(k: int, ps: int) -> tuple[int, ...]:
    """Table indices from the root (level D-1) down to level 1."""
    return tuple((k >> ((level - 1) * (ps - 3) + ps + 3)) & ((1 << (ps - 3)) - 1) for level in range(DEPTH[ps] - 1, 0, -1))


def expected_tree(ps: int, keys: list[int]) -> dict[tuple, tuple]:
    """path -> (level, phys, entries) for keys added in order to a tree whose
    root is arena page 1, with new nodes taken from the arena lowest page
    first, interleaved with the boot's two folio pages (pages 2 and D+2)."""
    D, P = DEPTH[ps], 1 << ps
    table_bits, leaf_bits = ps - 3, ps + 3
    pages = {(): 1}
    bits: dict[tuple, set[int]] = {}
    next_page = 3  # 1: root, 2: FDT folio

    for n, k in enumerate(keys):
        if n == 1:
            next_page += 1  # the metadata folio, allocated between the first two adds
        path: tuple = ()
        for level in range(D - 1, 0, -1):
            path += ((k >> ((level - 1) * table_bits + leaf_bits)) & ((1 << table_bits) - 1),)
            if path not in pages:
                pages[path] = next_page
                next_page += 1
        bits.setdefault(path, set()).add(k & ((1 << leaf_bits) - 1))
    out = {}
    for path, page in pages.items():
        level = D - 1 - len(path)
        if level:
            entries = tuple(sorted(p[-1] for p in pages if len(p) == len(path) + 1 and p[:-1] == path))
        else:
            entries = tuple(sorted(bits[path]))
        out[path] = (level, ARENA_BASE_PHYS + page * P, entries)
    return out


@pytest.mark.parametrize("ps", PAGE_SHIFTS)
@pytest.mark.parametrize("series", SERIES)
def test_smoke(series, ps, build_for, native_for):
    build = build_for(series, ps)
    assert build.api == API[series]
    assert build.compatible == COMPATIBLE[series]
    assert build.library.exists() and build.unit_bytes > 0 and build.page_shift == ps

    h = native_for(series, ps)
    assert h.page_shift == ps
    o = h.run(parse_program(smoke_text(ps)))

    P, D = 1 << ps, DEPTH[ps]
    ob = big_order(ps)
    small, big = SMALL_PFN * P, 4 * GIB
    root_phys = ARENA_BASE_PHYS + 1 * P
    fdt_phys = ARENA_BASE_PHYS + 2 * P
    meta_phys = ARENA_BASE_PHYS + (D + 2) * P

    # ---- old kernel ----
    assert o.boot.rc == 0 and o.boot.warnings == ()
    assert o.events == ()
    assert o.root_phys == root_phys

    ops = [(r.rc, r.value, r.value2) for r in o.ops]
    assert ops == [
        (0, 0, 0),  # preserve_folio small
        (0, 0, 0),  # preserve_folio big
        (0, 0, 0),  # preserve_pages across the NUMA boundary
        (0, 0, 0),  # unpreserve_folio of something never preserved: void, rc 0
        (0, 0, 0),  # add_subtree
        (0, 0, 0),  # kexec: the next kernel accepted the handover
        (0, SMALL_PFN, 1 << SMALL_ORDER),  # restore_folio: pfn, 2**order pages
        (0, big >> ps, 1 << ob),  # every struct page of the big folio initialised
        (0, PAGES_PFN, 4),  # the first NUMA chunk, exactly
        (0, NUMA_SPLIT, 12),  # the order-2 and the order-3 chunk
        (0, fdt_phys >> ps, 1),  # the old FDT folio, order 0
        (0, small, BLOB_SIZE),  # retrieve_subtree smoke-blob: phys, size
        (0, meta_phys, METADATA_SIZE),  # retrieve_subtree kexec-metadata
    ]
    for i, r in enumerate(o.ops):
        if i == 3:
            # kho_radix_del_*: WARN_ON(!node->table[idx]) at the first missing
            # node of the path, then returns: exactly one warning
            assert len(r.warnings) == 1, r.warnings
            assert "table[idx]" in r.warnings[0]
        else:
            assert r.warnings == (), (i, r.warnings)
    assert all(r.rc != NOT_RUN for r in o.ops)

    # ---- FDT ----
    assert o.fdt[:4] == FDT_MAGIC
    assert struct.unpack(">I", o.fdt[4:8])[0] == len(o.fdt)  # totalsize
    assert COMPATIBLE[series].encode() + b"\0" in o.fdt
    fdt = libfdt.Fdt(o.fdt)
    assert fdt.getprop(0, "compatible").as_str() == COMPATIBLE[series]
    # the KHO properties are u64 in CPU (little-endian) byte order
    le64 = lambda off, name: struct.unpack("<Q", bytes(fdt.getprop(off, name)))[0]  # noqa: E731
    assert le64(0, "preserved-memory-map") == root_phys
    blob = fdt.subnode_offset(0, "smoke-blob")
    assert (le64(blob, "preserved-data"), le64(blob, "blob-size")) == (small, BLOB_SIZE)
    meta = fdt.subnode_offset(0, "kexec-metadata")
    assert (le64(meta, "preserved-data"), le64(meta, "blob-size")) == (meta_phys, METADATA_SIZE)

    # ---- tree (old kernel, at kexec) ----
    numa_chunks = [(PAGES_PFN, 2), (NUMA_SPLIT, 2), (0x2008, 3)]
    added = [(fdt_phys, 0), (meta_phys, 0), (small, SMALL_ORDER), (big, ob)] + [(pfn * P, order) for pfn, order in numa_chunks]
    want = expected_tree(ps, [key(p, order, ps) for p, order in added])
    got = {n.path: (n.level, n.phys, n.entries) for n in o.tree}
    assert got == want
    # spelled out for the boot part: root page 1, FDT path pages 3..D+1
    fdt_path = key_path(key(fdt_phys, 0, ps), ps)
    chain = [want[fdt_path[:i]][1] for i in range(1, D)]
    assert chain == [ARENA_BASE_PHYS + page * P for page in range(3, D + 2)]
    assert set(o.node_pages) == {n.phys for n in o.tree}
    assert all(len(b) == P for b in o.node_pages.values())

    # ---- image ----
    img = o.image
    assert img.page_shift == ps and img.fdt_phys == fdt_phys and img.fdt == o.fdt
    assert img.scratch_phys == ARENA_BASE_PHYS
    assert img.scratch == b"".join(struct.pack("<QQ", a, s) for a, s in SCRATCH)
    assert dict(img.pages) == dict(o.node_pages)

    # ---- next kernel ----
    n = o.next
    assert n.accepted is True
    walk = [
        (big, ob),  # highest order: lowest order bit, smallest key
        (small, 3), (0x2008 * P, 3),  # same order: ascending address
        (PAGES_PFN * P, 2), (NUMA_SPLIT * P, 2),
        (fdt_phys, 0), (meta_phys, 0),
    ]
    assert list(n.walk) == walk

    def size(order: int) -> int:
        if series == "7.1" and order + ps >= 31:
            # 7.1 kho_preserved_memory_reserve: sz = 1 << (order + PAGE_SHIFT)
            # is an int shift: 1 << 31 is INT_MIN, sign-extended into the u64
            assert order + ps == 31
            return 0xFFFF_FFFF_8000_0000
        return P << order

    scratch_array = (ARENA_BASE_PHYS, 16 * len(SCRATCH))
    assert list(n.reserved) == [scratch_array] + [(p, size(order)) for p, order in walk]
    assert list(n.noinit) == [(p, size(order)) for p, order in walk]
    assert list(n.magic) == [(p >> ps, order) for p, order in walk]
    assert n.phantom == ()

    marks = list(SCRATCH)
    if series == "7.3":
        # kho_extend_scratch: busy 1 GiB blocks are 0 (the small folio and the
        # pages), 1 (the arena: tree nodes, FDT, metadata) and 4, 5 (the 2 GiB
        # folio at 4 GiB); the gap [2, 4) GiB and [6 GiB, end of DRAM = 8 GiB)
        # become scratch.
        marks += [(2 * GIB, 2 * GIB), (6 * GIB, 2 * GIB)]
    assert list(n.scratch_marks) == marks

    if series == "7.3":
        # the key-API walk reports every node page, in the same depth-first
        # order as the canonical tree
        assert list(n.walk_nodes) == [t.phys for t in o.tree]
    else:
        assert n.walk_nodes == ()
    assert any("found kexec handover data" in line for line in o.log)


@pytest.mark.parametrize("series", SERIES)
@pytest.mark.parametrize("order", [19, 20])  # order + page_shift 31 and 32 at ps 12
def test_reserve_size_at_2g_and_4g(series, order, native_for):
    """The size memblock_reserve()s for a large folio. 7.1 computes it with an
    int shift: 2 GiB becomes 0xffffffff80000000 (GCC's defined result of
    1 << 31); 4 GiB is undefined behaviour and in any case not 4 GiB."""
    ps = 12
    phys = 4 * GIB
    o = native_for(series, ps).run(parse_program(f"page_shift 12\nram 0 {(16 * GIB) >> ps:#x}\n---\npreserve_folio {phys >> ps:#x} {order}\nkexec\n"))
    assert [r.rc for r in o.ops] == [0, 0]
    assert o.next.walk[0] == (phys, order)
    got = dict(o.next.reserved)[phys]
    correct = 1 << (order + ps)
    if series != "7.1":
        assert got == correct
    elif order + ps == 31:
        assert got == 0xFFFF_FFFF_8000_0000
    else:
        assert got != correct


@pytest.mark.parametrize("series", SERIES)
def test_restore_pages_over_numa_split_restores_first_block_only(series, native_for):
    """kho_restore_pages() walks the range in blocks of
    min(ctz(pfn), ilog2(remaining)) without the NUMA split that
    kho_preserve_pages() applied, and counts what kho_restore_page() returns
    for the first block: 16 pages preserved as 4+4+8 come back as one
    block of 4 (value2) and the call still succeeds."""
    o = native_for(series, 12).run(parse_program(
        "page_shift 12\nnuma 0 0\nnuma 0x2004 1\n---\npreserve_pages 0x2000 0x10\nkexec\n"
        "restore_pages 0x2000000 0x10\nrestore_folio 0x2004000\nrestore_folio 0x2008000\n"
    ))
    assert [(r.rc, r.value, r.value2) for r in o.ops] == [
        (0, 0, 0), (0, 0, 0), (0, 0x2000, 4), (0, 0x2004, 4), (0, 0x2008, 8),
    ]


@pytest.mark.parametrize("series", SERIES)
def test_program_without_kexec_has_no_next_kernel(series, native_for):
    o = native_for(series, 12).run(parse_program("page_shift 12\n---\npreserve_folio 0x1000 3\n"))
    assert o.ops[0].rc == 0
    assert o.tree and o.fdt[:4] == FDT_MAGIC  # the old kernel's state is still reported
    assert o.next is None


def test_a_run_leaves_no_reference_cycles_and_the_collector_as_it_was(native_for):
    """The binding holds off the cyclic garbage collector during a run
    (reference.collector), so it must leave no cycles behind."""
    program = parse_program("page_shift 12\n---\npreserve_folio 0x1000 3\nadd_subtree a 0x40001000 0x10\nkexec\n"
                            "restore_folio 0x1000\nretrieve_subtree a\n")
    gc.collect()
    gc.disable()
    try:
        outcome = native_for("7.2", 12).run(program)
        assert [r.rc for r in outcome.ops[:2]] == [0, 0] and outcome.next.accepted
        assert not gc.isenabled()
        assert gc.collect() == 0
    finally:
        gc.enable()
    native_for("7.2", 12).run(program)
    assert gc.isenabled()


@pytest.mark.parametrize("series", SERIES)
def test_the_next_kernel_boots_from_the_image_alone(series, native_for):
    """The old kernel's run ends at kexec and leaves the image; the next
    kernel within the program is that image's restore, like any image's."""
    h = native_for(series, 12)
    program = parse_program("page_shift 12\n---\npreserve_folio 0x1000 3\nkexec\nrestore_folio 0x1000000\n"
                            "restore_folio 0x1000000\n")
    old, _ = h._run_old(program)
    assert old.ops[0].rc == 0 and [r.rc for r in old.ops[1:]] == [NOT_RUN] * 3  # nothing after kexec ran
    assert old.image is not None and old.next is None
    whole, nxt = h.run_parts(program)
    assert nxt == h.restore(old.image, program.header, program.steps[2:])
    assert whole.ops == old.ops[:1] + nxt.ops and whole.next == nxt.next and whole.image == old.image
    assert [r.rc for r in whole.ops] == [0, 0, 0, -1]  # kexec accepted, the folio restored once


@pytest.mark.parametrize("series", SERIES)
def test_log_renders_kernel_pointer_extensions(series, native_for):
    o = native_for(series, 12).run(parse_program(
        "page_shift 12\nscratch 0x20000000 0x1000000\n---\nkexec\n"))
    marked = [line for line in o.log if "as scratch" in line]
    assert marked, o.log
    # %pa prints the phys_addr_t the pointer points to, as 0x%016llx
    assert "0000000020000000" in marked[0] and "0000000001000000" in marked[0], marked


_ANSWER = st.tuples(st.sampled_from([NOT_RUN, 0, -22, 7]), st.integers(0, 3), st.sampled_from([0, 1, 2**64 - 1]))


@settings(max_examples=200, deadline=None)
@given(answers=st.lists(_ANSWER, max_size=24), data=st.data())
def test_op_results_are_the_answers_with_their_warnings_and_pages(answers, data):
    """The binding's OpResults, built from the answers the library keeps one
    per op, are each op's answer with that op's warnings and vmalloc pages;
    records of an op outside the program (boot) belong to none."""
    ops = st.integers(0, len(answers) + 2)
    warns = data.draw(st.dictionaries(ops, st.lists(st.sampled_from(["f:1: a", "g:2: b"]), min_size=1, max_size=2)))
    vmaps = data.draw(st.dictionaries(ops, st.lists(st.tuples(st.integers(0, 9), st.integers(1, 4)), min_size=1, max_size=2)))
    got = _op_results(iter(answers), warns, vmaps)
    assert got == tuple(OpResult(rc, v, v2, tuple(warns.get(i, ())), tuple(vmaps.get(i, ())))
                        for i, (rc, v, v2) in enumerate(answers))
    plain = [i for i in range(len(answers)) if i not in warns and i not in vmaps]
    for i in plain:  # equal plain answers share one object
        assert all(got[i] is got[j] for j in plain if answers[j] == answers[i])


_OPERAND = st.one_of(st.integers(0, 2**64 - 1), st.integers(-(2**70), 2**70), st.sampled_from([-1, 2**64, 0, 5]))


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from([o for o in Op if o not in _BOUNDED]), _OPERAND, _OPERAND, _OPERAND,
                                _OPERAND, _OPERAND, st.sampled_from(["", "a", "blob1", "x" * 40])), max_size=12))
def test_packed_steps_are_the_steps_wrapped_to_u64(steps):
    """Each packed step holds its op, whether its operands name a vmalloc
    area, and its operands as the u64 they wrap to, whatever their size."""
    program = Program(Header(), tuple(Step(*fields) for fields in steps))
    packed = pack_program(program)
    assert len(packed) == HEADER.size + STEP.size * len(steps)
    for i, (op, a, b, c, d, e, name) in enumerate(steps):
        area = op == Op.PRESERVE_VMALLOC and is_vm_area(program.header, b, c, d, e)
        assert STEP.unpack_from(packed, HEADER.size + i * STEP.size) == (
            op, area, a & U64, b & U64, c & U64, d & U64, e & U64, name.encode().ljust(MAX_NAME + 1, b"\0"))


def test_a_report_in_the_projects_own_c_is_hashed_from_this_checkout(tmp_path):
    """A build in the cache may have been compiled in another checkout
    (a git worktree), since removed: a sanitizer report's line in the
    project's own C is read from this checkout's copy, which has the same
    content (it is part of the build's key). Read from the gone path, the
    site's line hash was '' and a known finding's site no longer matched."""
    lines = (C_DIR / "shims" / "kc" / "bitops.h").read_text().split("\n")
    gone = tmp_path / "gone" / "conformance" / "native" / "c" / "shims" / "kc" / "bitops.h"
    assert _own_line_hash(str(gone), 44) == line_hash(lines[43]) != ""
    assert _own_line_hash("/usr/include/stdio.h", 1) == _own_line_hash("?", 0) == ""
