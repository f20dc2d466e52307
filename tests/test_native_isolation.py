"""Isolation of programs run back to back in one process.

100,000 programs (a pool of mixed programs with varying fault injection,
arena sizes, NUMA and scratch layouts, cycled) run through one kernel
library in a fresh child process (so the RSS is the library's alone, and the
contained faults some programs provoke go to the only library loaded). The
child measures:

- RSS (/proc/self/statm) after 10k and after 100k programs. By 10k every pool
  program has run 40 times, so every buffer the runtime grows (records, text,
  snapshot, the arena and struct-page mappings, CPython's free lists and
  pymalloc arenas) has reached its steady size. Growth between 10k and 100k
  must stay under RSS_GROWTH_BOUND (2 MiB): a leak of even 24 bytes per
  program (smaller than any malloc chunk or Python object) would add
  90,000 x 24 B = 2.06 MiB.
  The RSS is sampled every 10k programs after gc.collect() and
  malloc_trim(0). Without that, glibc keeps freed heap memory, and the
  MiB-sized snapshot copies and page-sized bytes objects of each Outcome
  fragment the heap: the raw RSS wanders by several MiB, down as often as up,
  with no leak (measured 49..56 MiB over 150k programs); trimmed once at the
  end the growth still reads 1.5..2 MiB of stranded fragments; trimmed every
  10k it is flat to within 0.2 MiB from 30k programs on. Trimming cannot hide
  a leak: leaked memory is live and stays resident. Raw numbers are reported
  too.
- state carried over: every pool program's Outcome from its first run (in
  pool order, early) equals its Outcome from a run at the very end (in a
  shuffled order, so each follows a different predecessor), field by field
  including node_pages and the FDT bytes; and a reference program run first
  and last gives an identical Outcome.

Run ``python tests/test_native_isolation.py`` to print the measurements.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

TOTAL = 100_000
FIRST_MARK = 10_000
POOL = 250
RSS_GROWTH_BOUND = 2 << 20
SERIES, PAGE_SHIFT = "7.3", 12
OUTSIDE = 0x10_0000_0000  # unbacked, inside the direct map: a contained fault

REFERENCE = """page_shift 12
arena_pages 64
numa 0 0
numa 0x44 1
scratch 0x800000 0x400000
---
preserve_folio 0x10 2
preserve_pages 0x40 0x9
unpreserve_folio 0x77 0
add_subtree ref 0x10000 0x100
radix_add 0x200 1
kexec
restore_folio 0x10000
restore_pages 0x40000 4
restore_pages 0x44000 5
retrieve_subtree ref
retrieve_subtree kexec-metadata
"""


def make_pool(seed: int = 2024, n: int = POOL) -> list[str]:
    """Programs in text form: preserve/unpreserve (folios, page ranges, the
    radix API), subtrees, kexec and restores, with fail_alloc 0..24 (the boot
    alone makes 8 allocations), arena sizes that run out, NUMA splits,
    scratch areas, and a few contained faults and FDT corruptions."""
    rng = random.Random(seed)
    pool = []
    for _ in range(n):
        head = ["page_shift 12", f"arena_pages {rng.choice([12, 16, 64, 256])}"]
        if rng.random() < 0.5:
            head += ["numa 0 0", f"numa {rng.randrange(1, 0x80):#x} 1"]
        for i in range(rng.randrange(0, 3)):
            head.append(f"scratch {(0x800000 * (i + 1)):#x} {0x200000 * (i + 1):#x}")
        if rng.random() < 0.6:
            head.append(f"fail_alloc {rng.randrange(1, 25)}")
        preserved: list[tuple[str, int, int]] = []
        subtrees: list[tuple[str, int]] = []
        old, new = [], []
        for _ in range(rng.randrange(1, 9)):
            kind = rng.choice("ffffppuuUrRasSk")
            if kind == "f":
                order = rng.randrange(0, 6)
                pfn = rng.randrange(0, 0x400) << order
                if rng.random() < 0.1:
                    pfn = (rng.randrange(1, 1 << 20) << order)  # a distant path: more nodes
                preserved.append(("f", pfn, order))
                old.append(f"preserve_folio {pfn:#x} {order}")
            elif kind == "p":
                pfn, nr = rng.randrange(0, 0x400), rng.randrange(1, 40)
                preserved.append(("p", pfn, nr))
                old.append(f"preserve_pages {pfn:#x} {nr:#x}")
            elif kind == "u":
                if preserved and rng.random() < 0.7:
                    what, pfn, x = preserved.pop(rng.randrange(len(preserved)))
                else:
                    what, pfn, x = "f", rng.randrange(0, 0x800), 0  # never preserved: a warning
                old.append(f"unpreserve_folio {pfn:#x} {x}" if what == "f" else f"unpreserve_pages {pfn:#x} {x:#x}")
            elif kind == "U":
                old.append(f"unpreserve_pages {rng.randrange(0, 0x400):#x} {rng.randrange(1, 9):#x}")
            elif kind == "r":
                old.append(f"radix_add {rng.randrange(0, 0x1000):#x} {rng.randrange(0, 4)}")
            elif kind == "R":
                old.append(f"radix_del {rng.randrange(0, 0x1000):#x} {rng.randrange(0, 4)}")
            elif kind == "a":
                name, phys = rng.choice(["a", "b", "blob", "x" * 40]), rng.randrange(1, 0x100) << 12
                subtrees.append((name, phys))
                old.append(f"add_subtree {name} {phys:#x} {rng.randrange(1, 0x10000):#x}")
            elif kind == "s" and subtrees:
                old.append(f"remove_subtree {rng.choice(subtrees)[1]:#x}")
            elif kind == "k":
                # rare: a contained fault (old or next kernel) or a refused FDT
                old.append(rng.choice([f"poke_arena 1 {rng.choice([0, 2])} {OUTSIDE:#x}", "poke_fdt 0 0", "poke_fdt 0x30 0xff"]))
        for what, pfn, x in preserved:
            if what == "f":
                new.append(f"restore_folio {pfn << 12:#x}")
            else:
                new.append(f"restore_pages {pfn << 12:#x} {x:#x}")
        for name, _ in subtrees:
            new.append(f"retrieve_subtree {name}")
        new.append("retrieve_subtree kexec-metadata")
        rng.shuffle(new)
        body = old + (["kexec"] + new[: rng.randrange(0, len(new) + 1)] if rng.random() < 0.85 else [])
        pool.append("\n".join(head) + "\n---\n" + "\n".join(body) + "\n")
    return pool


def child_main(series: str, page_shift: int, total: int, first_mark: int) -> dict:
    import time

    from conformance.native.binding import NativeKernel
    from conformance.native.build import build
    from conformance.source import fetch
    from reference.program import parse_program

    h = NativeKernel(build(fetch(series), page_shift))
    pool = [parse_program(t) for t in make_pool()]
    ref = parse_program(REFERENCE)

    import ctypes
    import gc

    libc = ctypes.CDLL("libc.so.6")

    def rss() -> tuple[int, int]:
        """(raw RSS, RSS after gc.collect() and malloc_trim(0))."""
        with open("/proc/self/statm") as f:
            raw = int(f.read().split()[1]) * 4096
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/statm") as f:
            return raw, int(f.read().split()[1]) * 4096

    ref_first = h.run(ref)
    first = [None] * len(pool)
    kinds = {"events": 0, "boot_failed": 0, "enomem_ops": 0, "handovers": 0}
    start = time.perf_counter()
    rss_mark = (0, 0)
    samples: list[tuple[int, int]] = []
    for i in range(total):
        j = i % len(pool)
        o = h.run(pool[j])
        if i < len(pool):
            first[j] = o
            kinds["events"] += bool(o.events)
            kinds["boot_failed"] += o.boot.rc != 0
            kinds["enomem_ops"] += any(r.rc == -12 for r in o.ops)
            kinds["handovers"] += bool(o.next and o.next.accepted)
        if (i + 1) % first_mark == 0:
            samples.append(rss())
            if i + 1 == first_mark:
                rss_mark = samples[-1]
    elapsed = time.perf_counter() - start
    rss_end = samples[-1] if total % first_mark == 0 else rss()

    order = list(range(len(pool)))
    random.Random(5).shuffle(order)
    mismatches = []
    for j in order:
        o = h.run(pool[j])
        if o != first[j]:
            fields = [f for f in o.__dataclass_fields__ if getattr(o, f) != getattr(first[j], f)]
            mismatches.append({"program": j, "fields": fields})
    ref_last = h.run(ref)
    return {
        "programs": total, "seconds": round(elapsed, 2), "programs_per_s": round(total / elapsed),
        "rss_raw_at_mark": rss_mark[0], "rss_raw_at_end": rss_end[0],
        "rss_at_mark": rss_mark[1], "rss_at_end": rss_end[1], "mark": first_mark,
        "rss_samples_mib": [round(t / 2**20, 2) for _, t in samples],
        "mismatches": mismatches, "reference_identical": ref_first == ref_last,
        "reference_has_tree": bool(ref_first.tree and ref_first.node_pages and ref_first.fdt),
        "pool": kinds,
    }


def run_child(total: int = TOTAL, first_mark: int = FIRST_MARK) -> dict:
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
    from conftest import REPO, child_env, get_build

    get_build(SERIES, PAGE_SHIFT)
    proc = subprocess.run([sys.executable, __file__, "--child", str(total), str(first_mark)], capture_output=True,
                          text=True, cwd=REPO, env=child_env(), timeout=300)
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pool_exercises_what_it_claims():
    """Every op kind and fault injection occurs in the pool (what each
    program does when run is counted by the child, see below)."""
    pool = make_pool()
    assert len(pool) == POOL and len(set(pool)) == POOL
    text = "".join(pool)
    for op in ("preserve_folio", "preserve_pages", "unpreserve_folio", "unpreserve_pages", "add_subtree",
               "remove_subtree", "radix_add", "radix_del", "kexec", "restore_folio", "restore_pages",
               "retrieve_subtree", "poke_arena", "poke_fdt", "fail_alloc"):
        assert op in text, op


def test_100k_programs_no_leak_no_carry_over():
    r = run_child()
    mib = lambda x: f"{x / 2**20:.2f} MiB"  # noqa: E731
    print(f"\n{r['programs']} programs in {r['seconds']} s: {r['programs_per_s']} programs/s; trimmed RSS "
          f"{mib(r['rss_at_mark'])} after {r['mark']}, {mib(r['rss_at_end'])} after {r['programs']}; raw RSS "
          f"{mib(r['rss_raw_at_mark'])} -> {mib(r['rss_raw_at_end'])}; pool: {r['pool']}")
    assert r["reference_has_tree"]
    assert r["reference_identical"]
    assert r["mismatches"] == []
    assert r["rss_at_end"] - r["rss_at_mark"] < RSS_GROWTH_BOUND
    # the first pass really did mix these
    kinds = r["pool"]
    assert kinds["events"] > 0 and kinds["boot_failed"] > 0 and kinds["enomem_ops"] > 0 and kinds["handovers"] > POOL // 4


_STALE = r"""
from conformance.native.build import build
from conformance.source import fetch
from conformance.native.binding import NativeKernel
from reference.program import parse_program, ARENA_BASE_PHYS
h = NativeKernel(build(fetch("7.3"), 12))
# root slot 3 -> arena page 200: never allocated, so all zero in a fresh run
probe = parse_program("page_shift 12\n---\npoke_arena 1 3 %#x\nkexec\n" % (ARENA_BASE_PHYS + 200 * 4096))
fresh = h.run(probe)
# a program that writes a page above the allocator's high-water mark
h.run(parse_program("page_shift 12\n---\npoke_arena 200 0 0x1234\n"))
again = h.run(probe)
print(fresh == again, fresh.events, again.events)
"""


def test_arena_pages_above_high_water_mark_are_cleared():
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import REPO, child_env, get_build

    get_build("7.3", 12)
    proc = subprocess.run([sys.executable, "-c", _STALE], capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("True"), proc.stdout


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child_main(SERIES, PAGE_SHIFT, int(sys.argv[2]), int(sys.argv[3]))))
    else:
        print(json.dumps(run_child(), indent=1))
