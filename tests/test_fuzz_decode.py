"""fuzz.decode: total, deterministic, and reaching the whole op domain."""

import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import seeds
from fuzz.decode import decode
from reference.geometry import PAGE_SHIFTS
from reference.program import ARENA_BASE_PHYS, MAX_NAME, VMALLOC_SLOTS_OFFSET, Op, is_vm_area, parse_program

SEEDS = sorted((Path(__file__).resolve().parent.parent / "corpus" / "seeds").glob("*.bin"))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1024), st.sampled_from(PAGE_SHIFTS))
def test_any_bytes_decode_to_a_valid_program(data, page_shift):
    p = decode(data, page_shift)
    assert p.header.page_shift == page_shift
    p.header.validate()
    assert parse_program(p.text()) == p
    assert decode(data, page_shift) == p  # deterministic


def test_short_inputs_are_small_programs():
    assert [s.op for s in decode(b"", 12).steps] == [Op.KEXEC]
    assert all(len(decode(bytes([b]), 12).steps) <= 2 for b in range(256))


@pytest.mark.parametrize("page_shift", [12, 16])
def test_domain_coverage(page_shift):
    """Over 2000 random inputs every corner the fuzzer must reach shows up."""
    rng = random.Random(page_shift)
    seen = Counter()
    key_width = 64 - page_shift
    arena = ARENA_BASE_PHYS >> page_shift
    for _ in range(2000):
        p = decode(rng.randbytes(rng.randrange(0, 700)), page_shift)
        h = p.header
        steps = p.steps
        k = p.kexec_index()
        folio_ops = [s for s in steps if s.op in (Op.PRESERVE_FOLIO, Op.RADIX_ADD, Op.UNPRESERVE_FOLIO, Op.RADIX_DEL)]
        page_ops = [s for s in steps if s.op in (Op.PRESERVE_PAGES, Op.UNPRESERVE_PAGES)]
        names = [s.name for s in steps if s.op == Op.ADD_SUBTREE]
        preserved = {s.a for s in steps[:k] if s.op in (Op.PRESERVE_FOLIO, Op.PRESERVE_PAGES)} if k is not None else set()
        after = steps[k + 1 :] if k is not None else ()
        retrieved = {s.name for s in after if s.op == Op.RETRIEVE_SUBTREE}
        seen.update({
            "pfn 0": any(s.a == 0 for s in folio_ops + page_ops),
            "tiny pfn": any(0 < s.a < 256 for s in folio_ops),
            "huge pfn": any(s.a >= 1 << key_width for s in folio_ops + page_ops),
            "u64 max pfn": any(s.a >= (1 << 64) - 16 for s in folio_ops + page_ops),
            "pfn near arena": any(abs(s.a - arena) < 64 for s in folio_ops),
            "pfn at numa boundary": any(s.a == start for s in folio_ops + page_ops for start, _ in h.numa if start),
            "order >= key width": any(s.b >= key_width for s in folio_ops),
            "order past 64": any(s.b > 64 for s in folio_ops),
            "misaligned folio": any(s.b < 20 and s.a & ((1 << s.b) - 1) for s in folio_ops),
            "2^40 range": any(s.b >= 1 << 40 for s in page_ops),
            "kexec": k is not None,
            "restore of preserved": any(s.op in (Op.RESTORE_FOLIO, Op.RESTORE_PAGES) and s.a >> page_shift in preserved
                                        for s in after),
            "retrieve of added": bool(retrieved & set(names)),
            "duplicate subtree names": len(names) > len(set(names)),
            "long subtree name": any(len(n) == MAX_NAME for n in names),
            "@ in name": any("@" in n for n in names),
            "unpreserve of preserved": any(s.op == Op.UNPRESERVE_FOLIO and (s.a, s.b) in
                                           {(f.a, f.b) for f in steps if f.op == Op.PRESERVE_FOLIO} for s in steps),
            "poke_arena": any(s.op == Op.POKE_ARENA for s in steps),
            "poke_fdt": any(s.op == Op.POKE_FDT for s in steps),
            "radix keys": any(s.op in (Op.RADIX_ADD_KEY, Op.RADIX_DEL_KEY) for s in steps),
            "fail_alloc": h.fail_alloc > 0,
            "ram holes": len(h.ram) >= 3,
            "non-monotonic numa": [n for _, n in h.numa] != sorted(n for _, n in h.numa),
            "scratch areas": len(h.scratch) >= 2,
            "big arena": h.arena_pages >= 1024,
            "second kexec": sum(s.op == Op.KEXEC for s in steps) >= 2,
            "long program": len(steps) >= 35,
            "alloc size at an order edge": any(s.op == Op.ALLOC_PRESERVE and s.b > 1 and (s.b - 1) & s.b == 0
                                               for s in steps),
            "alloc past the largest order": any(s.op == Op.ALLOC_PRESERVE and s.b > 1 << (page_shift + 10)
                                                for s in steps),
            "restore_free of an allocation": any(s.op == Op.RESTORE_FREE and s.a in
                                                 {a.a for a in steps[:k] if a.op == Op.ALLOC_PRESERVE} for s in after),
            "vmalloc of huge pages": any(s.op == Op.PRESERVE_VMALLOC and s.d > 0 for s in steps),
            "vmalloc past one chunk": any(s.op == Op.PRESERVE_VMALLOC and s.c >> s.d >= (1 << page_shift) // 8
                                          for s in steps),
            "vmalloc of no area": any(s.op == Op.PRESERVE_VMALLOC and not is_vm_area(h, s.b, s.c, s.d, s.e)
                                      for s in steps),
            "restore_vmalloc of a preservation": any(
                s.op == Op.RESTORE_VMALLOC and s.a in {v.a for v in steps[:k] if v.op == Op.PRESERVE_VMALLOC}
                for s in after),
            "poke of a descriptor": any(s.op == Op.POKE_ARENA and s.a == 0 and s.b >= VMALLOC_SLOTS_OFFSET // 8
                                        for s in steps),
            "scratch overlap at an edge": any(s.op == Op.SCRATCH_OVERLAP and any(
                abs(s.a - e) <= 2 for a, z in h.scratch for e in (a, a + z)) for s in steps),
            "queries": any(s.op in (Op.IS_KHO_BOOT, Op.IS_KHO_ENABLED) for s in steps),
        })
    missing = [name for name, n in seen.items() if n == 0]
    assert not missing, f"never generated: {missing}"
    assert 1500 <= seen["kexec"] <= 1900  # most programs hand over
    assert seen["fail_alloc"] < 600  # fault injection is the exception
    assert seen["2^40 range"] < 200  # huge ranges are slow: rare


@pytest.mark.parametrize("seed", SEEDS, ids=[s.name for s in SEEDS])
def test_seeds_decode(seed):
    for ps in PAGE_SHIFTS:
        p = decode(seed.read_bytes(), ps)
        assert parse_program(p.text()) == p
    assert len(decode(seed.read_bytes(), 12).steps) >= 2


def test_there_are_seeds():
    assert len(SEEDS) >= 15


@pytest.mark.parametrize("seed", SEEDS, ids=[s.name for s in SEEDS])
def test_each_seed_shows_what_its_name_says(seed):
    """The seeds are fuzzer bytes: a decoder change silently changes what they
    mean. Each must still decode to a program with its named property
    (`make seeds` finds new bytes for those that lost it)."""
    assert seed.stem in seeds.SEEDS, f"{seed.name}: no property in fuzz/seeds.py"
    assert seeds.shows(seed.stem, seed.read_bytes()), f"{seed.name} lost its property: run `make seeds`"


def test_every_seed_property_has_a_seed():
    assert {s.stem for s in SEEDS} == set(seeds.SEEDS)


def test_seeds_cover_every_op():
    """Together the seeds exercise every op and a restore of what was preserved."""
    programs = [decode(s.read_bytes(), 12) for s in SEEDS]
    assert {s.op for p in programs for s in p.steps} == set(Op)
    assert any(p.kexec_index() is not None and any(
        s.op == Op.RESTORE_FOLIO and s.a >> 12 in {f.a for f in p.steps if f.op == Op.PRESERVE_FOLIO}
        for s in p.steps[p.kexec_index():]) for p in programs)
