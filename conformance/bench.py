"""``kho-conform bench``: speed and memory, printed, never asserted.

(a) the native kernel through the binding, (b) the model alone, (c) the full differential run
(both, compared, handover checked both ways), (d) the atheris entry point with
native coverage, on fixed programs of 16 and 256 ops; the ratio (c)/(a);
time and peak memory of model and C for 10^5 and 10^6 scattered preserved
pages (each measured in a fresh process, so peak RSS is its own); and (e) the
median time ``kho-conform mutate`` takes to kill a mutant (build included),
over an evenly spread sample of the mutants, one at a time.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from reference.program import Header, Op, Program, Step

from .processes import temp_dir
from .source import KernelSource


def fixed_program(n_ops: int, page_shift: int, seed: int = 1) -> Program:
    """A deterministic program of n_ops ops: preserves, unpreserves, subtrees,
    one kexec two thirds in, restores of what was preserved."""
    rng = random.Random(seed)
    header = Header(page_shift=page_shift, ram=((0, 1 << 20),), numa=((0, 0), (1 << 19, 1)), arena_pages=1024)
    steps: list[Step] = []
    preserved: list[tuple[int, int]] = []
    kexec_at = (2 * n_ops) // 3
    for i in range(n_ops - 1):
        if i == kexec_at:
            steps.append(Step(Op.KEXEC))
        elif i > kexec_at:
            pfn, order = rng.choice(preserved) if preserved else (0, 0)
            steps.append(Step(Op.RESTORE_FOLIO, pfn << page_shift) if order else Step(Op.RESTORE_PAGES, pfn << page_shift, 1))
        else:
            kind = rng.random()
            order = rng.randrange(0, 6)
            pfn = rng.randrange(0, 1 << 20) & ~((1 << order) - 1)
            if kind < 0.5:
                steps.append(Step(Op.PRESERVE_FOLIO, pfn, order))
                preserved.append((pfn, order))
            elif kind < 0.7:
                steps.append(Step(Op.PRESERVE_PAGES, pfn, rng.randrange(1, 64)))
            elif kind < 0.85 and preserved:
                pfn, order = preserved.pop()
                steps.append(Step(Op.UNPRESERVE_FOLIO, pfn, order))
            else:
                steps.append(Step(Op.ADD_SUBTREE, (1 << 30) + i * 4096, 64, name=f"blob{i % 7}"))
    steps.append(Step(Op.RETRIEVE_SUBTREE, name="blob1"))
    return Program(header, tuple(steps))


def scattered_program(n_pages: int, page_shift: int, seed: int = 2) -> Program:
    """n_pages order-0 pages at random pfns below 2^30, then kexec."""
    rng = random.Random(seed)
    pfns = rng.sample(range(1 << 30), n_pages)
    steps = tuple(Step(Op.PRESERVE_FOLIO, pfn, 0) for pfn in pfns) + (Step(Op.KEXEC),)
    header = Header(page_shift=page_shift, ram=((0, 1 << 27),), arena_pages=1 << 17)
    return Program(header, steps)


def _rate(fn: Callable[[], object], seconds: float) -> float:
    fn()  # warm: builds, caches
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


# Run in a fresh interpreter so that its peak RSS belongs to one workload.
_WORKER = """
import json, resource, sys, time
from pathlib import Path
from conformance.bench import scattered_program
from conformance.compare.target import target_for
from conformance.native.build import build
from conformance.source import KernelSource
which, n, ps, src = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
program = scattered_program(n, ps)
target = target_for(build(KernelSource.from_identity(src, Path(src["root"])), ps))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if which == "model":
    from reference.model import run
    run(program, target.profile)
else:
    target.native.run(program)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_mib": base / 1024}))
"""


def _measure(which: str, n: int, page_shift: int, source: KernelSource) -> dict:
    src = {**source.identity(), "root": str(source.root)}
    proc = subprocess.run([sys.executable, "-c", _WORKER, which, str(n), str(page_shift), json.dumps(src)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode:
        return {"seconds": float("nan"), "peak_mib": float("nan"), "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout)


def _atheris_rate(source: KernelSource, page_shift: int, seconds: int) -> float:
    """libFuzzer's own exec/s for the atheris entry point on the fuzz flavor,
    from the seeds, in a scratch corpus (findings go to a scratch dir too)."""
    from fuzz.runner import run_fuzz

    with temp_dir(prefix="kho-bench-") as tmp:  # removed even if bench is killed
        stats = run_fuzz(source=source, page_shift=page_shift, corpus_dir=tmp / "corpus", jobs=1,
                         seconds=seconds, crashes_dir=tmp / "crashes", live=False, return_on_interrupt=False)
    return stats.mean_exec_per_s


def _time_to_kill(source: KernelSource, page_shift: int, sample: int) -> dict:
    """Run every n-th mutant of the reached functions, one job, in a scratch
    output directory; the median seconds from start to kill."""
    from .mutate import Settings, plan, run_mutation

    settings = Settings(page_shift=page_shift, jobs=1)
    with temp_dir(prefix="kho-bench-") as tmp:  # removed even if bench is killed
        p = plan(source, settings, tmp)
        p = replace(p, mutants=p.mutants[:: max(1, len(p.mutants) // sample)][:sample])
        r = run_mutation(source, settings, tmp, p)
    return {"mutants": len(r.mutants), **r.counts(), "median_kill_seconds": r.median_kill_seconds(), "seconds": r.seconds}


def run_bench(source: KernelSource, page_shift: int, *, quick: bool, console: Console) -> dict:
    from reference import model

    from .compare.diff import compare
    from .compare.target import target_for
    from .native.build import build

    target = target_for(build(source, page_shift))
    seconds = 0.5 if quick else 2.0
    results: dict = {"kernel": source.version, "page_shift": page_shift, "programs": {}}
    table = Table(title=f"executions per second — {source.version} ps{page_shift}")
    for col in ("ops", "(a) native", "(b) model", "(c) differential", "(c)/(a)"):
        table.add_column(col, justify="right")
    for n_ops in (16, 256):
        program = fixed_program(n_ops, page_shift)
        a = _rate(lambda: target.native.run(program), seconds)
        b = _rate(lambda: model.run(program, target.profile), seconds)
        c = _rate(lambda: compare(program, target), seconds)
        results["programs"][n_ops] = {"native": a, "model": b, "differential": c, "ratio_c_over_a": c / a}
        table.add_row(str(n_ops), f"{a:,.0f}", f"{b:,.0f}", f"{c:,.0f}", f"{c / a:.3f}")
    console.print(table)

    d = _atheris_rate(source, page_shift, seconds=10 if quick else 30)
    results["atheris_exec_per_s"] = d
    console.print(f"(d) atheris entry point, fuzz flavor (native coverage, ASan+UBSan): {d:,.0f} exec/s")

    mem = Table(title="scattered preserved pages (fresh process each)")
    for col in ("pages", "model s", "model peak MiB", "C s", "C peak MiB"):
        mem.add_column(col, justify="right")
    results["scattered"] = {}
    for n in ((10**5,) if quick else (10**5, 10**6)):
        m = _measure("model", n, page_shift, source)
        c = _measure("c", n, page_shift, source)
        results["scattered"][n] = {"model": m, "c": c}
        mem.add_row(f"{n:,}", f"{m['seconds']:.2f}", f"{m['peak_mib']:.0f}", f"{c['seconds']:.2f}", f"{c['peak_mib']:.0f}")
    console.print(mem)

    k = results["mutation"] = _time_to_kill(source, page_shift, sample=8 if quick else 30)
    median = "–" if k["median_kill_seconds"] is None else f"{k['median_kill_seconds']:.2f} s"
    console.print(f"(e) mutate: median time to kill a mutant {median} ({k['killed']} killed, {k['survived']} survived, "
                  f"{k['did-not-build']} did not build, {k['timed-out']} timed out of {k['mutants']} sampled; {k['seconds']:.0f} s)")
    console.print_json(json.dumps(results))
    return results
