"""The results schema: one conformance report, as every renderer and
``report.json`` see it. :func:`load_report` rebuilds a report from its JSON,
so a report can be re-rendered or compared later."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuzz.stats import FuzzPoint

from ..errors import KhoConformError
from ..native.coverage import FileCoverage, FunctionCoverage
from ..source.identity import handover_label, short_digest

STATUSES = ("pass", "fail", "known", "error", "skipped")
# Characters XML 1.0 forbids (and lone surrogates, which cannot be written as UTF-8).
_BAD_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass
class CheckResult:
    name: str
    status: str
    seconds: float = 0.0
    detail: str = ""
    divergence: dict | None = None
    known_id: str = ""
    reproducer: str = ""
    program: str = ""  # a new failure's minimized program (text form), as saved with its finding

    def __post_init__(self) -> None:
        # A typo'd status would otherwise count as neither pass nor fail and slip past exit_status.
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name!r}: status {self.status!r} is not one of {', '.join(STATUSES)}")


@dataclass
class Cell:
    """One row of the matrix: a kernel (``kernel``, ``source``) at a page
    shift and flavor, or a handover from it to another kernel (``next_kernel``,
    ``next_source``): the old kernel of one, the next kernel of the other."""

    kernel: str
    page_shift: int
    flavor: str
    source: dict
    checks: list[CheckResult]
    fuzz_timeline: list[FuzzPoint] = field(default_factory=list)
    build_seconds: float = 0.0
    next_kernel: str = ""
    next_source: dict = field(default_factory=dict)

    @property
    def kernels(self) -> str:
        """"7.3.4", or "handover 7.2.13 → 7.3.4"."""
        return handover_label(self.kernel, self.next_kernel) if self.next_kernel else self.kernel

    @property
    def name(self) -> str:
        return f"{self.kernels} ps{self.page_shift} {self.flavor}"

    def sources(self) -> list[dict]:
        return [self.source, self.next_source] if self.next_kernel else [self.source]

    def known_findings(self) -> list[str]:
        """The distinct known findings the cell's checks reached."""
        return sorted({i for k in self.checks if k.status == "known" for i in k.known_id.split(",") if i})

    def counts(self) -> dict[str, int]:
        """Checks per status, except "known": the distinct known findings
        reached (one kernel bug behind thirty scenarios is one finding)."""
        out = dict.fromkeys(STATUSES, 0)
        for check in self.checks:
            if check.status != "known":
                out[check.status] += 1
        out["known"] = len(self.known_findings())
        return out


@dataclass
class CoverageResult:
    """What ran on one kernel source's coverage builds, and the kernel file's coverage."""

    kernel: str
    source: dict  # the source identity (its changed_lines name the patch series' lines)
    runs: dict[str, int]  # programs run, by kind: scenarios, stateful (examples), corpus (inputs)
    file: FileCoverage


MUTANT_STATUSES = ("killed", "survived", "did-not-build", "timed-out")


def mutant_name(function: str, line: int, kind: str, mutant_id: str) -> str:
    """How reports and the command line name a mutant."""
    return f"{function}:{line}:{kind}:{mutant_id}"


@dataclass
class MutantResult:
    """One mutant of ``kho-conform mutate`` and what the suite made of it."""

    id: str
    function: str
    line: int
    kind: str  # the operator (conformance.mutate.mutants.KINDS)
    description: str
    status: str  # one of MUTANT_STATUSES
    check: str = ""  # killed: the first check whose verdict changed
    detail: str = ""  # killed: that verdict; did-not-build: the compiler's error; timed-out: the budget
    seconds: float = 0.0  # from start to verdict, its build included
    diff: str = ""  # survivors: the unified diff of the mutated line(s)
    changed: list[str] = field(default_factory=list)  # survivors: "check: fields" where the kernel behaved otherwise

    @property
    def name(self) -> str:
        return mutant_name(self.function, self.line, self.kind, self.id)

    def __post_init__(self) -> None:
        if self.status not in MUTANT_STATUSES:
            raise ValueError(f"mutant {self.id}: status {self.status!r} is not one of {', '.join(MUTANT_STATUSES)}")


@dataclass
class MutationResult:
    """A mutation run: how many mutants of each reached function the checks
    killed. Score: killed and timed-out over every mutant that built."""

    kernel: str
    source: dict
    page_shift: int
    settings: dict  # fuzz inputs, timeout, jobs, the functions and lines asked for
    functions: list[str]  # the mutated functions, in file order
    mutants: list[MutantResult]
    seconds: float = 0.0  # wall time of the run that finished it

    def counts(self, function: str | None = None) -> dict[str, int]:
        out = dict.fromkeys(MUTANT_STATUSES, 0)
        for m in self.mutants:
            if function is None or m.function == function:
                out[m.status] += 1
        return out

    def score(self, function: str | None = None) -> float | None:
        n = self.counts(function)
        built = n["killed"] + n["timed-out"] + n["survived"]
        return (n["killed"] + n["timed-out"]) / built if built else None

    def median_kill_seconds(self) -> float | None:
        times = sorted(m.seconds for m in self.mutants if m.status == "killed")
        if not times:
            return None
        mid = len(times) // 2
        return times[mid] if len(times) % 2 else (times[mid - 1] + times[mid]) / 2

    def survivors(self) -> list[MutantResult]:
        return [m for m in self.mutants if m.status == "survived"]


@dataclass
class Report:
    title: str
    created: str
    tool_version: str
    cells: list[Cell]
    notes: list[str] = field(default_factory=list)
    coverage: list[CoverageResult] = field(default_factory=list)
    mutation: list[MutationResult] = field(default_factory=list)


def _coverage(data: dict) -> CoverageResult:
    f = dict(data["file"])
    f["functions"] = [FunctionCoverage(**fn) for fn in f.get("functions", [])]
    return CoverageResult(data["kernel"], data.get("source", {}), data.get("runs", {}), FileCoverage(**f))


def _mutation(data: dict) -> MutationResult:
    m = dict(data)
    m["mutants"] = [MutantResult(**x) for x in m.get("mutants", [])]
    return MutationResult(**m)


def load_report(path: Path) -> Report:
    """Rebuild a Report from a report.json written by ``write_report`` (also
    by an older kho-conform: fields added since have defaults); a one-line
    error naming the file and what is wrong with it otherwise."""
    path = Path(path)
    fix = "give a report.json that kho-conform check wrote (check --out DIR writes a new one)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KhoConformError(f"{path}: no such file; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise KhoConformError(f"{path}: not readable as a report ({e}); {fix}") from None
    where = "the top level"
    try:
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        cells = []
        for i, c in enumerate(_required(data, "cells", list)):
            where = f"cells[{i}]"
            if not isinstance(c, dict):
                raise TypeError("not a JSON object")
            checks = [CheckResult(**k) for k in c.get("checks", [])]
            timeline = [FuzzPoint(**p) for p in c.get("fuzz_timeline", [])]
            cells.append(Cell(_required(c, "kernel", str), _required(c, "page_shift", int), _required(c, "flavor", str),
                              c.get("source", {}), checks, timeline, c.get("build_seconds", 0.0),
                              c.get("next_kernel", ""), c.get("next_source", {})))
        where = "coverage"
        coverage = [_coverage(c) for c in data.get("coverage", [])]
        where = "mutation"
        mutation = [_mutation(m) for m in data.get("mutation", [])]
        where = "the top level"
        return Report(_required(data, "title", str), _required(data, "created", str), _required(data, "tool_version", str),
                      cells, list(data.get("notes", [])), coverage, mutation)
    except (TypeError, ValueError, AttributeError) as e:
        raise KhoConformError(f"{path}: not a kho-conform report ({where}: {e}); {fix}") from None


def _required(data: dict, key: str, kind: type) -> Any:
    if key not in data:
        raise ValueError(f"{key!r} is missing")
    if not isinstance(data[key], kind):
        raise TypeError(f"{key!r} is not a {kind.__name__}")
    return data[key]


def exit_status(report: Report) -> int:
    """1 if any check failed or errored; known kernel bugs do not fail the run."""
    return int(any(k.status in ("fail", "error") for c in report.cells for k in c.checks))


def clean(text: Any) -> str:
    return _BAD_XML.sub("\ufffd", str(text))


def verdict(counts: dict[str, int]) -> str:
    return "❌" if counts["fail"] or counts["error"] else "⚠" if counts["known"] else "✅"


def source_label(source: dict) -> str:
    return f"{source.get('version', '?')} via {source.get('provider', '?')} (files {short_digest(source)})"


def sources_label(cell: Cell) -> str:
    """The cell's kernel source, or for a handover: old kernel's → next kernel's."""
    return " → ".join(map(source_label, cell.sources()))


def divergences(report: Report) -> list[tuple[Cell, CheckResult]]:
    return [(c, k) for c in report.cells for k in c.checks if k.status in ("fail", "known")]


# Check families, in matrix order: a check's group is its name up to the first
# dot; scenarios are further split by what they exercise.
GROUPS = {"abi": "ABI", "doc": "doc", "scenario": "scenarios", "stateful": "state machine", "fuzz": "fuzz",
          "handover": "handover"}
WORST_FIRST = ("fail", "error", "known", "skipped", "pass")
_NUMBERED = re.compile(r"-\d+$")


def check_families(names: list[str]) -> dict[str, tuple[str, str]]:
    """Check name -> (group, family), e.g. "scenario.alloc-failure-3" ->
    ("scenario", "alloc-failure"). Scenario families drop a trailing number
    and merge on a shared first word ("corrupt-fdt", "corrupt-root" ->
    "corrupt"); other groups are one family each."""
    stems = {n: _NUMBERED.sub("", n.split(".", 1)[1]) for n in names if n.startswith("scenario.") and "." in n}
    words: dict[str, set[str]] = {}
    for stem in stems.values():
        words.setdefault(stem.split("-", 1)[0], set()).add(stem)
    out = {}
    for n in names:
        group = n.split(".", 1)[0]
        if n in stems:
            stem = stems[n]
            word = stem.split("-", 1)[0]
            out[n] = (group, word if len(words[word]) > 1 else stem)
        else:
            out[n] = (group, GROUPS.get(group, group))
    return out


def worst(statuses: list[str]) -> str:
    return next((s for s in WORST_FIRST if s in statuses), "pass")


@dataclass
class NewFinding:
    """A new failure (no known finding explains it), once per signature,
    with every check and cell that showed it."""

    signature: str
    check: CheckResult  # the first check that showed it
    cell: Cell
    seen: list[tuple[Cell, CheckResult]]


def new_findings(report: Report) -> list[NewFinding]:
    out: dict[str, NewFinding] = {}
    for c in report.cells:
        for k in c.checks:
            if k.status != "fail":
                continue
            signature = str((k.divergence or {}).get("signature") or f"{k.name}: {k.detail}")
            found = out.setdefault(signature, NewFinding(signature, k, c, []))
            found.seen.append((c, k))
    return list(out.values())


def ranges_text(runs: list[list[int]]) -> str:
    """[[251, 253], [260, 260]] -> "251-253, 260"."""
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def check_names(report: Report) -> list[str]:
    return list(dict.fromkeys(k.name for c in report.cells for k in c.checks))  # first-seen order


def unique_sources(report: Report) -> list[dict]:
    seen: dict[str, dict] = {}
    for cell in report.cells:
        for source in cell.sources():
            seen.setdefault(json.dumps(source, sort_keys=True, default=str), source)
    return list(seen.values())


def divergence_fields(k: CheckResult) -> list[tuple[str, str]]:
    d = k.divergence or {}
    op = d.get("op_index")
    return [("check", str(d.get("check", k.name))), ("op index", "—" if op is None else str(op)),
            ("op", str(d.get("op", ""))), ("field", str(d.get("field", ""))),
            ("signature", str(d.get("signature", "")))]


def percent(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def mutation_summary(r: MutationResult) -> str:
    """One sentence: the score and the counts of a mutation run."""
    n = r.counts()
    built = n["killed"] + n["timed-out"] + n["survived"]
    median = r.median_kill_seconds()
    return (f"Mutation score {percent(r.score())} (killed and timed-out of the {built} mutants that built): "
            f"{len(r.mutants)} mutants of {len(r.functions)} function{'s' * (len(r.functions) != 1)}, {n['killed']} killed, {n['survived']} survived, "
            f"{n['did-not-build']} did not build, {n['timed-out']} timed out; median time to kill "
            + ("–" if median is None else f"{median:.1f} s") + ".")


def mutation_settings(r: MutationResult) -> str:
    """What the mutants were held to, and which lines were mutated."""
    s = r.settings
    lines = f" Only the lines the patch series changed: {ranges_text(s['lines'])}." if s.get("lines") else ""
    resumed = f", {s['resumed']} of them resumed from an earlier run" if s.get("resumed") else ""
    return (f"Each mutant is built (plain flavor) and held to the model on the scenario library at page shift "
            f"{r.page_shift}, then the fuzz seeds and {s.get('fuzz_inputs', '?')} random inputs, until a verdict differs "
            f"from the unmutated kernel's; {s.get('timeout', '?')} s per mutant, {s.get('jobs', '?')} jobs, "
            f"{r.seconds:.0f} s for this run{resumed}.{lines}")


def mutation_rows(r: MutationResult) -> list[tuple[str, dict[str, int], str]]:
    """(function, counts, score) per mutated function, then the total."""
    return [(f, r.counts(f), percent(r.score(f))) for f in r.functions] + [("all", r.counts(), percent(r.score()))]
