"""The fuzz seeds: for each, what its program must show, and a search for
fuzzer bytes that decode to such a program.

Seeds are bytes, so any change to the decoder changes what they mean. Each
seed's name maps to a property of its decoded program (page shift 12); the
tests check every seed still has it, and ``python -m fuzz.seeds`` (``make
seeds``) finds new bytes for the seeds that lost it, short ones first.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from pathlib import Path

from reference.program import ARENA_BASE_PHYS, VMALLOC_SLOTS_OFFSET, Op, Program, Step

from .decode import decode

SEED_PAGE_SHIFT = 12
Property = Callable[[Program], bool]


def _ops(p: Program, *ops: Op) -> list[Step]:
    return [s for s in p.steps if s.op in ops]


def _split(p: Program) -> tuple[tuple[Step, ...], tuple[Step, ...]]:
    k = p.kexec_index()
    return (p.steps, ()) if k is None else (p.steps[:k], p.steps[k + 1 :])


def _restores_preserved(p: Program, keep: Op, back: Op, match: Callable[[Step, Step], bool]) -> bool:
    before, after = _split(p)
    return any(match(s, r) for s in before if s.op == keep for r in after if r.op == back)


def _same_slot(s: Step, r: Step) -> bool:
    return s.a == r.a


def _numa_nonmonotonic(p: Program) -> bool:
    nids = [n for _, n in p.header.numa]
    return any(a != b and a == c for a, b, c in zip(nids, nids[1:], nids[2:]))


def _poked_descriptor(p: Program) -> bool:
    first_word = VMALLOC_SLOTS_OFFSET // 8
    return any(s.a == 0 and first_word <= s.b < first_word + 32 for s in _ops(p, Op.POKE_ARENA)) and bool(
        _ops(p, Op.RESTORE_VMALLOC))


SEEDS: dict[str, Property] = {
    "01-folio-restore": lambda p: _restores_preserved(
        p, Op.PRESERVE_FOLIO, Op.RESTORE_FOLIO, lambda s, r: r.a >> SEED_PAGE_SHIFT == s.a),
    "02-pages-restore": lambda p: _restores_preserved(
        p, Op.PRESERVE_PAGES, Op.RESTORE_PAGES, lambda s, r: r.a >> SEED_PAGE_SHIFT == s.a),
    "03-subtree-retrieve": lambda p: _restores_preserved(
        p, Op.ADD_SUBTREE, Op.RETRIEVE_SUBTREE, lambda s, r: s.name == r.name),
    "04-duplicate-names": lambda p: len({s.name for s in _ops(p, Op.ADD_SUBTREE)}) < len(_ops(p, Op.ADD_SUBTREE)),
    "05-numa-nonmonotonic": _numa_nonmonotonic,
    "06-scratch": lambda p: bool(p.header.scratch) and p.kexec_index() is not None,
    "07-fail-alloc": lambda p: p.header.fail_alloc > 0 and len(p.steps) >= 3,
    "08-poke-arena": lambda p: bool(_ops(p, Op.POKE_ARENA)) and p.kexec_index() is not None,
    "09-poke-fdt": lambda p: bool(_ops(p, Op.POKE_FDT)) and p.kexec_index() is not None,
    "10-pfn-zero": lambda p: any(s.a == 0 for s in _ops(p, Op.PRESERVE_FOLIO, Op.PRESERVE_PAGES)),
    "11-huge-pfn": lambda p: any(s.a >= 1 << 40 for s in _ops(p, Op.PRESERVE_FOLIO, Op.PRESERVE_PAGES)),
    "12-order-past-key-width": lambda p: any(s.b > 63 - SEED_PAGE_SHIFT for s in _ops(p, Op.PRESERVE_FOLIO)),
    "13-radix-keys": lambda p: bool(_ops(p, Op.RADIX_ADD_KEY)) and bool(_ops(p, Op.RADIX_DEL_KEY, Op.RADIX_DEL)),
    "14-unpreserve": lambda p: bool(_ops(p, Op.UNPRESERVE_FOLIO)) and bool(_ops(p, Op.UNPRESERVE_PAGES)),
    "15-remove-subtree": lambda p: bool(_ops(p, Op.REMOVE_SUBTREE)) and bool(_ops(p, Op.ADD_SUBTREE)),
    "16-second-kexec": lambda p: len(_ops(p, Op.KEXEC)) >= 2,
    "17-big-arena": lambda p: p.header.arena_pages >= 1024 and len(p.steps) >= 3,
    "18-ram-holes": lambda p: len(p.header.ram) >= 3,
    "19-no-kexec": lambda p: p.kexec_index() is None and len(p.steps) >= 3,
    "20-near-arena": lambda p: any(
        abs(s.a - (ARENA_BASE_PHYS >> SEED_PAGE_SHIFT)) < 64 for s in _ops(p, Op.PRESERVE_FOLIO, Op.PRESERVE_PAGES)),
    "21-long-program": lambda p: len(p.steps) >= 35,
    "22-fill-fdt": lambda p: bool(_ops(p, Op.FILL_FDT)) and bool(_ops(p, Op.RETRIEVE_SUBTREE)),
    "23-alloc-preserve": lambda p: _restores_preserved(p, Op.ALLOC_PRESERVE, Op.RESTORE_FREE, _same_slot)
    and bool(_ops(p, Op.UNPRESERVE_FREE)),
    "24-vmalloc": lambda p: _restores_preserved(p, Op.PRESERVE_VMALLOC, Op.RESTORE_VMALLOC, _same_slot)
    and bool(_ops(p, Op.UNPRESERVE_VMALLOC)),
    "25-vmalloc-chunks": lambda p: any(s.c >> s.d > (1 << SEED_PAGE_SHIFT) // 8 for s in _ops(p, Op.PRESERVE_VMALLOC))
    and bool(_ops(p, Op.RESTORE_VMALLOC)),
    "26-queries": lambda p: all(_ops(p, op) for op in (Op.IS_KHO_ENABLED, Op.IS_KHO_BOOT, Op.SCRATCH_OVERLAP)),
    "27-poke-descriptor": _poked_descriptor,
}


def shows(name: str, data: bytes) -> bool:
    """Whether ``data`` decodes to a program of two ops or more with the
    property of seed ``name``."""
    program = decode(data, SEED_PAGE_SHIFT)
    return len(program.steps) >= 2 and SEEDS[name](program)


def search(name: str, rng: random.Random, tries: int = 200_000) -> bytes:
    """Random bytes that show seed ``name``'s property: the shortest found,
    lengths growing as the search goes on."""
    best: bytes | None = None
    for i in range(tries):
        length = 8 + min(i // 64, 1500)
        if best is not None and length >= len(best):
            break
        data = rng.randbytes(length)
        if shows(name, data):
            best = data
    if best is None:
        raise RuntimeError("no input found")
    return best


def regenerate(directory: Path, everything: bool = False) -> list[str]:
    """Write a new seed for every name whose file is missing or lost its
    property (all of them with ``everything``); the names written."""
    written = []
    for name in SEEDS:
        path = directory / f"{name}.bin"
        if not everything and path.is_file() and shows(name, path.read_bytes()):
            continue
        path.write_bytes(search(name, random.Random(name)))
        written.append(name)
    for stale in directory.glob("*.bin"):
        if stale.stem not in SEEDS:
            stale.unlink()
            written.append(f"-{stale.stem}")
    return written


if __name__ == "__main__":
    from conformance.corpus import seeds_dir

    print("\n".join(regenerate(seeds_dir(), everything="--all" in sys.argv)) or "every seed still shows its property")
