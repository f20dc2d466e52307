"""Build: extracted kernel unit (with the driver) + runtime + the tree's
libfdt -> one shared library, cached by (source digest, page shift, flavor,
project inputs).

Flavors:
- ``plain``: gcc (or clang) -O1, for speed;
- ``asan``: clang, ASan + UBSan. UBSan recovers: the runtime's own handlers
  (c/runtime/kc_sanitizer.c) record each report and execution goes on; ASan
  reports arrive through its report callback with halt_on_error=0;
- ``fuzz``: ``asan`` plus ``-fsanitize=fuzzer-no-link`` (edges, no
  comparison tracing) so atheris sees the kernel code's coverage (loaded
  under atheris's asan_with_fuzzer.so); only the kernel's code: the runtime,
  the driver and the shims are the environment (c/not-under-test.ignorelist);
- ``coverage``: clang's source-based coverage (``-fprofile-instr-generate
  -fcoverage-mapping``, the profile runtime linked into the library), read
  back with llvm-profdata/llvm-cov (``coverage.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from reference.geometry import PAGE_SHIFTS

from .. import processes
from ..errors import KhoConformError
from ..source import KernelSource, cache_dir
from ..source.tree_files import KHO_C
from .contract import c_header
from .extract import C_DIR, RUNTIME_DIR, Extraction, extract, generated_dir, include_flags

FLAVORS = ("plain", "asan", "fuzz", "coverage")
SANITIZED_FLAVORS = ("asan", "fuzz")  # loaded only into a process started with their runtime
DRIVER_DIR = C_DIR / "driver"
LIBFDT_SOURCES = ("fdt.c", "fdt_ro.c", "fdt_rw.c", "fdt_sw.c", "fdt_wip.c", "fdt_strerror.c")
CLANG_CANDIDATES = ("clang-16", "clang")
# The kernel unit must not silently get int-returning implicit prototypes.
STRICT = ["-Werror=implicit-function-declaration", "-Werror=int-conversion", "-Werror=incompatible-pointer-types"]
SANITIZE = ["-fsanitize=address,undefined", "-fsanitize-recover=address,undefined", "-fno-inline",
            "-fno-omit-frame-pointer"]
# The runtime is the environment, not the code under test: no UBSan reports from it.
RUNTIME_EXTRA = ["-fno-sanitize=undefined"]
COVERAGE = ["-fprofile-instr-generate", "-fcoverage-mapping"]
# The fuzzer's coverage is the kernel's code: the environment's edges would
# guide it by code that is not under test. No comparison tracing (trace-cmp):
# it took a third of a fuzz input's time, and its hints name values the
# fuzzer's bytes hold only through fuzz/decode.py's choices, not verbatim
# (60 s runs with and without it reached the same coverage).
NOT_UNDER_TEST = C_DIR / "not-under-test.ignorelist"
FUZZ = ["-fsanitize=fuzzer-no-link", "-fno-sanitize-coverage=trace-cmp", f"-fsanitize-coverage-ignorelist={NOT_UNDER_TEST}"]


@dataclass
class Build:
    library: Path
    source: KernelSource
    page_shift: int
    flavor: str
    compiler: str
    api: str
    compatible: str
    unit_bytes: int
    scratch_overlap: bool  # the tree defines kho_scratch_overlap() (public API since 7.3)
    kept: list[tuple[str, int, int]] = field(default_factory=list)  # (names, first line, last line) in KHO_C
    dropped: list[tuple[str, str]] = field(default_factory=list)
    # KHO_C line -> (function, hash of the line's text): sanitizer sites that
    # stay the same when lines shift, without keeping the kernel's text.
    sites: dict[int, tuple[str, str]] = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False

    def identity(self) -> dict:
        return {
            **self.source.identity(), "page_shift": self.page_shift, "flavor": self.flavor,
            "compiler": self.compiler, "api": self.api, "library": str(self.library),
        }

    def site(self, line: int) -> tuple[str, str]:
        """(function, line-text hash) of a line of the KHO file, or ('?', '')."""
        return self.sites.get(line, ("?", ""))


def line_hash(text: str) -> str:
    """The identity of a source line's text: whitespace-insensitive, short."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()[:16]


def _sites(kho_c: Path, kept: list[tuple[str, int, int]]) -> dict[int, tuple[str, str]]:
    lines = kho_c.read_text(errors="replace").split("\n")
    return {ln: (names, line_hash(lines[ln - 1])) for names, first, last in kept
            for ln in range(first, min(last, len(lines)) + 1)}


BUNDLE_META = "target.json"
BUNDLE_LIBRARY = "libkho.so"


def save_bundle(b: Build, directory: Path) -> Path:
    """A self-contained copy of a build (the library and what a target needs
    of it), for processes and machines without the cache: fuzz workers, a
    ClusterFuzzLite build."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(b.library, directory / BUNDLE_LIBRARY)
    meta = {
        "source": b.source.identity(),
        "build": {"flavor": b.flavor, "compiler": b.compiler, "api": b.api, "compatible": b.compatible,
                  "unit_bytes": b.unit_bytes, "scratch_overlap": b.scratch_overlap, "kept": b.kept, "sites": b.sites},
        "page_shift": b.page_shift,
    }
    (directory / BUNDLE_META).write_text(json.dumps(meta, indent=1) + "\n")
    return directory


def load_bundle(directory: Path) -> Build:
    """The build ``save_bundle`` wrote into ``directory``."""
    try:
        meta = json.loads((directory / BUNDLE_META).read_text())
        return _from_meta(meta["build"], library=directory / BUNDLE_LIBRARY, page_shift=meta["page_shift"],
                          source=KernelSource.from_identity(meta["source"], directory))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KhoConformError(f"{directory}: not a build bundle ({e}); write one with kho-conform fuzz or build") from None


def find_compiler(flavor: str) -> str:
    names = CLANG_CANDIDATES if flavor != "plain" else ("gcc", "cc", *CLANG_CANDIDATES)
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    need = "clang-16" if flavor != "plain" else "gcc or clang"
    raise KhoConformError(f"no C compiler for flavor '{flavor}': install {need} (apt-get install clang-16 libclang-rt-16-dev)")


def _project_inputs_digest() -> str:
    h = hashlib.sha256()
    for path in sorted([*C_DIR.rglob("*.[ch]"), NOT_UNDER_TEST, Path(__file__), Path(__file__).parent / "extract.py"]):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(c_header().encode())
    return h.hexdigest()[:16]


def _flags(flavor: str, *, under_test: bool = True) -> list[str]:
    """The compiler flags of a flavor; ``under_test``: the code is the kernel's (for the fuzzer's coverage)."""
    common = ["-std=gnu11", "-fPIC", "-g", "-fno-strict-aliasing", "-fno-common", f"-DKC_BUDGET_MS=KC_BUDGET_MS_{flavor.upper()}"]
    if flavor == "plain":
        return [*common, "-O1"]
    if flavor == "coverage":
        return [*common, "-O1", *COVERAGE]
    extra = FUZZ if flavor == "fuzz" and under_test else []
    return [*common, "-O1", *SANITIZE, *extra]


def run_compiler(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        lines = [ln for ln in proc.stderr.splitlines() if "error" in ln] or proc.stderr.splitlines() or ["?"]
        raise KhoConformError(f"compiling {what} failed: {lines[0][:300]}")


def compile_objects(source: KernelSource, page_shift: int, flavor: str, cc: str, work: Path, *,
                    unit_tail: str = "", include_dirs: tuple[Path, ...] = ()) -> tuple[Extraction, list[Path]]:
    """Extract the kernel unit into ``work`` (with ``unit_tail`` appended,
    found through ``include_dirs``) and compile it, the runtime and the
    tree's libfdt there: the objects every library or program of the kernel
    code links."""
    ex: Extraction = extract(source.root, work, page_shift, cc)
    staged = work / "stage"
    gen = generated_dir(staged)
    # The unit replaces the staged copy, so debug info, sanitizer reports and
    # coverage name kernel/liveupdate/kexec_handover.c with the kernel's line numbers.
    unit = staged / KHO_C
    unit.write_text(ex.unit + unit_tail)
    flags = [*_flags(flavor), f"-DKC_PAGE_SHIFT={page_shift}"]
    objs = [work / "kho.o"]
    _compile_unit(cc, flags, staged, objs[0], include_dirs)
    runtime_flags = [*_flags(flavor, under_test=False), f"-DKC_PAGE_SHIFT={page_shift}"]
    extra = RUNTIME_EXTRA if flavor in SANITIZED_FLAVORS else []
    for path in sorted(RUNTIME_DIR.glob("*.c")):
        objs.append(work / f"{path.stem}.o")
        run_compiler([cc, *runtime_flags, *extra, *STRICT, f"-I{RUNTIME_DIR}", f"-I{gen}", "-c", str(path), "-o", str(objs[-1])],
                     f"the runtime ({path.name})")
    libfdt = source.root / "scripts/dtc/libfdt"
    # libfdt is not the code under test: its one-line helpers (fdt32_ld,
    # fdt_offset_ptr) may be inlined. Out of line, called once per word
    # read, they cost a fuzz input 7% of its time. A sanitizer report's site
    # is its first frame in the KHO file, which inlining in libfdt leaves be.
    libfdt_flags = [f for f in flags if f != "-fno-inline"]
    for name in LIBFDT_SOURCES:
        objs.append(work / f"{name}.o")
        run_compiler([cc, *libfdt_flags, f"-I{libfdt}", "-w", "-c", str(libfdt / name), "-o", str(objs[-1])], f"libfdt {name}")
    return ex, objs


def _compile_unit(cc: str, flags: list[str], staged: Path, obj: Path, include_dirs: tuple[Path, ...] = ()) -> None:
    run_compiler([cc, *flags, *STRICT, *include_flags(staged), f"-I{DRIVER_DIR}", *(f"-I{d}" for d in include_dirs),
                  "-c", str(staged / KHO_C), "-o", str(obj)], f"{KHO_C} against the shims")


def _link(cc: str, flavor: str, library: Path, objs: list[Path]) -> None:
    # Sanitizer runtimes come from the preloaded library, so only the plain
    # flavor can insist that every symbol resolves at link time.
    strict_link = ["-Wl,--no-undefined"] if flavor == "plain" else _flags(flavor)
    run_compiler([cc, "-shared", *strict_link, "-o", str(library), *map(str, objs), "-ldl", "-lc"], "the library")


def _cached(final: Path) -> dict | None:
    """The metadata of a finished build in ``final``, None if there is none
    (or it is unreadable: then it is built again)."""
    try:
        if (final / "libkho.so").is_file():
            return json.loads((final / "build.json").read_text())
    except (OSError, ValueError):
        pass
    return None


def build(source: KernelSource, page_shift: int = 12, flavor: str = "plain", *, force: bool = False) -> Build:
    """Build (or reuse) the library of the kernel's KHO code for one source, page shift and flavor."""
    if flavor not in FLAVORS:
        raise KhoConformError(f"unknown flavor '{flavor}': use one of {', '.join(FLAVORS)}")
    if page_shift not in PAGE_SHIFTS:
        raise KhoConformError(f"page shift {page_shift} is not modelled: use one of {PAGE_SHIFTS}")
    key = f"{source.digest()[:16]}-{_project_inputs_digest()}-ps{page_shift}-{flavor}"
    final = cache_dir() / "builds" / key
    library = final / "libkho.so"
    if not force and (meta := _cached(final)) is not None:
        # Before looking for a compiler: a cached library loads without one.
        return _from_meta(meta, library=library, source=source, page_shift=page_shift, flavor=flavor, cached=True)
    cc = find_compiler(flavor)
    start = time.monotonic()
    # Build aside and rename into place: parallel test workers and an
    # interrupted build never leave a half-built library in the cache; a
    # failed or killed build leaves nothing (processes.temp_dir).
    with processes.temp_dir(final.parent, prefix=f".{key}.") as work:
        try:
            meta = _compile(source, page_shift, flavor, cc, work)
        except KhoConformError as e:  # work is removed: name files by their path in the tree
            raise KhoConformError(str(e).replace(f"{work / 'stage'}/", "").replace(f"{work}/", "")) from None
        meta["seconds"] = round(time.monotonic() - start, 2)
        (work / "build.json").write_text(json.dumps(meta, indent=1))
        try:
            if final.exists() and (force or _cached(final) is None):
                shutil.rmtree(final)
            os.rename(work, final)
        except OSError:  # another process finished the same build first: use theirs
            pass
    # Builds of this source from older project inputs will not be used again.
    for stale in final.parent.glob(f"{source.digest()[:16]}-*-ps{page_shift}-{flavor}"):
        if stale != final and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return _from_meta(json.loads(json.dumps(meta)), library=library, source=source, page_shift=page_shift, flavor=flavor)


def _compile(source: KernelSource, page_shift: int, flavor: str, cc: str, work: Path) -> dict:
    """Extract, compile and link the library into ``work``; the build's metadata."""
    ex, objs = compile_objects(source, page_shift, flavor, cc, work)
    _link(cc, flavor, work / "libkho.so", objs)
    return {
        "compiler": cc, "api": ex.api, "compatible": ex.compatible,
        "unit_bytes": len(ex.unit.encode()), "scratch_overlap": ex.features["KC_HAS_SCRATCH_OVERLAP"] == "1",
        "kept": ex.kept, "dropped": ex.dropped,
        "sites": _sites(source.root / KHO_C, ex.kept),
    }


def rebuild(base: Build, edit: Callable[[str], str], source: KernelSource, work: Path) -> Build:
    """``base`` with the text of its kernel unit passed through ``edit``
    (the unit begins with the kernel file, line for line): only the unit is
    compiled again, in a copy of ``base``'s staged tree in ``work``, and
    linked with ``base``'s runtime and libfdt objects. For many variants of
    one file whose edits stay inside the items ``base`` reached (mutants):
    the extraction, and so ``kept`` and the site table, are ``base``'s.
    ``source``: the variant's files, for its identity."""
    final = base.library.parent
    objs = sorted(o for o in final.glob("*.o") if o.name != "kho.o")  # the runtime's and libfdt's
    if not (final / "stage").is_dir() or not objs:
        raise KhoConformError(f"{final} is not a build directory with its objects; build the base with build() first")
    start = time.monotonic()
    staged = work / "stage"
    shutil.copytree(final / "stage", staged)
    unit = staged / KHO_C
    unit.write_text(edit(unit.read_text()))
    try:
        _compile_unit(base.compiler, [*_flags(base.flavor), f"-DKC_PAGE_SHIFT={base.page_shift}"], staged, work / "kho.o")
        _link(base.compiler, base.flavor, work / "libkho.so", [work / "kho.o", *objs])
    except KhoConformError as e:  # name files by their path in the tree
        raise KhoConformError(str(e).replace(f"{staged}/", "")) from None
    return replace(base, library=work / "libkho.so", source=source, seconds=round(time.monotonic() - start, 2), cached=False)


def _from_meta(meta: dict, **fields) -> Build:
    """A Build from build.json (JSON turns the site table's keys into strings)."""
    meta = dict(meta)
    sites = {int(line): tuple(site) for line, site in meta.pop("sites", {}).items()}
    return Build(**fields, **meta, sites=sites)
