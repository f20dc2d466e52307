"""Running a KUnit test of the KHO code in userspace.

The test file is built into the extracted ``kexec_handover.c`` (after the
driver), as a kernel builds such a test into that file, against the project's
shims and a minimal userspace KUnit (``c/kunit/``: ``<kunit/test.h>`` and a
runner that boots KHO's old kernel and prints KTAP). The result is a program,
run in a child process; its KTAP output says which cases passed.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KhoConformError
from ..source import KernelSource
from .build import compile_objects, find_compiler, run_compiler
from .extract import C_DIR

KUNIT_DIR = C_DIR / "kunit"
RUNNER = KUNIT_DIR / "kc_kunit_main.c"
_CASE = re.compile(r"^ {4}(not ok|ok) \d+ (\S+)( # SKIP.*)?$", re.M)


@dataclass
class KunitRun:
    returncode: int
    output: str  # KTAP
    cases: dict[str, str] = field(default_factory=dict)  # case -> "pass" | "fail" | "skip"

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and bool(self.cases) and "fail" not in self.cases.values()

    @property
    def failed(self) -> bool:
        """The test ran and at least one case failed (not: it could not run)."""
        return self.returncode == 1 and "fail" in self.cases.values()


def run_kunit(source: KernelSource, page_shift: int, test_file: Path, timeout: float = 120) -> KunitRun:
    """Build ``test_file`` into ``source``'s KHO code for ``page_shift`` and run it."""
    test_file = Path(test_file).resolve()
    if not test_file.is_file():
        raise KhoConformError(f"{test_file}: no such KUnit test file")
    cc = find_compiler("plain")
    with tempfile.TemporaryDirectory(prefix="kho-kunit-") as tmp:
        work = Path(tmp)
        tail = f'\n#include "{test_file}"\n#include "{RUNNER}"\n'
        _, objs = compile_objects(source, page_shift, "plain", cc, work, unit_tail=tail, include_dirs=(KUNIT_DIR,))
        program = work / "kunit"
        run_compiler([cc, "-o", str(program), *map(str, objs), "-ldl", "-lc"], "the KUnit program")
        try:
            proc = subprocess.run([str(program)], capture_output=True, text=True, errors="replace", timeout=timeout)
        except subprocess.TimeoutExpired:
            raise KhoConformError(f"the KUnit program of {test_file.name} ran over {timeout:.0f} s") from None
    cases = {name: "fail" if status == "not ok" else "skip" if skip else "pass"
             for status, name, skip in _CASE.findall(proc.stdout)}
    return KunitRun(proc.returncode, proc.stdout + proc.stderr, cases)
