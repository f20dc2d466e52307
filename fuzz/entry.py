#!/usr/bin/env python3
"""atheris entry point: fuzzer bytes -> op program -> model and kernel code
-> compare.

Run as ``python -m fuzz.entry [libFuzzer flags] [corpus dirs]`` or as this
file directly. libFuzzer owns the command line; the entry point reads its own
options from the environment:

- ``KHO_FUZZ_SOURCE``: the kernel source, as ``KernelSource.identity()`` JSON
  plus ``root`` (what ``fuzz.runner`` passes); or ``KHO_FUZZ_KERNEL``: a
  version to fetch (default 7.2); or ``KHO_FUZZ_BUNDLE``: a directory with a
  prebuilt library (``fuzz.runner.write_bundle``; a ``kho_target`` directory
  beside this file or a PyInstaller bundle is used by default);
- ``KHO_FUZZ_NEXT_BUNDLE``, ``KHO_FUZZ_NEXT_SOURCE`` or
  ``KHO_FUZZ_NEXT_KERNEL``: as above, the next kernel of a handover across
  versions (unset: the next kernel is the same kernel's);
- ``KHO_FUZZ_PAGE_SHIFT`` (12), ``KHO_FUZZ_FLAVOR`` (fuzz: native coverage
  of the kernel code, ASan and UBSan);
- ``KHO_FUZZ_CRASHES``: where findings are saved, minimized, fuzzing going
  on. Unset, a new divergence raises, i.e. is a libFuzzer crash (the
  ClusterFuzzLite/OSS-Fuzz convention);
- ``KHO_FUZZ_STAGING``: where findings are written before they are renamed
  into ``KHO_FUZZ_CRASHES`` (the runner's own directory, which it removes,
  so a killed worker leaves nothing half-written; default: the crashes
  directory);
- ``KHO_FUZZ_MINIMIZE_RUNS`` (150): minimizer budget per finding;

Once a second at most, the entry point prints ``KHO-PROGRESS <programs>``:
how many programs this process has compared (libFuzzer's own lines come at
powers of two, late in a run), which ``fuzz.runner`` shows live.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import atheris

from conformance.compare.target import Pair, Target, target_for
from conformance.compare.trace import trace
from conformance.compare.triage import screen
from conformance.native.build import BUNDLE_META, Build, build, load_bundle
from conformance.native.sanitizer import ensure_process_for
from conformance.source import DEFAULT_KERNEL, KernelSource, fetch
from fuzz.decode import decode
from fuzz.findings import save_finding
from fuzz.minimize import minimize, signature_predicate

BUNDLE_DIR = "kho_target"


class DivergenceFound(Exception):
    """A new divergence, raised when findings are not saved by the entry point."""


def _default_bundle() -> Path | None:
    for base in (getattr(sys, "_MEIPASS", None), Path(__file__).resolve().parent):
        if base and (Path(base) / BUNDLE_DIR / BUNDLE_META).exists():
            return Path(base) / BUNDLE_DIR
    return None


def _build_from_env(which: str = "") -> Build:
    """The old kernel's build (``which`` ""), or the next kernel's ("NEXT_")."""
    env = os.environ
    bundle = env.get(f"KHO_FUZZ_{which}BUNDLE") or (None if which else _default_bundle())
    if bundle and not env.get(f"KHO_FUZZ_{which}SOURCE"):
        return load_bundle(Path(bundle))
    if env.get(f"KHO_FUZZ_{which}SOURCE"):
        identity = json.loads(env[f"KHO_FUZZ_{which}SOURCE"])
        source = KernelSource.from_identity(identity, Path(identity["root"]))
    else:
        source = fetch(env.get(f"KHO_FUZZ_{which}KERNEL", DEFAULT_KERNEL))
    return build(source, int(env.get("KHO_FUZZ_PAGE_SHIFT", "12")), env.get("KHO_FUZZ_FLAVOR", "fuzz"))


def _handover() -> bool:
    """Whether the environment names another kernel as the next kernel."""
    return any(os.environ.get(f"KHO_FUZZ_NEXT_{v}") for v in ("BUNDLE", "SOURCE", "KERNEL"))


class Fuzzer:
    def __init__(self, target: Target | Pair, crashes: Path | None, minimize_runs: int, staging: Path | None = None) -> None:
        self.target = target
        self.crashes = crashes
        self.staging = staging
        if crashes is not None:
            crashes.mkdir(parents=True, exist_ok=True)
        self.minimize_runs = minimize_runs
        self.page_shift = target.page_shift
        self.seen: set[str] = set()  # signatures handled by this process
        self.runs = 0
        self.next_progress = 0.0

    def __call__(self, data: bytes) -> None:
        self.runs += 1
        if (now := time.monotonic()) >= self.next_progress:
            print(f"KHO-PROGRESS {self.runs}", file=sys.stderr, flush=True)
            self.next_progress = now + 1.0
        program = decode(data, self.page_shift)
        c, verdict = screen(program, self.target)
        if verdict.status != "fail" or verdict.divergence.signature in self.seen:
            return
        signature = verdict.divergence.signature
        self.seen.add(signature)
        if self.crashes is None:
            raise DivergenceFound(trace(c, self.target))
        if (self.crashes / signature).exists():  # saved by an earlier worker
            return
        # A scratch directory from the start: a finding in progress shows on
        # disk (minimizing: empty; saving: with the files being written).
        with tempfile.TemporaryDirectory(prefix=f".{signature}.", dir=self.staging or self.crashes) as scratch:
            small = minimize(program, signature_predicate(self.target, signature), self.minimize_runs)
            path = save_finding(self.crashes, small, c, self.target, data, staging=Path(scratch))
        if path is not None:
            # beside libFuzzer's own lines, for whoever reads the log
            print(f"KHO-FINDING {signature} {path} ({len(small.steps)} ops)", file=sys.stderr, flush=True)


def main() -> None:
    b = _build_from_env()
    new = _build_from_env("NEXT_") if _handover() else None
    if b.flavor != "plain" and not os.environ.get("LD_PRELOAD"):
        ensure_process_for(b.flavor)  # re-execs with the sanitizer runtime
    crashes = os.environ.get("KHO_FUZZ_CRASHES")
    fuzzer: Fuzzer | None = None

    def test_one_input(data: bytes) -> None:
        assert fuzzer is not None
        fuzzer(data)

    atheris.Setup(sys.argv, test_one_input)
    # Loaded after Setup, so that libFuzzer registers the library's coverage counters.
    staging = os.environ.get("KHO_FUZZ_STAGING")
    target = target_for(b) if new is None else Pair(target_for(b), target_for(new))
    fuzzer = Fuzzer(target, Path(crashes) if crashes else None, int(os.environ.get("KHO_FUZZ_MINIMIZE_RUNS", "150")),
                    Path(staging) if staging else None)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
