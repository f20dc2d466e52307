"""``kho-conform check``: the conformance matrix.

For each (kernel source x page shift x flavor) cell, named checks:
- ``abi.constants``: depth, table/bitmap sizes, key width and node sizes as
  the tree's code defines them, against the model's geometry;
- ``abi.key-encoding``: the kernel's own encode/decode on edge vectors;
- ``doc.*``: every compatible string, property name, constant and macro the
  documentation shows, against the code's definitions (``conformance.doc``);
- ``scenario.*``: the deterministic scenario library through the
  differential engine;
- ``stateful``: a hypothesis state machine run;
- ``fuzz``: a short atheris run on the fuzz flavor (one per kernel and
  page shift: the fuzz flavor already carries ASan and UBSan).

And a handover row for every ordered pair of the sources (or of each source
with each ``partners`` kernel, both ways), per page shift and flavor: the old
kernel of one hands over to the next kernel of the other, through the
scenarios, the state machine and a fuzz run.

Known kernel bugs (corpus/known/) are reported as known, not hidden. A new
failure is saved as a finding (minimized, ``corpus/crashes/<signature>/``),
once per signature, so that it can be replayed, mailed and exported.

With ``coverage``, the scenarios, the state machine (same seed and examples)
and the fuzz corpus run again, per kernel and page shift, in a child process
on the coverage build; the report gets the kernel file's line, branch and
function coverage, with the lines the patch series changed marked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from fuzz.stats import FuzzPoint
from reference.geometry import PAGE_SHIFTS, geometry
from reference.keys import decode, encode
from reference.program import NOT_RUN

from .compare.diff import Comparison, Divergence, compare
from .compare.target import Pair, Target, target_for
from .compare.triage import triage
from .doc import doc_checks
from .errors import KhoConformError
from .native.build import build
from .native.coverage import measure, merge, profile_env
from .report import Cell, CheckResult, CoverageResult, Report
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
    fuzz_seconds: int = 20  # per (kernel or handover, page shift); 0 = no fuzzing
    crashes_dir: Path = Path("corpus/crashes")
    work_dir: Path = Path("reports/fuzz")
    # How the user selects each source (by digest), for reproducer commands: "--kernel 7.3", "--kernel-tree ~/linux".
    selections: dict[str, str] = field(default_factory=dict)
    coverage: bool = False  # measure the kernel file's coverage (coverage build flavor)
    # Released kernels each source hands over to and from (not tested on their own);
    # none: handovers between the sources themselves.
    partners: list[KernelSource] = field(default_factory=list)

    def handovers(self) -> list[tuple[KernelSource, KernelSource]]:
        """(old kernel's source, next kernel's source), every ordered pair."""
        if self.partners:
            pairs = [pair for s in self.sources for p in self.partners for pair in ((s, p), (p, s))]
        else:
            pairs = [(x, y) for x in self.sources for y in self.sources]
        return [(x, y) for x, y in pairs if x.digest() != y.digest()]

    def selection(self, old: KernelSource, new: KernelSource | None = None) -> str:
        """The flags that select ``old`` (handing over to ``new``) in replay and
        minimize; "" where none can (e.g. between two patched sources)."""
        flags = self.selections.get(old.digest(), "")
        if new is None or not flags:
            return flags
        if re.fullmatch(r"--kernel \S+", release := self.selections.get(new.digest(), "")):
            return f"{flags} --handover-to {release.split()[1]}"
        if re.fullmatch(r"--kernel \S+", flags) and release:
            return f"{release} --handover-from {flags.split()[1]}"
        return ""


class Findings:
    """New failures of one check run, saved once per signature (minimized) under
    ``crashes``: what a check reports as its program and reproducer."""

    def __init__(self, crashes: Path) -> None:
        self.crashes = crashes
        self.saved: dict[str, Path] = {}

    def save(self, cmp: Comparison, target: Target | Pair) -> tuple[str, str]:
        """(minimized program text, replay command) of a failing comparison."""
        from fuzz.findings import save_finding
        from fuzz.minimize import minimize, signature_predicate

        signature = triage(cmp, target, attribute=False).divergence.signature
        if signature not in self.saved:
            existing = self.crashes / signature
            if not (existing / "program.txt").is_file():
                small = minimize(cmp.program, signature_predicate(target, signature))
                existing = save_finding(self.crashes, small, cmp, target) or existing
            self.saved[signature] = existing
        path = self.saved[signature]
        return (path / "program.txt").read_text(), replay_command(path)


def replay_command(finding: Path) -> str:
    """How to replay a saved finding, its path as short as the working directory allows."""
    finding = Path(finding)
    if finding.is_absolute() and finding.is_relative_to(Path.cwd()):
        finding = finding.relative_to(Path.cwd())
    return f"kho-conform replay {shlex.quote(str(finding))}"


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


def comparison_result(name: str, cmp: Comparison, target: Target | Pair, reproducer: str,
                      findings: Findings | None = None) -> CheckResult:
    """A differential run as a check, by the triage policy: pass, known (every
    divergence proven to be a known finding's) or fail (something new). A new
    failure is saved in ``findings``; its reproducer is then the saved finding's."""
    verdict = triage(cmp, target)
    if verdict.status == "pass":
        ran = sum(r.rc != NOT_RUN for r in cmp.kernel.ops)
        if cmp.kernel.events:  # foreseen by the model, else it would not pass
            return CheckResult(name, "pass", detail=f"{ran} ops agree; op {cmp.kernel.event_ops[0]} outlasted the "
                                                    "CPU budget, as the model foresaw for its work")
        return CheckResult(name, "pass", detail=f"{ran} ops agree")
    d = verdict.divergence
    program = ""
    if verdict.status == "known":
        detail = f"{verdict.known_ids}{verdict.proof()}: {d.line()}"
    else:
        detail = d.line() + (f" (also known here: {verdict.known_ids})" if verdict.known else "")
        if findings is not None:
            program, reproducer = findings.save(cmp, target)
    return CheckResult(name, verdict.status, detail=detail[:300], divergence=d.to_json(),
                       known_id=verdict.known_ids, reproducer=reproducer, program=program)


def _scenario_checks(target: Target | Pair, selection: str, out: Path, findings: Findings) -> Iterator[CheckResult]:
    from .programs.scenarios import scenarios

    ps = target.page_shift
    programs = out / "programs" / f"ps{ps}"
    programs.mkdir(parents=True, exist_ok=True)
    for sc in scenarios(ps):
        path = programs / f"{sc.name}.txt"
        path.write_text(sc.program.text())
        repro = f"kho-conform replay {shlex.quote(str(path))} {selection} --page-shift {ps}".replace("  ", " ") if selection else ""
        yield _timed(sc.name, lambda sc=sc, repro=repro: comparison_result(sc.name, compare(sc.program, target), target, repro,
                                                                           findings))


def _stateful(target: Target | Pair, plan: Plan, findings: Findings) -> CheckResult:
    from .programs.machine import run_stateful

    failed: list[CheckResult] = []

    def on_failure(program, divergence) -> None:
        failed.append(comparison_result("stateful", compare(program, target), target, "", findings))

    ok, detail = run_stateful(target, max_examples=plan.examples, seed=0, on_failure=on_failure)
    if ok:
        return CheckResult("stateful", "pass", detail=detail[:300])
    if failed and failed[0].status == "fail":
        failed[0].detail = detail[:300]
        return failed[0]
    return CheckResult("stateful", "fail", detail=detail[:300])


def _fuzz_corpus(plan: Plan, source: KernelSource, ps: int, new: KernelSource | None = None) -> Path:
    return plan.work_dir / (f"{source.version}-to-{new.version}-ps{ps}" if new else f"{source.version}-ps{ps}")


def _fuzz(source: KernelSource, ps: int, plan: Plan,
          new: KernelSource | None = None) -> tuple[list[CheckResult], list[FuzzPoint]]:
    """The fuzz run (of ``source``, or of its handover to ``new``) as a
    check, and each new finding it saved as a check of its own."""
    from fuzz.findings import load_finding
    from fuzz.runner import run_fuzz

    # Ctrl-C stops the whole check, not only this fuzz run
    stats = run_fuzz(source=source, next_source=new, page_shift=ps, corpus_dir=_fuzz_corpus(plan, source, ps, new), jobs=1,
                     seconds=plan.fuzz_seconds, crashes_dir=plan.crashes_dir, live=False, return_on_interrupt=False)
    new = stats.new_findings
    detail = f"{stats.execs} execs, {stats.exec_per_s:.0f}/s, coverage {stats.coverage}, {len(new)} new findings"
    # The run is the check; what it found fails as checks of their own, one per finding.
    results = [CheckResult("fuzz", "pass", detail=detail + (" (the fuzz.<signature> checks)" if new else ""))]
    for path in new:
        first = load_finding(path)["first"]
        results.append(CheckResult(f"fuzz.{path.name}", "fail", detail=Divergence(**first).line()[:300], divergence=first,
                                   reproducer=replay_command(path), program=(path / "program.txt").read_text()))
    return results, stats.timeline


def _fuzz_checks(plan: Plan, progress: Callable[[str], None], what: str, source: KernelSource, ps: int,
                 new: KernelSource | None = None) -> tuple[list[CheckResult], list[FuzzPoint]]:
    progress(f"{what} ps{ps}: fuzz {plan.fuzz_seconds}s")
    start = time.monotonic()
    try:
        results, timeline = _fuzz(source, ps, plan, new)
    except Exception as e:
        results, timeline = [CheckResult("fuzz", "error", detail=f"{type(e).__name__}: {e}"[:300])], []
    results[0].seconds = round(time.monotonic() - start, 1)
    return results, timeline


def run_check(plan: Plan, out: Path, progress: Callable[[str], None] = lambda s: None) -> Report:
    cells = []
    findings = Findings(plan.crashes_dir)
    for source in plan.sources:
        docs: list[CheckResult] | None = None
        for ps in plan.page_shifts:
            for flavor in plan.flavors:
                progress(f"{source.version} ps{ps} {flavor}: build")
                start = time.monotonic()
                b = build(source, ps, flavor)
                target = target_for(b)
                if docs is None:  # per version: the same in every cell of it
                    progress(f"{source.version}: documentation against code")
                    docs = _doc_results(source)
                checks = [
                    _timed("abi.constants", lambda: _abi_constants(target)),
                    _timed("abi.key-encoding", lambda: _abi_keys(target)),
                    *(replace(d) for d in docs),
                ]
                progress(f"{source.version} ps{ps} {flavor}: scenarios")
                checks += list(_scenario_checks(target, plan.selection(source), out, findings))
                progress(f"{source.version} ps{ps} {flavor}: stateful")
                checks.append(_timed("stateful", lambda: _stateful(target, plan, findings)))
                timeline: list[FuzzPoint] = []
                if plan.fuzz_seconds and flavor == plan.flavors[0]:
                    results, timeline = _fuzz_checks(plan, progress, source.version, source, ps)
                    checks += results
                cells.append(Cell(source.version, ps, flavor, source.identity(), checks, timeline,
                                  build_seconds=round(time.monotonic() - start, 1)))
    for old, new in plan.handovers():
        for ps in plan.page_shifts:
            for flavor in plan.flavors:
                pair = Pair(target_for(build(old, ps, flavor)), target_for(build(new, ps, flavor)))
                progress(f"{pair.label}: scenarios")
                start = time.monotonic()
                checks = list(_scenario_checks(pair, plan.selection(old, new), out, findings))
                progress(f"{pair.label}: stateful")
                checks.append(_timed("stateful", lambda: _stateful(pair, plan, findings)))
                timeline = []
                if plan.fuzz_seconds and flavor == plan.flavors[0]:
                    results, timeline = _fuzz_checks(plan, progress, pair.kernels, old, ps, new)
                    checks += results
                cells.append(Cell(old.version, ps, flavor, old.identity(), checks, timeline,
                                  build_seconds=round(time.monotonic() - start, 1), next_kernel=new.version,
                                  next_source=new.identity()))
    coverage = []
    if plan.coverage:
        for source in plan.sources:
            progress(f"{source.version}: coverage")
            corpora = {ps: [_fuzz_corpus(plan, source, ps)] for ps in plan.page_shifts} if plan.fuzz_seconds else {}
            coverage.append(measure_coverage(source, plan.page_shifts, out / "coverage", examples=plan.examples,
                                             corpora=corpora))
    return Report(title="KHO radix tree conformance", created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  tool_version=tool_version(), cells=cells, notes=_notes(cells), coverage=coverage)


def _doc_results(source: KernelSource) -> list[CheckResult]:
    """The documentation checks of ``source``, timed together (one reading of the tree)."""
    start = time.monotonic()
    try:
        results = doc_checks(source)
    except Exception as e:  # as _timed: an error in the report, not a dead matrix
        results = [CheckResult("doc", "error", detail=f"{type(e).__name__}: {e}"[:300])]
    for r in results:
        r.seconds = round((time.monotonic() - start) / len(results), 3)
    return results


# A child process loads the coverage build (and nothing else), runs what the
# spec on stdin names and exits: at exit the profile runtime writes its counts.
_COVERAGE_CHILD = "from conformance.check import coverage_child; coverage_child()"
COVERAGE_TIMEOUT = 3600


def coverage_child() -> None:
    """Run the programs a spec (JSON on stdin) names on a coverage build:
    the scenarios, ``examples`` state machine examples (seed 0, as ``check``
    runs them), program texts and the inputs of fuzz corpus directories.
    Prints the counts."""
    from fuzz.decode import decode
    from reference.program import ProgramError, parse_program

    from .programs.machine import run_stateful
    from .programs.scenarios import scenarios

    spec = json.load(sys.stdin)
    source = KernelSource.from_identity(spec["source"], Path(spec["root"]))
    ps = spec["page_shift"]
    target = target_for(build(source, ps, "coverage"))
    runs = {"scenarios": 0, "stateful": 0, "programs": 0, "corpus": 0}
    for path in spec["programs"]:
        target.native.run(parse_program(Path(path).read_text()))
        runs["programs"] += 1
    if spec["scenarios"]:
        for sc in scenarios(ps):
            target.native.run(sc.program)
            runs["scenarios"] += 1
    if spec["examples"]:
        run_stateful(target, max_examples=spec["examples"], seed=0)
        runs["stateful"] = spec["examples"]
    for directory in map(Path, spec["corpora"]):
        for path in sorted(directory.iterdir()) if directory.is_dir() else ():
            try:
                target.native.run(decode(path.read_bytes(), ps))
            except (OSError, ProgramError, KhoConformError):
                continue  # not an input of this page shift
            runs["corpus"] += 1
    print(json.dumps(runs))


def measure_coverage(source: KernelSource, page_shifts: tuple[int, ...], work: Path, *, scenarios: bool = True,
                     examples: int = 0, programs: dict[int, list[Path]] | None = None,
                     corpora: dict[int, list[Path]] | None = None) -> CoverageResult:
    """Coverage of the kernel file by the scenarios, ``examples`` state
    machine examples, program texts and fuzz corpora (per page shift), over
    ``page_shifts``."""
    parts, runs = [], {}
    for ps in page_shifts:
        b = build(source, ps, "coverage")
        profiles = work / f"{source.digest()[:12]}-ps{ps}"
        shutil.rmtree(profiles, ignore_errors=True)
        profiles.mkdir(parents=True)
        spec = {"source": source.identity(), "root": str(source.root), "page_shift": ps, "scenarios": scenarios,
                "examples": examples, "programs": [str(p) for p in (programs or {}).get(ps, [])],
                "corpora": [str(p) for p in (corpora or {}).get(ps, [])]}
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | profile_env(profiles)
        try:
            proc = subprocess.run([sys.executable, "-c", _COVERAGE_CHILD], input=json.dumps(spec), env=env,
                                  capture_output=True, text=True, timeout=COVERAGE_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise KhoConformError(f"the coverage run of {source.version} ps{ps} took over {COVERAGE_TIMEOUT} s; "
                                  "use fewer --examples or a smaller corpus") from None
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise KhoConformError(f"the coverage run of {source.version} ps{ps} failed: {last}")
        for kind, n in json.loads(proc.stdout.strip().splitlines()[-1]).items():
            runs[kind] = runs.get(kind, 0) + n
        parts.append(measure(b, profiles))
    return CoverageResult(kernel=source.version, source=source.identity(), runs=runs, file=merge(parts))


def _notes(cells: list[Cell]) -> list[str]:
    """Documentation that does not match the code, once per kernel and item."""
    notes = []
    for c in cells:
        for ch in c.checks:
            if ch.name.startswith("doc.") and ch.status in ("fail", "known"):
                notes.append(f"{c.kernel}: {ch.name}: {ch.detail}" + (f" (known: {ch.known_id})" if ch.known_id else ""))
    return sorted(set(notes))
