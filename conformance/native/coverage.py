"""Line, branch and function coverage of the kernel's KHO file, from the
``coverage`` build flavor (clang source-based coverage).

A process that loads a coverage build writes a raw profile when it exits, to
``LLVM_PROFILE_FILE`` (``%p``: one file per process, ``%m``: per library);
``llvm-profdata`` merges them and ``llvm-cov export -format=lcov`` reads them
back against the library, of which the kernel file's record is kept. The
extracted unit keeps the kernel's line numbers (unreached items are blanked,
not removed), so its lines are the kernel file's lines one for one; lines the
extraction blanked are "not built": no program can execute them here.

The records hold line numbers and counts only, never the file's text:
``text_path`` says where the measured file is on this machine, for views that
annotate it.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KhoConformError
from ..source.identity import ranges_of
from ..source.tree_files import KHO_C
from .build import Build

LLVM_VERSION = "16"  # the clang-16 the coverage flavor is built with
PROFILE_PATTERN = "kho-%p-%m.profraw"


def llvm_tool(name: str) -> str:
    """The LLVM tool matching the compiler (``llvm-cov-16``), or a one-line error naming the package."""
    for candidate in (f"{name}-{LLVM_VERSION}", name):
        if path := shutil.which(candidate):
            return path
    raise KhoConformError(f"{name}-{LLVM_VERSION} not found: coverage needs it; apt-get install llvm-{LLVM_VERSION}")


def profile_env(directory: Path) -> dict[str, str]:
    """Environment for processes whose coverage builds write raw profiles into ``directory``."""
    return {"LLVM_PROFILE_FILE": str(Path(directory).resolve() / PROFILE_PATTERN)}


@dataclass
class FunctionCoverage:
    name: str
    line: int  # where its body starts
    calls: int
    lines: int  # executable lines
    covered: int  # of those, executed at least once
    changed: int = 0  # executable lines the series changed
    changed_covered: int = 0


@dataclass
class FileCoverage:
    """Coverage of one kernel file of one source, over one or more page shifts."""

    file: str  # path in the kernel tree
    sha256: str  # of the file the line numbers refer to
    text_path: str  # where that file is on this machine (the cache)
    page_shifts: list[int]
    lines: list[list[int]]  # [line, executions] of every executable line, ascending
    branches: list[list]  # [line, [executions of each branch outcome]]
    functions: list[FunctionCoverage]
    not_built: list[list[int]]  # [first, last] runs of code the extraction left out (unreached by the harness)
    changed: list[list[int]]  # [first, last] runs the applied series changed (patched numbering)
    changed_not_run: list[list[int]] = field(default_factory=list)  # changed executable lines nothing executed
    changed_not_built: list[list[int]] = field(default_factory=list)  # changed code that is not built
    totals: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[int, int]:
        return {line: n for line, n in self.lines}


def _runs(lines: Iterable[int]) -> list[list[int]]:
    return [list(r) for r in ranges_of(lines)]


def _expand(runs: Iterable[Iterable[int]]) -> set[int]:
    return {n for a, b in runs for n in range(a, b + 1)}


def file_coverage(*, file: str, sha256: str, text_path: str, page_shifts: list[int], lines: dict[int, int],
                  branches: dict[int, list[int]], functions: dict[str, tuple[int, int]], not_built: set[int],
                  changed: set[int]) -> FileCoverage:
    """A FileCoverage with its derived parts (per-function table, changed
    lines not executed or not built, totals) computed from the raw counts.
    ``functions``: name -> (first line, calls)."""
    starts = sorted((line, name) for name, (line, _) in functions.items())
    table: dict[str, FunctionCoverage] = {name: FunctionCoverage(name, line, functions[name][1], 0, 0) for line, name in starts}
    bounds = [line for line, _ in starts]
    for line, n in sorted(lines.items()):
        # an executable line belongs to the function whose body starts last before it
        i = bisect.bisect_right(bounds, line) - 1
        if i < 0:
            continue
        f = table[starts[i][1]]
        f.lines += 1
        f.covered += n > 0
        if line in changed:
            f.changed += 1
            f.changed_covered += n > 0
    changed_exec = [n for n in changed if n in lines]
    taken = sum(sum(c > 0 for c in counts) for counts in branches.values())
    totals = {
        "lines": len(lines), "covered": sum(n > 0 for n in lines.values()),
        "branches": sum(len(c) for c in branches.values()), "branches_taken": taken,
        "functions": len(table), "functions_called": sum(f.calls > 0 for f in table.values()),
        "changed": len(changed), "changed_executable": len(changed_exec),
        "changed_covered": sum(lines[n] > 0 for n in changed_exec), "changed_not_built": len(changed & not_built),
    }
    return FileCoverage(
        file=file, sha256=sha256, text_path=text_path, page_shifts=sorted(page_shifts),
        lines=[[line, n] for line, n in sorted(lines.items())],
        branches=[[line, list(c)] for line, c in sorted(branches.items())],
        functions=[table[name] for _, name in starts], not_built=_runs(not_built), changed=_runs(changed),
        changed_not_run=_runs(n for n in changed_exec if lines[n] == 0), changed_not_built=_runs(changed & not_built),
        totals=totals,
    )


def merge(parts: list[FileCoverage]) -> FileCoverage:
    """Several page shifts' coverage of the same file, summed line by line."""
    first = parts[0]
    if any(p.sha256 != first.sha256 for p in parts):
        raise KhoConformError(f"coverage of different versions of {first.file} cannot be merged")
    lines: dict[int, int] = {}
    branches: dict[int, list[int]] = {}
    functions: dict[str, tuple[int, int]] = {}
    for p in parts:
        for line, n in p.lines:
            lines[line] = lines.get(line, 0) + n
        for line, counts in p.branches:
            have = branches.get(line)
            branches[line] = [a + b for a, b in zip(have, counts)] if have and len(have) == len(counts) else list(counts)
        for f in p.functions:
            functions[f.name] = (f.line, functions.get(f.name, (0, 0))[1] + f.calls)
    return file_coverage(file=first.file, sha256=first.sha256, text_path=first.text_path,
                         page_shifts=sorted({ps for p in parts for ps in p.page_shifts}), lines=lines, branches=branches,
                         functions=functions, not_built=_expand(first.not_built), changed=_expand(first.changed))


_LCOV = re.compile(r"^(SF|DA|BRDA|FN|FNDA):(.*)$")


def parse_lcov(text: str, suffix: str) -> tuple[dict[int, int], dict[int, list[int]], dict[str, tuple[int, int]]]:
    """Lines, branches and functions of the lcov record whose source path ends with ``suffix``."""
    lines: dict[int, int] = {}
    branches: dict[int, list[int]] = {}
    starts: dict[str, int] = {}
    calls: dict[str, int] = {}
    inside = False
    for raw in text.splitlines():
        if raw == "end_of_record":
            inside = False
            continue
        m = _LCOV.match(raw)
        if not m:
            continue
        tag, value = m.groups()
        if tag == "SF":
            inside = value.endswith("/" + suffix)
        elif not inside:
            continue
        elif tag == "DA":
            line, count = value.split(",")[:2]
            lines[int(line)] = int(count)
        elif tag == "BRDA":
            line, _, _, taken = value.split(",")
            branches.setdefault(int(line), []).append(0 if taken == "-" else int(taken))
        elif tag == "FN":
            line, name = value.split(",", 1)
            starts[name.rsplit(":", 1)[-1]] = int(line)  # static functions are "file.c:name"
        elif tag == "FNDA":
            count, name = value.split(",", 1)
            calls[name.rsplit(":", 1)[-1]] = int(count)
    return lines, branches, {name: (line, calls.get(name, 0)) for name, line in starts.items()}


def not_built_lines(kernel_file: Path, unit_file: Path) -> set[int]:
    """Lines with code in the kernel's file that the extracted unit blanked."""
    kernel = kernel_file.read_text(errors="replace").split("\n")
    unit = unit_file.read_text(errors="replace").split("\n")
    return {i for i, line in enumerate(kernel, 1) if line.strip() and (i > len(unit) or not unit[i - 1].strip())}


def measure(b: Build, profiles: Path) -> FileCoverage:
    """The coverage of the kernel file that the raw profiles in ``profiles``
    (written by processes that loaded the coverage build ``b``) record."""
    if b.flavor != "coverage":
        raise KhoConformError(f"coverage is read from the coverage flavor, not {b.flavor}")
    raw = sorted(Path(profiles).glob("*.profraw"))
    if not raw:
        raise KhoConformError(f"no raw profiles in {profiles}: nothing ran on the coverage build of {b.source.version}")
    merged = Path(profiles) / "merged.profdata"
    _tool([llvm_tool("llvm-profdata"), "merge", "-sparse", "-o", str(merged), *map(str, raw)], "llvm-profdata merge")
    lcov = _tool([llvm_tool("llvm-cov"), "export", "-format=lcov", f"-instr-profile={merged}", f"-object={b.library}"],
                 "llvm-cov export")
    lines, branches, functions = parse_lcov(lcov, KHO_C)
    if not lines:
        raise KhoConformError(f"llvm-cov reports nothing of {KHO_C} in {b.library}; was it built with the coverage flavor?")
    kernel_file = b.source.root / KHO_C
    return file_coverage(
        file=KHO_C, sha256=hashlib.sha256(kernel_file.read_bytes()).hexdigest(), text_path=str(kernel_file),
        page_shifts=[b.page_shift], lines=lines, branches=branches, functions=functions,
        # the unit as compiled: build() keeps it beside the library
        not_built=not_built_lines(kernel_file, b.library.parent / "stage" / KHO_C),
        changed=_expand(b.source.changed_lines.get(KHO_C, ())),
    )


def _tool(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        detail = proc.stderr.strip().splitlines()
        raise KhoConformError(f"{what} failed: {detail[0] if detail else proc.returncode}")
    return proc.stdout
