#!/usr/bin/env python3
"""atheris entry point: fuzzer bytes -> op program -> model and kernel code
-> compare.

Run as ``python -m fuzz.harness [libFuzzer flags] [corpus dirs]`` or as this
file directly. libFuzzer owns the command line; the harness reads its own
options from the environment:

- ``KHO_FUZZ_SOURCE``: the kernel source, as ``KernelSource.identity()`` JSON
  plus ``root`` (what ``fuzz.runner`` passes); or ``KHO_FUZZ_KERNEL``: a
  version to fetch (default 7.2); or ``KHO_FUZZ_BUNDLE``: a directory with a
  prebuilt library (``fuzz.runner.write_bundle``; a ``kho_target`` directory
  beside this file or a PyInstaller bundle is used by default);
- ``KHO_FUZZ_PAGE_SHIFT`` (12), ``KHO_FUZZ_FLAVOR`` (fuzz: native coverage
  of the kernel code, ASan and UBSan);
- ``KHO_FUZZ_CRASHES``: where findings are saved, minimized, fuzzing going
  on. Unset, a new divergence raises, i.e. is a libFuzzer crash (the
  ClusterFuzzLite/OSS-Fuzz convention);
- ``KHO_FUZZ_MINIMIZE_RUNS`` (150): minimizer budget per finding;
- ``KHO_FUZZ_ARGV0``: the command libFuzzer's fork/jobs modes re-run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if not __package__:  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import atheris

from conformance.binding import ensure_process_for
from conformance.build import Build, build
from conformance.diff import Target, compare, target_for
from conformance.kernel_source import KernelSource, fetch
from fuzz.decode import decode
from fuzz.findings import is_known, save_finding, trace
from fuzz.minimize import minimize, signature_predicate

BUNDLE_DIR = "kho_target"


class DivergenceFound(Exception):
    """A new divergence, raised when findings are not saved by the harness."""


def _source(identity: dict, root: Path) -> KernelSource:
    """The inverse of ``KernelSource.identity()``."""
    return KernelSource(identity["version"], identity["provider"], root, identity["files"],
                        identity.get("makefile_version", ""))


def load_bundle(directory: Path) -> Build:
    meta = json.loads((directory / "target.json").read_text())
    return Build(library=directory / "libkho.so", source=_source(meta["source"], directory), **meta["build"])


def _default_bundle() -> Path | None:
    for base in (getattr(sys, "_MEIPASS", None), Path(__file__).resolve().parent):
        if base and (Path(base) / BUNDLE_DIR / "target.json").exists():
            return Path(base) / BUNDLE_DIR
    return None


def _build_from_env() -> Build:
    env = os.environ
    bundle = env.get("KHO_FUZZ_BUNDLE") or _default_bundle()
    if bundle and not env.get("KHO_FUZZ_SOURCE"):
        return load_bundle(Path(bundle))
    if env.get("KHO_FUZZ_SOURCE"):
        identity = json.loads(env["KHO_FUZZ_SOURCE"])
        source = _source(identity, Path(identity["root"]))
    else:
        source = fetch(env.get("KHO_FUZZ_KERNEL", "7.2"))
    return build(source, int(env.get("KHO_FUZZ_PAGE_SHIFT", "12")), env.get("KHO_FUZZ_FLAVOR", "fuzz"))


class Fuzzer:
    def __init__(self, target: Target, crashes: Path | None, minimize_runs: int) -> None:
        self.target = target
        self.crashes = crashes
        self.minimize_runs = minimize_runs
        self.page_shift = target.build.page_shift
        self.seen: set[str] = set()  # signatures handled by this process

    def __call__(self, data: bytes) -> None:
        program = decode(data, self.page_shift)
        c = compare(program, self.target)
        if c.first is None or c.first.signature in self.seen:
            return
        self.seen.add(c.first.signature)
        if is_known(c, self.target.build.source.version):
            return
        if self.crashes is None:
            raise DivergenceFound(trace(c, self.target))
        if (self.crashes / c.first.signature).exists():  # saved by an earlier worker
            return
        small = minimize(program, signature_predicate(self.target, c.first.signature), self.minimize_runs)
        path = save_finding(self.crashes, small, c, self.target, data)
        if path is not None:
            # beside libFuzzer's own lines, for whoever reads the log
            print(f"KHO-FINDING {c.first.signature} {path} ({len(small.steps)} ops)", file=sys.stderr, flush=True)


def main() -> None:
    b = _build_from_env()
    if b.flavor != "plain" and not os.environ.get("LD_PRELOAD"):
        ensure_process_for(b.flavor)  # re-execs with the sanitizer runtime
    crashes = os.environ.get("KHO_FUZZ_CRASHES")
    fuzzer: Fuzzer | None = None

    def test_one_input(data: bytes) -> None:
        assert fuzzer is not None
        fuzzer(data)

    argv = [os.environ.get("KHO_FUZZ_ARGV0") or sys.argv[0], *sys.argv[1:]]
    atheris.Setup(argv, test_one_input)
    # Loaded after Setup, so that libFuzzer registers the library's coverage counters.
    fuzzer = Fuzzer(target_for(b), Path(crashes) if crashes else None, int(os.environ.get("KHO_FUZZ_MINIMIZE_RUNS", "150")))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
