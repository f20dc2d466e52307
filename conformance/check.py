"""``kho-conform check``: the conformance matrix.

For each (kernel source x page shift x flavor) cell, named checks:
- ``abi.constants``: depth, table/bitmap sizes, key width and node sizes as
  the tree's code defines them, against the model's geometry;
- ``abi.key-encoding``: the kernel's own encode/decode on edge vectors;
- ``doc.compatible``: the compatible string the ABI documentation shows,
  against the one the code writes;
- ``scenario.*``: the deterministic scenario library through the
  differential engine;
- ``stateful``: a hypothesis state machine run;
- ``fuzz``: a short atheris run on the fuzz flavor (one per kernel and
  page shift: the fuzz flavor already carries ASan and UBSan).
Known kernel bugs (corpus/known/) are reported as known, not hidden.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from fuzz.stats import FuzzPoint
from reference.geometry import PAGE_SHIFTS, geometry
from reference.keys import decode, encode

from .compare.diff import Comparison, compare
from .compare.target import Target, target_for
from .compare.triage import by_id, triage
from .native.build import build
from .report import Cell, CheckResult, Report
from .source import KernelSource


def tool_version() -> str:
    """The installed distribution's version (pyproject.toml is its one source)."""
    try:
        return metadata.version("kho-conform")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


@dataclass(frozen=True)
class Plan:
    sources: list[KernelSource]
    page_shifts: tuple[int, ...] = PAGE_SHIFTS
    flavors: tuple[str, ...] = ("plain",)
    examples: int = 30  # stateful examples per cell
    fuzz_seconds: int = 20  # per (kernel, page shift); 0 = no fuzzing
    crashes_dir: Path = Path("corpus/crashes")
    work_dir: Path = Path("reports/fuzz")
    reproduce_flags: str = ""  # how the user selected the kernel, for reproducer commands


def _timed(name: str, fn: Callable[[], CheckResult]) -> CheckResult:
    start = time.monotonic()
    try:
        result = fn()
    except Exception as e:  # a check that crashes is an error in the report, not a dead matrix
        result = CheckResult(name, "error", detail=f"{type(e).__name__}: {e}"[:300])
    result.seconds = round(time.monotonic() - start, 3)
    return result


def _abi_constants(target: Target) -> CheckResult:
    geo = geometry(target.build.page_shift)
    code = target.native.abi_constants()
    model = {"depth": geo.depth, "table_log2": geo.table_log2, "bitmap_log2": geo.bitmap_log2,
             "key_width": geo.key_width, "node_bytes": geo.page_size, "leaf_bytes": geo.page_size}
    bad = {k: (model[k], code[k]) for k in model if model[k] != code[k]}
    if bad:
        k, (e, a) = next(iter(bad.items()))
        return CheckResult("abi.constants", "fail", detail=f"{k}: model {e}, kernel {a}",
                           divergence={"op_index": None, "op": "", "field": k, "expected": str(e), "actual": str(a),
                                       "signature": f"abi-{k}", "check": "abi"})
    return CheckResult("abi.constants", "pass", detail=", ".join(f"{k}={v}" for k, v in code.items()))


def key_vectors(page_shift: int) -> list[tuple[int, int]]:
    """(phys, order) at the edges of the key domain: pfn 0, the top pfn of
    each order, orders 0..max, and alternating bit patterns."""
    geo = geometry(page_shift)
    top_order = 64 - page_shift - 1
    out = []
    for order in range(0, top_order + 1):
        shift = page_shift + order
        for pfn_bits in (0, 1, (1 << (64 - shift)) - 1, 0x5555555555555555 & ((1 << (64 - shift)) - 1)):
            out.append(((pfn_bits << shift) & (2**64 - 1), order))
    assert geo.key_width == 64 - page_shift + 1
    return out


def _abi_keys(target: Target) -> CheckResult:
    ps = target.build.page_shift
    vectors = key_vectors(ps)
    for phys, order in vectors:
        want = encode(phys, order, ps)
        got = target.native.encode_key(phys, order)
        back = target.native.decode_key(got)
        if got != want or back != decode(want, ps):
            return CheckResult("abi.key-encoding", "fail", detail=f"phys {phys:#x} order {order}",
                               divergence={"op_index": None, "op": f"encode({phys:#x}, {order})", "field": "key",
                                           "expected": f"{want:#x} -> {decode(want, ps)}", "actual": f"{got:#x} -> {back}",
                                           "signature": "abi-key-encoding", "check": "abi"})
    return CheckResult("abi.key-encoding", "pass", detail=f"{len(vectors)} vectors, orders 0..{64 - ps - 1}")


def _doc_compatible(target: Target) -> CheckResult:
    b = target.build
    if b.doc_compatible == b.compatible:
        return CheckResult("doc.compatible", "pass", detail=f"documentation and code both say {b.compatible!r}")
    div = {"op_index": None, "op": "", "field": "KHO_FDT_COMPATIBLE", "expected": repr(b.doc_compatible),
           "actual": repr(b.compatible), "signature": "doc-compatible", "check": "doc"}
    known = by_id("doc-compatible-stale")
    if known and known.affects(b.source.release):
        return CheckResult("doc.compatible", "known", detail=f"ABI doc shows {b.doc_compatible!r}, code writes {b.compatible!r}",
                           divergence=div, known_id=known.id)
    return CheckResult("doc.compatible", "fail", detail=f"ABI doc shows {b.doc_compatible!r}, code writes {b.compatible!r}", divergence=div)


def comparison_result(name: str, cmp: Comparison, target: Target, reproducer: str) -> CheckResult:
    """A differential run as a check, by the triage policy: pass, known (every
    divergence proven to be a known finding's) or fail (something new)."""
    verdict = triage(cmp, target)
    if verdict.status == "pass":
        return CheckResult(name, "pass", detail=f"{len(cmp.program.steps)} ops agree")
    d = verdict.divergence
    if verdict.status == "known":
        proof = f"; the model with quirk(s) {', '.join(sorted(verdict.quirks))} agrees" if verdict.quirks else ""
        detail = f"{verdict.known_ids}{proof}: {d.line()}"
    else:
        detail = d.line() + (f" (also known here: {verdict.known_ids})" if verdict.known else "")
    return CheckResult(name, verdict.status, detail=detail[:300], divergence=d.to_json(),
                       known_id=verdict.known_ids, reproducer=reproducer)


def _scenario_checks(target: Target, plan: Plan, out: Path) -> Iterator[CheckResult]:
    from .programs.scenarios import scenarios

    ps = target.build.page_shift
    programs = out / "programs" / f"ps{ps}"
    programs.mkdir(parents=True, exist_ok=True)
    for sc in scenarios(ps):
        path = programs / f"{sc.name}.txt"
        path.write_text(sc.program.text())
        repro = f"kho-conform replay {shlex.quote(str(path))} {plan.reproduce_flags} --page-shift {ps}".replace("  ", " ")
        yield _timed(sc.name, lambda sc=sc, repro=repro: comparison_result(sc.name, compare(sc.program, target), target, repro))


def _stateful(target: Target, plan: Plan) -> CheckResult:
    from .programs.machine import run_stateful

    ok, detail = run_stateful(target, max_examples=plan.examples, seed=0)
    return CheckResult("stateful", "pass" if ok else "fail", detail=detail[:300])


def _fuzz(source: KernelSource, ps: int, plan: Plan) -> tuple[CheckResult, list[FuzzPoint]]:
    from fuzz.runner import run_fuzz

    corpus = plan.work_dir / f"{source.version}-ps{ps}"
    # Ctrl-C stops the whole check, not only this fuzz run
    stats = run_fuzz(source=source, page_shift=ps, corpus_dir=corpus, jobs=1, seconds=plan.fuzz_seconds,
                     crashes_dir=plan.crashes_dir, live=False, return_on_interrupt=False)
    points = stats.timeline
    new = stats.new_findings
    status = "fail" if new else "pass"
    detail = f"{stats.execs} execs, {stats.exec_per_s:.0f}/s, coverage {stats.coverage}, {len(new)} new findings"
    repro = f"kho-conform replay {new[0]}" if new else ""
    return CheckResult("fuzz", status, detail=detail, reproducer=repro), points


def run_check(plan: Plan, out: Path, progress: Callable[[str], None] = lambda s: None) -> Report:
    cells = []
    for source in plan.sources:
        for ps in plan.page_shifts:
            for flavor in plan.flavors:
                progress(f"{source.version} ps{ps} {flavor}: build")
                start = time.monotonic()
                b = build(source, ps, flavor)
                target = target_for(b)
                checks = [
                    _timed("abi.constants", lambda: _abi_constants(target)),
                    _timed("abi.key-encoding", lambda: _abi_keys(target)),
                    _timed("doc.compatible", lambda: _doc_compatible(target)),
                ]
                progress(f"{source.version} ps{ps} {flavor}: scenarios")
                checks += list(_scenario_checks(target, plan, out))
                progress(f"{source.version} ps{ps} {flavor}: stateful")
                checks.append(_timed("stateful", lambda: _stateful(target, plan)))
                timeline: list[FuzzPoint] = []
                if plan.fuzz_seconds and flavor == plan.flavors[0]:
                    progress(f"{source.version} ps{ps}: fuzz {plan.fuzz_seconds}s")
                    fuzz_start = time.monotonic()
                    try:
                        result, timeline = _fuzz(source, ps, plan)
                    except Exception as e:
                        result = CheckResult("fuzz", "error", detail=f"{type(e).__name__}: {e}"[:300])
                    result.seconds = round(time.monotonic() - fuzz_start, 1)
                    checks.append(result)
                cells.append(Cell(source.version, ps, flavor, source.identity(), checks, timeline,
                                  build_seconds=round(time.monotonic() - start, 1)))
    return Report(title="KHO radix tree conformance", created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  tool_version=tool_version(), cells=cells, notes=_notes(cells))


def _notes(cells: list[Cell]) -> list[str]:
    notes = []
    for c in cells:
        for ch in c.checks:
            if ch.name == "doc.compatible" and ch.status != "pass":
                notes.append(f"{c.kernel}: {ch.detail}")
    return sorted(set(notes))
