"""``kho-conform bench``: speed and memory against the physical limit,
printed (``--json`` for machines), never asserted.

Each measurement is a function of a ``Bench`` context that prints its own
table and returns what it measured (JSON-able); ``MEASUREMENTS`` lists them
in the order they run, so another one is one more entry:

- ``rates``: on fixed programs of 16 and 256 ops, the native ``kc_run``
  alone (packed once, no record read back: the old kernel's call, then the
  next kernel's from the image it left), the binding (a run to an
  ``Outcome``), the model alone, the differential run (both, compared,
  handover checked both ways), and the ratio differential / native;
- ``breakdown``: where the differential run's time goes, by the code that
  spends it (cProfile's own time per file, over the fixed programs);
- ``harness``: the atheris entry point in the fuzz flavor under ``fuzz
  --jobs 1`` (one libFuzzer process, one core; every execution is a program
  compared: decoded, model, kernel, diff, triage; ``one_process``) against
  ``--jobs 2``;
- ``scattered``: time and peak memory of 10^5 and 10^6 scattered preserved
  pages on each side, each in a fresh process, with the size of the tree;
- ``mutation``: the median time ``kho-conform mutate`` takes to kill a
  mutant (build included), over an evenly spread sample of the mutants, one
  at a time;
- ``targets``: the targets of the speed work, met or not.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import random
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

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


FIXED_OPS = (16, 256)


@dataclass
class Bench:
    """What every measurement gets: the kernel, how long to measure, where
    to print."""

    source: KernelSource
    page_shift: int
    quick: bool
    console: Console
    results: dict = field(default_factory=dict)  # the measurements so far, by name

    @property
    def seconds(self) -> float:
        """Measuring time per rate."""
        return 0.5 if self.quick else 2.0

    def target(self):
        from .compare.target import target_for
        from .native.build import build

        return target_for(build(self.source, self.page_shift))


def _rate(fn: Callable[[], object], seconds: float) -> float:
    fn()  # warm: builds, caches
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def _kernel_calls(target, program: Program) -> Callable[[], None]:
    """The C work of one program alone: ``kc_run`` of the old kernel, then,
    after a kexec, of the next kernel from the image it left (packed once,
    beforehand)."""
    from cffi import FFI

    from .native.contract import pack_image, pack_program

    ffi = FFI()
    lib, null = target.native.lib, ffi.NULL
    old = ffi.from_buffer(pack_program(program))
    k = program.kexec_index()
    if k is None:
        return lambda: lib.kc_run(old, len(old), null, 0)
    nxt = ffi.from_buffer(pack_program(Program(program.header, program.steps[k:])))  # from its kexec on
    image = pack_image(target.native.run(program).image, 1 << program.header.page_shift)
    buffer = ffi.from_buffer(image)

    def calls() -> None:
        lib.kc_run(old, len(old), null, 0)
        lib.kc_run(nxt, len(nxt), buffer, len(image))

    return calls


def measure_rates(b: Bench) -> dict:
    from reference import model

    from .compare.diff import compare
    from .native.compiled_model import model_kind

    target = b.target()
    out = {}
    table = Table(title=f"programs per second, one process — {b.source.version} ps{b.page_shift}, model {model_kind()}")
    for col in ("ops", "native kc_run", "binding", "model", "differential", "differential / native"):
        table.add_column(col, justify="right")
    for n_ops in FIXED_OPS:
        program = fixed_program(n_ops, b.page_shift)
        rates = {
            "native": _rate(_kernel_calls(target, program), b.seconds),
            "binding": _rate(lambda: target.native.run(program), b.seconds),
            "model": _rate(lambda: model.run(program, target.profile), b.seconds),
            "differential": _rate(lambda: compare(program, target), b.seconds),
        }
        rates["differential_over_native"] = rates["differential"] / rates["native"]
        out[str(n_ops)] = rates
        table.add_row(str(n_ops), *(f"{rates[k]:,.0f}" for k in ("native", "binding", "model", "differential")),
                      f"1/{1 / rates['differential_over_native']:.1f}")
    b.console.print(table)
    return out


class _TimedLib:
    """The library with ``kc_run`` behind a Python function, so that the
    profiler sees the time spent in the kernel's C code."""

    def __init__(self, lib) -> None:
        self._lib = lib

    def __getattr__(self, name: str):
        return getattr(self._lib, name)

    def kc_run(self, *args):
        return self._lib.kc_run(*args)


# Where compare()'s time goes, by the code that spends it: each function's
# own time (cProfile's tottime) goes to the stage of its file; a builtin's
# (dict, struct, sorted...) to its callers'. Own times add up to the whole,
# whatever calls what, so a run before and after a change reads the same.
_STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kernel: kc_run (C)", ("conformance/bench.py",)),  # _TimedLib.kc_run: the C call is its own time
    ("model (reference/)", ("reference/",)),
    ("binding: packing, records to an Outcome (native/)", ("conformance/native/",)),
    ("compare: views, diff, cross handover (compare/)", ("conformance/compare/",)),
)
_OTHER = "other (libraries, interpreter)"


def _stage_of(path: str) -> str:
    return next((label for label, prefixes in _STAGES if any(p in path for p in prefixes)), _OTHER)


def _own_time_by_stage(stats: dict) -> dict[str, float]:
    out = dict.fromkeys([label for label, _ in _STAGES] + [_OTHER], 0.0)
    for (path, _, name), (_, _, tt, _, callers) in stats.items():
        if path == "~" and "reference." in name:  # the compiled model: "<built-in method reference.model.run>"
            out[_stage_of("reference/")] += tt
        elif path == "~" and callers:  # a builtin: its time is its callers'
            for (cpath, _, _), (_, _, ctt, _) in callers.items():
                out[_stage_of(cpath)] += ctt
        else:
            out[_stage_of(path)] += tt
    return out


def measure_breakdown(b: Bench) -> dict:
    """Shares of the differential run's time by stage, under cProfile (which
    slows Python more than C: the shares are what matters)."""
    from .compare.diff import compare

    target = b.target()
    target.native.lib = _TimedLib(target.native.lib)
    out = {}
    table = Table(title="where the differential run's time goes (cProfile, share of compare())")
    table.add_column("stage")
    for n_ops in FIXED_OPS:
        table.add_column(f"{n_ops} ops", justify="right")
    shares: dict[str, list[str]] = {}
    for n_ops in FIXED_OPS:
        program = fixed_program(n_ops, b.page_shift)
        compare(program, target)
        profile = cProfile.Profile()
        n, start = 0, time.perf_counter()
        profile.enable()
        while time.perf_counter() - start < b.seconds:
            compare(program, target)
            n += 1
        profile.disable()
        stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
        stages = _own_time_by_stage(stats)
        total = sum(stages.values())
        out[str(n_ops)] = {"compares": n, "profiled_seconds": total,
                           "shares": {k: v / total if total else 0.0 for k, v in stages.items()}}
        for label, share in out[str(n_ops)]["shares"].items():
            shares.setdefault(label, []).append(f"{100 * share:.0f}%")
    for label, cells in shares.items():
        table.add_row(label, *cells)
    b.console.print(table)
    return out


# ``fuzz --jobs 1`` and ``--jobs 2``, alternated: how many programs a run
# compares depends on how many inputs that keep the kernel at its CPU
# budget it happens on (each costs about a hundred ordinary ones), so one
# pair of runs can put the ratio anywhere from below 1x to over 3x.
JOBS_ROUNDS = 2
# Beyond this, two cores cannot have done it: the runs varied more than
# they scaled, and the ratio tells nothing.
JOBS_PLAUSIBLE = 2.4


def measure_harness(b: Bench) -> dict:
    """The atheris entry point in the fuzz flavor: ``fuzz`` with 1 job (one
    libFuzzer process, one core) and with 2, ``JOBS_ROUNDS`` times each,
    alternated, from the seeds; libFuzzer's own count of programs."""
    from fuzz.runner import run_fuzz

    seconds = 10 if b.quick else 30
    with temp_dir(prefix="kho-bench-") as tmp:  # removed even if bench is killed
        runs: dict[str, list[int]] = {"1": [], "2": []}
        spent = {"1": 0.0, "2": 0.0}
        for rnd in range(JOBS_ROUNDS):
            for n in (1, 2):
                stats = run_fuzz(source=b.source, page_shift=b.page_shift, corpus_dir=tmp / f"corpus-{n}-{rnd}", jobs=n,
                                 seconds=seconds, crashes_dir=tmp / "crashes", live=False, return_on_interrupt=False)
                runs[str(n)].append(stats.execs)
                spent[str(n)] += stats.seconds
    jobs = {n: {"execs": sum(r), "runs": r, "seconds": spent[n], "exec_per_s": sum(r) / spent[n] if spent[n] else 0.0}
            for n, r in runs.items()}
    out = {"one_process": {k: jobs["1"][k] for k in ("execs", "seconds", "exec_per_s")},
           "fuzz_jobs": jobs, "jobs_2_over_1": jobs["2"]["execs"] / jobs["1"]["execs"] if jobs["1"]["execs"] else 0.0}
    table = Table(title=f"atheris entry point, fuzz flavor (native coverage, ASan+UBSan), {seconds} s each")
    for col in ("run", "programs compared", "per second"):
        table.add_column(col, justify="right")
    for n, r in jobs.items():
        each = " + ".join(f"{x:,}" for x in r["runs"])
        table.add_row(f"kho-conform fuzz --jobs {n}{' (one core)' if n == '1' else ''}, {JOBS_ROUNDS} runs", each,
                      f"{r['exec_per_s']:,.0f}")
    b.console.print(table)
    b.console.print(f"fuzz --jobs 2 / --jobs 1: {out['jobs_2_over_1']:.2f}x the programs", highlight=False)
    return out


# Run in a fresh interpreter so that its peak RSS belongs to one workload.
_WORKER = """
import json, resource, sys, time
from pathlib import Path
from conformance.bench import scattered_program
from conformance.compare.target import target_for
from conformance.native.build import build
from conformance.source import KernelSource
which, n, ps, src = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
target = target_for(build(KernelSource.from_identity(src, Path(src["root"])), ps))
program = scattered_program(n, ps)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if which == "model":
    from reference.model import run
    outcome = run(program, target.profile)
else:
    outcome = target.native.run(program)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "base_mib": base / 1024,
                  "tree_pages": len(outcome.node_pages), "tree_mib": len(outcome.node_pages) * (1 << ps) / 2**20}))
"""


def _scattered_run(which: str, n: int, page_shift: int, source: KernelSource) -> dict:
    src = {**source.identity(), "root": str(source.root)}
    proc = subprocess.run([sys.executable, "-c", _WORKER, which, str(n), str(page_shift), json.dumps(src)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode:
        return {"seconds": float("nan"), "peak_mib": float("nan"), "base_mib": float("nan"),
                "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout)


def measure_scattered(b: Bench) -> dict:
    b.target()  # built here, not in the measuring processes
    table = Table(title="scattered order-0 pages, then kexec (fresh process each; base: the program built)")
    for col in ("pages", "side", "seconds", "peak MiB", "base MiB", "peak - base", "tree pages", "tree MiB"):
        table.add_column(col, justify="right")
    out = {}
    for n in ((10**5,) if b.quick else (10**5, 10**6)):
        out[str(n)] = {}
        for side in ("model", "c"):
            r = _scattered_run(side, n, b.page_shift, b.source)
            out[str(n)][side] = r
            table.add_row(f"{n:,}", side, f"{r['seconds']:.2f}", f"{r['peak_mib']:.0f}", f"{r['base_mib']:.0f}",
                          f"{r['peak_mib'] - r['base_mib']:.0f}", f"{r.get('tree_pages', 0):,}", f"{r.get('tree_mib', 0.0):.0f}")
    b.console.print(table)
    return out


def measure_mutation(b: Bench) -> dict:
    """Run every n-th mutant of the reached functions, one job, in a scratch
    output directory; the median seconds from start to kill."""
    from .mutate import Settings, plan, run_mutation

    sample = 8 if b.quick else 30
    settings = Settings(page_shift=b.page_shift, jobs=1)
    with temp_dir(prefix="kho-bench-") as tmp:  # removed even if bench is killed
        p = plan(b.source, settings, tmp)
        p = replace(p, mutants=p.mutants[:: max(1, len(p.mutants) // sample)][:sample])
        r = run_mutation(b.source, settings, tmp, p)
    k = {"mutants": len(r.mutants), **r.counts(), "median_kill_seconds": r.median_kill_seconds(), "seconds": r.seconds}
    median = "–" if k["median_kill_seconds"] is None else f"{k['median_kill_seconds']:.2f} s"
    b.console.print(f"mutate: median time to kill a mutant {median} ({k['killed']} killed, {k['survived']} survived, "
                    f"{k['did-not-build']} did not build, {k['timed-out']} timed out of {k['mutants']} sampled; "
                    f"{k['seconds']:.0f} s)", highlight=False)
    return k


def _target_rows(results: dict) -> list[tuple[str, str, str, bool | None]]:
    """(target, goal, measured, met) for what was measured."""
    rows: list[tuple[str, str, str, bool | None]] = []
    for n_ops, r in results.get("rates", {}).items():
        ratio = r["differential_over_native"]
        rows.append((f"differential / native kc_run, {n_ops} ops", ">= 1/5", f"1/{1 / ratio:.1f}", ratio >= 0.2))
    harness = results.get("harness")
    if harness:
        rate = harness["one_process"]["exec_per_s"]
        rows.append(("atheris harness, fuzz flavor, one core", ">= 1,500/s", f"{rate:,.0f}/s", rate >= 1500))
        scale = harness["jobs_2_over_1"]
        rows.append(("fuzz --jobs 2 / --jobs 1", "close to 2x", f"{scale:.2f}x",
                     None if scale > JOBS_PLAUSIBLE else scale >= 1.8))
    big = results.get("scattered", {}).get(str(10**6))
    if big:
        for side, secs, mib in (("model", 3, 300), ("c", 1, 400)):
            r = big[side]
            rows.append((f"10^6 scattered pages, {side}: time", f"<= {secs} s", f"{r['seconds']:.2f} s", r["seconds"] <= secs))
            rows.append((f"10^6 scattered pages, {side}: peak memory", f"<= {mib} MiB",
                         f"{r['peak_mib']:.0f} MiB ({r['peak_mib'] - r['base_mib']:.0f} above the program)", r["peak_mib"] <= mib))
    return rows


def measure_targets(b: Bench) -> dict:
    rows = _target_rows(b.results)
    table = Table(title="targets")
    for col in ("target", "goal", "measured", "met"):
        table.add_column(col, justify="right" if col != "target" else "left")
    for name, goal, got, met in rows:
        table.add_row(name, goal, got, "unclear: the runs varied more than they scaled" if met is None
                      else "yes" if met else "no")
    b.console.print(table)
    return {name: {"goal": goal, "measured": got, "met": met} for name, goal, got, met in rows}


class Measurement(NamedTuple):
    name: str  # its key in the results
    run: Callable[[Bench], dict]


MEASUREMENTS: tuple[Measurement, ...] = (
    Measurement("rates", measure_rates),
    Measurement("breakdown", measure_breakdown),
    Measurement("harness", measure_harness),
    Measurement("scattered", measure_scattered),
    Measurement("mutation", measure_mutation),
    Measurement("targets", measure_targets),
)


def run_bench(source: KernelSource, page_shift: int, *, quick: bool, console: Console, as_json: bool = False,
              only: Collection[str] = ()) -> dict:
    """Every measurement in turn (or those named in ``only``; the targets
    always, of what was measured); with ``as_json`` the tables go to stderr
    and stdout gets the results as one JSON document."""
    b = Bench(source, page_shift, quick, Console(stderr=True) if as_json else console)
    b.results.update(kernel=source.version, page_shift=page_shift, quick=quick)
    for m in MEASUREMENTS:
        if not only or m.name in only or m.name == "targets":
            b.results[m.name] = m.run(b)
    if as_json:
        print(json.dumps(b.results, indent=1))
    return b.results
