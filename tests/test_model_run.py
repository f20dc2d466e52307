"""Whole programs on the model: boot, ops, handover and restore."""

import gc
import json
import struct
import time
from dataclasses import replace

import libfdt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import quirks
from reference.fdt import Fdt
from reference.geometry import PAGE_SHIFTS, geometry
from reference.image import memory_reader, page_reader
from reference.keys import page_chunks, pfn_key
from reference.model import _walk_events, handover, restore, run
from reference.outcome import Image
from reference.profiles import KHO_V3, KHO_V4, KHO_V4_KEYAPI, PROFILES, select_profile
from reference.program import ARENA_BASE_PHYS, Header, Op, Program, Step, parse_program
from reference.tree import kernel_walk, traverse

PAGE = 0x1000
ARENA_PFN = ARENA_BASE_PHYS >> 12
ENOMEM, EINVAL, EOPNOTSUPP, ERANGE, ENOENT = -12, -22, -95, -34, -2


def page(i: int) -> int:
    return ARENA_BASE_PHYS + i * PAGE


def prog(text: str, **header) -> Program:
    p = parse_program(text if "---" in text else "---\n" + text)
    return replace(p, header=replace(p.header, **header)) if header else p


def rcs(outcome) -> list[int]:
    return [r.rc for r in outcome.ops]


def leaf_entries(outcome) -> set[tuple]:
    """(path, bit) of every set bit."""
    return {(n.path, b) for n in outcome.tree if n.level == 0 for b in n.entries}


# ---- boot ------------------------------------------------------------------


def test_boot_layout():
    o = run(Program(), KHO_V4)
    assert o.boot.rc == 0 and o.root_phys == page(1)
    # root 1, FDT 2, FDT key's chain 3..7, metadata 8; both keys share a leaf
    assert [(n.path, n.level, n.phys, n.entries) for n in o.tree] == [
        ((), 5, page(1), (2,)),
        ((2,), 4, page(3), (0,)),
        ((2, 0), 3, page(4), (0,)),
        ((2, 0, 0), 2, page(5), (0,)),
        ((2, 0, 0, 0), 1, page(6), (8,)),  # (0x40002 >> 15) & 0x1ff
        ((2, 0, 0, 0, 8), 0, page(7), (2, 8)),
    ]
    assert o.image.fdt_phys == page(2)
    assert set(o.node_pages) == {page(i) for i in (1, 3, 4, 5, 6, 7)}
    f = libfdt.Fdt(o.fdt)
    assert f.getprop(0, "compatible").as_str() == "kho-v4"
    assert struct.unpack("<Q", bytes(f.getprop(0, "preserved-memory-map")))[0] == page(1)
    meta = f.path_offset("/kexec-metadata")
    assert struct.unpack("<Q", bytes(f.getprop(meta, "preserved-data")))[0] == page(8)
    assert struct.unpack("<Q", bytes(f.getprop(meta, "blob-size")))[0] == 73
    assert run(Program(), KHO_V3).fdt != o.fdt


@pytest.mark.parametrize("fail", range(1, 9))
def test_boot_failure_disables_kho(fail):
    o = run(prog("preserve_folio 0x10 0\nkexec\nrestore_folio 0x10000\nretrieve_subtree x", fail_alloc=fail), KHO_V4)
    assert o.boot.rc == ENOMEM
    assert rcs(o) == [EOPNOTSUPP, EOPNOTSUPP, -1, ENOENT]
    assert o.next is None and o.image is None and o.tree == ()


def test_first_allocation_after_boot_fails_an_op():
    o = run(prog("preserve_folio 0x10 0\npreserve_folio 0x10 0", fail_alloc=9), KHO_V4)
    assert o.boot.rc == 0 and rcs(o) == [ENOMEM, 0]


# ---- old-kernel ops --------------------------------------------------------


def test_out_of_domain_is_einval_without_effect():
    base = run(Program(), KHO_V4)
    o = run(
        prog(
            "preserve_folio 0x1 1\npreserve_folio 0x10000000000000 0\npreserve_folio 0 52\n"
            "radix_add 0x3 2\nunpreserve_folio 0x1 1\nradix_del 0 60\n"
            "preserve_pages 0xfffffffffffff 2\nunpreserve_pages 0xffffffffffffffff 0xffffffffffffffff"
        ),
        KHO_V4,
    )
    assert rcs(o) == [EINVAL] * 8
    assert o.tree == base.tree


@pytest.mark.parametrize("profile", [KHO_V3, KHO_V4, KHO_V4_KEYAPI])
@pytest.mark.parametrize("quirk_set", [frozenset(), frozenset({quirks.NEXT_KERNEL_TRUSTS_TREE})])
def test_a_run_leaves_no_reference_cycles_and_the_collector_as_it_was(profile, quirk_set):
    """A run holds off the cyclic garbage collector (reference.collector), so
    it must leave no cycles: they would keep what they hold alive until the
    collector's next pass (the tree's traversal once kept its whole visit
    list so, and the trusting next kernel its reader of the old memory)."""
    programs = [prog("preserve_folio 0x100 0\npreserve_pages 0x203 0xd\nadd_subtree a 0x40001000 0x10\n"
                     "unpreserve_folio 0x100 0\nkexec\nrestore_pages 0x203 0xd\nretrieve_subtree a"),
                prog("preserve_vmalloc 0 0x300 4 0 1\nalloc_preserve 1 0x2000\nfill_fdt 0 40 12\nkexec\n"
                     "restore_vmalloc 0\nrestore_free 1")]
    gc.collect()
    gc.disable()
    try:
        for program in programs:
            outcome = run(program, profile, quirk_set)
            assert rcs(outcome)[:2] == [0, 0] and outcome.next.accepted and outcome.tree
            assert not gc.isenabled()
            assert gc.collect() == 0
    finally:
        gc.enable()
    run(programs[0], profile)
    assert gc.isenabled()


def test_key_api_ops():
    text = f"radix_add_key {(1 << 52) | 5:#x}\nradix_add_key {1 << 53:#x}\nradix_del_key {1 << 60:#x}\nradix_del_key {(1 << 51) | 9:#x}"
    assert rcs(run(prog(text), KHO_V4)) == [EOPNOTSUPP] * 4
    o = run(prog(text), KHO_V4_KEYAPI)
    assert rcs(o) == [0, ERANGE, 0, 0]
    assert [len(r.warnings) for r in o.ops] == [0, 0, 0, 1]  # root slot 1 absent
    assert o.tree == run(prog("preserve_folio 5 0"), KHO_V4_KEYAPI).tree


def test_unpreserve_absent_warns_per_block():
    o = run(prog("unpreserve_pages 0x100 3\nunpreserve_folio 0x20 0\nradix_del 0x21 0"), KHO_V4)
    # (0x100, 1): root slot 1 absent -> warn; (0x102, 0): path exists (boot FDT key
    # shares root slot 2 .. level 1) but leaf slot 0 does not -> warn.
    w = "radix-del-absent"
    assert [r.warnings for r in o.ops] == [(w, w), (w,), (w,)]


def test_preserve_pages_split_and_numa():
    def user_blocks(text: str, **h) -> list[tuple[int, int]]:
        o = run(prog(text + "\nkexec", **h), KHO_V4)
        assert rcs(o) == [0, 0]
        return sorted((p >> 12, order) for p, order in o.next.walk if p < ARENA_BASE_PHYS)

    assert user_blocks("preserve_pages 0x3 0xd") == [(3, 0), (4, 2), (8, 3)]
    # Both ends of [0x100, 0x110) are in node 0, yet node 1 is inside it.
    h = dict(numa=((0, 0), (0x106, 1), (0x107, 0)))
    assert user_blocks("preserve_pages 0x100 0x10", **h) == [(0x100, 2), (0x104, 1), (0x106, 0), (0x107, 0), (0x108, 3)]


def test_preserve_pages_failure_rolls_back_only_new_keys():
    # Boot uses attempts 1..8; 0x11's leaf is attempt 9; the order-1 block of
    # each range needs root slot 1, attempt 10, which fails.
    o = run(prog("preserve_folio 0x11 0\npreserve_pages 0x11 3", fail_alloc=10), KHO_V4)
    assert rcs(o) == [0, ENOMEM]
    assert ((2, 0, 0, 0, 0), 0x11) in leaf_entries(o)  # already present before: stays
    o = run(prog("preserve_folio 0x11 0\npreserve_pages 0x13 3", fail_alloc=10), KHO_V4)
    assert rcs(o) == [0, ENOMEM]
    assert ((2, 0, 0, 0, 0), 0x13) not in leaf_entries(o)  # added by the failed call: removed
    assert ((2, 0, 0, 0, 0), 0x11) in leaf_entries(o)


def test_huge_range_is_instant():
    t = time.perf_counter()
    text = "preserve_pages 0 0x10000000000\npreserve_pages 0x123 0xffffffffff\nkexec\nrestore_pages 0 0x10000000000"
    o = run(prog(text), KHO_V4_KEYAPI)
    assert rcs(o) == [0, 0, 0, 0]
    # 2^40 struct pages to initialise: the kernel may run out of CPU budget first
    assert o.ops[3].value2 == 1 << 40 and o.ops[3].may_time_out
    assert (0, 1 << 52) in o.next.reserved
    text = "preserve_pages 1 0xffffffffffffe\nunpreserve_pages 1 0xffffffffffffe\nkexec"
    o = run(prog(text, arena_pages=2048), KHO_V4)  # 102 blocks, one chain of nodes per order
    assert rcs(o) == [0, 0, 0] and not any(r.warnings for r in o.ops)
    assert len(o.next.walk) == 2
    assert time.perf_counter() - t < 2


def test_pokes():
    # Poke the FDT magic: the next kernel refuses the handover.
    o = run(prog("poke_fdt 0 0\nkexec\nrestore_folio 0x40002000"), KHO_V4)
    # the next kernel refused the handover; its restore still checks the page and warns
    assert rcs(o) == [0, EINVAL, -1] and o.ops[2].warnings == ("restore-bad-magic",)
    assert not o.next.accepted and "FDT" in o.next.reason
    assert o.fdt[:4] == b"\0\r\xfe\xed"
    # Out-of-range pokes do nothing.
    base = run(Program(), KHO_V4)
    o = run(prog("poke_arena 0x100 0 1\npoke_arena 1 512 1\npoke_fdt 0x1000 1\npoke_arena 9 0 1"), KHO_V4)
    assert rcs(o) == [0] * 4 and o.tree == base.tree and o.fdt == base.fdt
    # A poke on the scratch page reaches the image's descriptors.
    o = run(prog("poke_arena 0 1 0x55\nkexec", scratch=((0x1000_0000, 0x10_0000),)), KHO_V4)
    assert o.image.scratch == struct.pack("<QQ", 0x1000_0000, 0x55)
    assert o.next.scratch_marks == ((0x1000_0000, 0x55),)
    # Pokes corrupt the image at kexec: old-kernel ops after them see a sound
    # tree, and without a kexec they change nothing.
    o = run(prog(f"poke_arena 1 2 {page(200):#x}\npreserve_folio 0x10 0\nunpreserve_folio 0x10 0"), KHO_V4)
    assert rcs(o) == [0, 0, 0] and o.tree == run(prog("preserve_folio 0x10 0\nunpreserve_folio 0x10 0"), KHO_V4).tree
    o = run(prog(f"poke_arena 1 2 {page(200):#x}\npreserve_folio 0x10 0\nkexec"), KHO_V4)
    assert 2 in o.tree[0].entries and not o.next.accepted and "outside RAM" in o.next.reason


# ---- next kernel -----------------------------------------------------------


def test_restore_folio_vectors():
    text = """
    preserve_folio 0x10 0
    preserve_folio 0x20000 17
    preserve_folio 0x200000 0
    kexec
    restore_folio 0x10000
    restore_folio 0x20000000
    restore_folio 0x200000000
    restore_folio 0x10000
    restore_folio 0x11000
    restore_folio 0x40002000
    """
    o = run(prog(text), KHO_V4)
    assert [(r.rc, r.value, r.value2, len(r.warnings)) for r in o.ops[4:]] == [
        (0, 0x10, 1, 0),
        (0, 0x20000, 1 << 17, 0),  # 2^17 struct pages: runs, well within the CPU budget
        (-1, 0, 0, 0),  # pfn 0x200000 is not RAM: phantom, no magic, no warning
        (-1, 0, 0, 1),  # magic gone: warns ...
        (-1, 0, 0, 0),  # ... once per kernel
        (0, ARENA_PFN + 2, 1, 0),  # the FDT page
    ]
    assert o.next.phantom == (0x200000,) and not any(r.may_time_out for r in o.ops)
    # NextBoot.magic is the map at handover, before any restore
    assert (0x20000, 17) in o.next.magic and (0x10, 0) in o.next.magic


def test_restore_pages_vectors_numa():
    h = dict(numa=((0, 0), (0x106, 1)))
    text = """
    preserve_pages 0x100 0x10
    preserve_pages 0x200 8
    kexec
    restore_pages 0x100000 8
    restore_pages 0x108000 8
    restore_pages 0x200000 4
    restore_pages 0x200000 0x10001
    restore_pages 0x100000 1
    """
    o = run(prog(text, **h), KHO_V4)
    assert [(r.rc, r.value, r.value2, len(r.warnings)) for r in o.ops[3:]] == [
        (0, 0x100, 8, 0),  # blocks (0x100, 2) (0x104, 1) (0x106, 1): split at the node boundary
        (0, 0x108, 8, 0),
        (-1, 0, 0, 0),  # preserved as one order-3 block: wrong order, no warning
        (-1, 0, 0, 0),  # expects an order-9 block at 0x200: wrong order, no warning
        (-1, 0, 0, 1),  # already restored: no magic
    ]
    assert (0x200, 3) in o.next.magic and any(0x100 <= p < 0x110 for p, _ in o.next.magic)


def test_retrieve_subtree():
    text = "add_subtree blob 0x1234000 0x99\nadd_subtree blob 1 1\nremove_subtree 0x1234000\nadd_subtree two 5 6\nkexec\nretrieve_subtree two\nretrieve_subtree blob\nretrieve_subtree kexec-metadata"
    o = run(prog(text), KHO_V4)
    assert [(r.rc, r.value, r.value2) for r in o.ops] == [
        (0, 0, 0), (-17, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0),
        (0, 5, 6), (ENOENT, 0, 0), (0, page(8), 73),
    ]


def test_ops_in_the_wrong_kernel():
    o = run(prog("restore_folio 0x40002000\nretrieve_subtree kexec-metadata\nkexec\npreserve_folio 1 0\nkexec"), KHO_V4)
    assert rcs(o) == [-1, ENOENT, 0, EOPNOTSUPP, EOPNOTSUPP]


def test_extend_scratch_and_walk_nodes():
    h = dict(ram=((0, 0x200000),), scratch=((0x1000_0000, 0x10_0000),))
    o = run(prog("preserve_folio 0x10 0\npreserve_folio 0xc0000 0\nkexec", **h), KHO_V4_KEYAPI)
    G = 1 << 30
    # busy 1 GiB blocks: 0 (pfn 0x10), 1 (arena, tree), 3 (pfn 0xc0000); DRAM ends at 8 GiB
    assert o.next.scratch_marks == ((0x1000_0000, 0x10_0000), (2 * G, G), (4 * G, 4 * G))
    assert o.next.walk_nodes == tuple(n.phys for n in o.tree)
    assert o.next.reserved[0] == (ARENA_BASE_PHYS, 16)
    o4 = run(prog("preserve_folio 0x10 0\npreserve_folio 0xc0000 0\nkexec", **h), KHO_V4)
    assert o4.next.scratch_marks == ((0x1000_0000, 0x10_0000),) and o4.next.walk_nodes == ()


@pytest.mark.parametrize("pfn, wraps", [(0xffffffffc0000, True), (0xffffffff80000, False)])
def test_extend_scratch_per_gib_goes_on_from_0_after_a_step_to_2_64(pfn, wraps):
    """7.3 steps a 64-bit start by 1 GiB while it is below the block's end.
    From the top 1 GiB block, the step lands on 2^64 and wraps to 0, below
    the end: the loop goes on through every block under it until early
    memory runs out, and nothing is marked (the kernel logs "Failed to extend
    scratch: -12"). One block lower, the step stops short of 2^64."""
    h = dict(ram=((0, 0x100000),), scratch=())
    p = prog(f"preserve_folio {pfn:#x} 16\nkexec", **h)  # 256 MiB
    G = 1 << 30
    spec = ((0, G), (2 * G, (pfn << 12) - 2 * G))  # busy: the arena's block and the folio's; none past the folio's
    assert run(p, KHO_V4_KEYAPI).next.scratch_marks == spec
    quirked = run(p, KHO_V4_KEYAPI, frozenset({quirks.EXTEND_SCRATCH_PER_GIB})).next
    assert quirked.scratch_marks == (() if wraps else spec) and quirked.may_time_out is wraps


@pytest.mark.parametrize("page_shift", PAGE_SHIFTS)
def test_a_traversal_reported_as_events_is_the_kernels_walk_of_a_valid_tree(page_shift):
    """What the quirk extend-scratch-per-gib reads, built from the model's
    own traversal (model._walk_events) when the next kernel validated the
    tree, is what the kernel's walk reports (tree.kernel_walk): every page
    entered, then a leaf's keys, in walk order."""
    text = "\n".join(f"preserve_folio {pfn:#x} {order}" for pfn, order in
                      ((0x10, 0), (0x11, 0), (0x400, 10), (0x80000, 19), (0x3ffff, 0), (0x4000000, 3)))
    p = prog(text + "\nkexec", page_shift=page_shift, ram=((0, 1 << 28),))
    o = run(p, KHO_V4_KEYAPI)
    geo = geometry(page_shift)
    walked = list(kernel_walk(o.root_phys, geo, memory_reader(o.image, p.header)))
    assert sum(not is_node for is_node, _ in walked) >= 6 and sum(is_node for is_node, _ in walked) > geo.root_level
    assert list(_walk_events(traverse(o.root_phys, geo, page_reader(o.image), strict=True))) == walked


def test_outcome_to_json():
    o = run(prog("preserve_folio 0x10 0\nkexec"), KHO_V4)
    j = json.loads(json.dumps(o.to_json()))
    assert j["node_pages"][hex(page(1))] == o.node_pages[page(1)].hex()
    assert j["image"]["pages"] == j["node_pages"]


def test_profiles():
    assert set(PROFILES) == {"kho-v3", "kho-v4", "kho-v4-keyapi"}
    assert select_profile("kho-v4", True, True) is KHO_V4_KEYAPI
    assert select_profile("kho-v3", False, False) is KHO_V3
    with pytest.raises(KeyError):
        select_profile("kho-v9", False, False)


# ---- corrupt images --------------------------------------------------------


def edited_fdt(image: Image, edit) -> Image:
    f = Fdt(bytearray(image.fdt) + bytearray(PAGE - len(image.fdt)))
    assert f.open_into(PAGE) == 0
    edit(f)
    f.pack()
    return replace(image, fdt=bytes(f.buf[: f.totalsize()]))


def reason(image: Image, profile=KHO_V4) -> str:
    nk, results = restore(image, [Step(Op.RESTORE_FOLIO, page(2))], Header(), profile)
    assert not nk.accepted and results[0].rc == -1 and results[0].warnings == ("restore-bad-magic",)
    assert nk.walk == () and nk.reserved == () and nk.magic == ()
    return nk.reason


@pytest.fixture(scope="module")
def image() -> Image:
    o = run(prog("preserve_folio 0x10 0"), KHO_V4)
    assert handover(o.image, Header(), KHO_V4)[0].accepted
    return o.image


def test_reject_bad_magic(image):
    assert "header" in reason(replace(image, fdt=b"\0" + image.fdt[1:]))
    assert "header" in reason(replace(image, fdt=image.fdt[:20]))


def test_reject_wrong_compatible(image):
    assert "compatible" in reason(image, KHO_V3)
    assert "compatible" in reason(run(Program(), KHO_V3).image, KHO_V4_KEYAPI)


def test_reject_memory_map_property(image):
    assert "length 4" in reason(edited_fdt(image, lambda f: f.setprop(0, "preserved-memory-map", b"\1\2\3\4")))
    assert "is 0" in reason(edited_fdt(image, lambda f: f.setprop(0, "preserved-memory-map", bytes(8))))
    renamed = image.fdt.replace(b"preserved-memory-map", b"preserved-memory-mop")
    assert "missing" in reason(replace(image, fdt=renamed))


def test_retrieve_truncated_subtree_property(image):
    def edit(f: Fdt) -> None:
        node = f.add_subnode(0, "short")
        f.setprop(node, "preserved-data", bytes(8))
        f.setprop(node, "blob-size", bytes(4))

    img = edited_fdt(image, edit)
    _, results = restore(img, [Step(Op.RETRIEVE_SUBTREE, name="short")], Header(), KHO_V4)
    assert results[0].rc == EINVAL


def test_reject_tree_pointer_outside_image():
    o = run(prog(f"poke_arena 1 3 {page(200):#x}\nkexec"), KHO_V4)
    assert not o.next.accepted and o.next.reason == "tree pointer outside RAM"
    assert rcs(o)[-1] == EINVAL


def test_reject_tree_loop():
    o = run(prog(f"poke_arena 3 1 {page(1):#x}\nkexec"), KHO_V4)  # level 4 points back at the root
    assert o.next.reason == "tree loop"
    assert [n.entries for n in o.tree][:2] == [(2,), (0, 1)]


def test_reject_root_outside_and_wide_key(image):
    assert reason(replace(image, pages={})) == "tree root not in the image"
    # Move the root's subtree from slot 2 to slot 7: its keys get bits 53:51 set.
    root = bytearray(image.pages[page(1)])
    root[8 * 7 : 8 * 8], root[8 * 2 : 8 * 3] = root[8 * 2 : 8 * 3], bytes(8)
    pages = {**image.pages, page(1): bytes(root)}
    assert reason(replace(image, pages=pages)) == "tree key wider than the key width"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.dictionaries(st.integers(0, 1 << 64), st.binary(max_size=PAGE), max_size=4), st.binary(max_size=40))
def test_garbage_never_raises(fdt, pages, scratch):
    img = Image(12, page(2), fdt, ARENA_BASE_PHYS, scratch, pages)
    for profile in PROFILES.values():
        nk, results = restore(img, [Step(Op.RESTORE_PAGES, 0, 4), Step(Op.RETRIEVE_SUBTREE, name="a")], Header(), profile)
        assert nk.accepted is False or nk.reason == ""


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 0x1000), st.integers(0, 0xFF)), max_size=6))
def test_corrupted_model_image_never_raises(pokes):
    """Byte pokes in the FDT and word pokes in the tree pages: accepted or refused, never an exception."""
    lines = ["preserve_pages 0x3 0x40"]
    for kind, off, val in pokes:
        lines.append(f"poke_fdt {off} {val}" if kind == 0 else f"poke_arena {1 + kind * 2} {off % 512} {val << (off % 40)}")
    lines += ["kexec", "restore_pages 0x3000 0x40", "retrieve_subtree kexec-metadata"]
    o = run(prog("\n".join(lines)), KHO_V4_KEYAPI)
    assert o.next.accepted or o.next.reason


# ---- properties --------------------------------------------------------------

SHIFTS = st.sampled_from(PAGE_SHIFTS)


@st.composite
def layouts(draw):
    """Disjoint folios and page ranges in RAM below the arena, and a NUMA layout."""
    shift = draw(SHIFTS)
    cursor = draw(st.integers(0, 0x2000))
    items = []
    for _ in range(draw(st.integers(1, 12))):
        cursor += draw(st.integers(0, 40))
        if draw(st.booleans()):
            order = draw(st.integers(0, 7))
            cursor = -(-cursor >> order) << order
            items.append((Op.PRESERVE_FOLIO, cursor, order))
            cursor += 1 << order
        else:
            n = draw(st.integers(1, 300))
            items.append((Op.PRESERVE_PAGES, cursor, n))
            cursor += n
    bounds = sorted(draw(st.lists(st.integers(1, cursor + 1), max_size=5, unique=True)))
    numa = ((0, 0), *((b, i % 3 + 1) for i, b in enumerate(bounds)))
    return Header(page_shift=shift, numa=numa, arena_pages=512), items


@settings(max_examples=60, deadline=None)
@given(layouts(), st.sampled_from(list(PROFILES.values())))
def test_restore_gives_back_what_was_preserved(layout, profile):
    header, items = layout
    P = header.page_shift
    steps = [Step(op, a, b) for op, a, b in items] + [Step(Op.KEXEC)]
    restores = [
        Step(Op.RESTORE_FOLIO, a << P) if op == Op.PRESERVE_FOLIO else Step(Op.RESTORE_PAGES, a << P, b)
        for op, a, b in items
    ]
    o = run(Program(header, tuple(steps + restores)), profile)
    n = len(items)
    assert [r.rc for r in o.ops[: n + 1]] == [0] * (n + 1)
    for (op, a, b), r in zip(items, o.ops[n + 1 :]):
        assert (r.rc, r.value, r.value2) == (0, a, 1 << b if op == Op.PRESERVE_FOLIO else b)
    meta = libfdt.Fdt(o.fdt).path_offset("/kexec-metadata")
    meta_pfn = struct.unpack("<Q", bytes(libfdt.Fdt(o.fdt).getprop(meta, "preserved-data")))[0] >> P
    boot = {(o.image.fdt_phys >> P, 0), (meta_pfn, 0)}
    blocks = set(boot)
    for op, a, b in items:
        blocks |= {(a, b)} if op == Op.PRESERVE_FOLIO else set(page_chunks(a, b, header))
    # the map at handover: a head page for every preserved block in RAM
    assert {p for p, _ in o.next.magic} == {p for p, _ in blocks if header.is_ram(p)}
    walked = [pfn_key(p >> P, order, P) for p, order in o.next.walk]
    assert walked == sorted(pfn_key(pfn, order, P) for pfn, order in blocks)
    # The same image with its pages as plain bytes (as the C side hands it over).
    plain = replace(o.image, pages={phys: bytes(data) for phys, data in o.image.pages.items()})
    assert restore(plain, restores, header, profile) == restore(o.image, restores, header, profile)


@settings(max_examples=60, deadline=None)
@given(layouts(), st.booleans())
def test_preserve_then_unpreserve_leaves_no_key(layout, reverse):
    header, items = layout
    undo = {Op.PRESERVE_FOLIO: Op.UNPRESERVE_FOLIO, Op.PRESERVE_PAGES: Op.UNPRESERVE_PAGES}
    steps = [Step(op, a, b) for op, a, b in items]
    steps += [Step(undo[op], a, b) for op, a, b in (reversed(items) if reverse else items)]
    o = run(Program(header, tuple(steps)), KHO_V4)
    assert all(r.rc == 0 and not r.warnings for r in o.ops)
    base = run(Program(header), KHO_V4)
    assert leaf_entries(o) == leaf_entries(base)


NAMES = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_,.+", min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(
    SHIFTS,
    st.lists(
        st.tuples(
            st.booleans(),
            st.sampled_from(["a", "b", "kexec-metadata"]) | NAMES,  # collisions: -EEXIST
            st.integers(0, 3) | st.integers(0, (1 << 64) - 1),  # shared phys: remove picks one
        ),
        max_size=40,
    ),
)
def test_fdt_parses_with_libfdt(shift, edits):
    """Random subtree adds and removes; the FDT libfdt reads back has exactly
    the nodes and values the ops' return codes promise."""
    steps = []
    for add, name, phys in edits:
        steps.append(Step(Op.ADD_SUBTREE, phys, phys >> 7, name=name) if add else Step(Op.REMOVE_SUBTREE, phys))
    o = run(Program(Header(page_shift=shift), tuple(steps)), KHO_V4)
    f = libfdt.Fdt(o.fdt)
    meta = f.path_offset("/kexec-metadata")
    expect = {"kexec-metadata": struct.unpack("<Q", bytes(f.getprop(meta, "preserved-data")))[0]}
    for step, r in zip(steps, o.ops):
        if step.op == Op.ADD_SUBTREE:
            assert r.rc in (0, -17, ENOMEM)
            if r.rc == 0:
                expect[step.name] = step.a
        else:
            # The first child holding that phys goes; a new node is inserted
            # as the first child, so that is the newest one.
            gone = [n for n, v in expect.items() if v == step.a]
            if gone:
                del expect[gone[-1]]
    names = {}
    node = f.first_subnode(0, quiet=[libfdt.NOTFOUND])
    while node >= 0:
        names[f.get_name(node)] = struct.unpack("<Q", bytes(f.getprop(node, "preserved-data")))[0]
        assert struct.unpack("<Q", bytes(f.getprop(node, "blob-size")))[0] in (names[f.get_name(node)] >> 7, 73)
        node = f.next_subnode(node, quiet=[libfdt.NOTFOUND])
    assert names == expect


@pytest.mark.parametrize("ps, count, slow", [(12, 2000, False), (14, 2000, False), (16, 200, False), (16, 300, True),
                                             (16, 2000, True)])
def test_long_fills_may_outlast_the_cpu_budget(ps, count, slow):
    """Each subtree added walks the nodes already there: filling a 64 KiB
    FDT to its 777 subtrees takes the fuzz flavor over a second (about 4 us
    a node visit), so the model foresees a timeout past 2^15 visits; 4 KiB
    and 16 KiB FDTs fill up (45, 192 subtrees) long before."""
    o = run(parse_program(f"page_shift {ps}\n---\nfill_fdt 0 {count:#x} 32\n"), KHO_V4)
    assert o.ops[0].may_time_out is slow
    assert o.ops[0].value == {12: 45, 14: 192, 16: min(count, 777)}[ps]
