"""Fixtures shared by the native-stage tests (tests/test_native_*.py).

The kernel libraries are cached builds (conformance.native.build); building one cold
takes about 1.5 s, loading a cached one is instant. Each library is loaded
once per process and shared by every test that asks for it.

``run_in_child`` runs programs against one library in a fresh Python process.
Use it for tests about faults themselves: a fault is contained by the
runtime's SIGSEGV handler, which with several kernel libraries loaded in one
process chains to the handler it replaced (test_native_faults.py::
test_fault_in_earlier_loaded_library_is_contained; handovers across versions
rely on it, test_handover.py), and a child keeps a broken containment from
taking the test process with it.
"""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import conformance  # noqa: F401 - first: the compiled reference model, unless KHO_CONFORM_MODEL=python
from reference.geometry import PAGE_SHIFTS  # noqa: F401 - the tests import it from here

REPO = Path(__file__).resolve().parent.parent
SERIES = ("7.1", "7.2", "7.3")


@functools.cache
def get_build(series: str, page_shift: int):
    from conformance.native.build import build
    from conformance.source import fetch

    return build(fetch(series), page_shift)


@functools.cache
def get_native(series: str, page_shift: int):
    from conformance.native.binding import NativeKernel

    return NativeKernel(get_build(series, page_shift))


@pytest.fixture(scope="session")
def native_for():
    """native_for(series, page_shift) -> conformance.native.binding.NativeKernel (cached)."""
    return get_native


@pytest.fixture(scope="session")
def build_for():
    """build_for(series, page_shift) -> conformance.build.Build (cached)."""
    return get_build


# A child process that loads exactly one kernel library, runs the calls it
# reads (pickled) from stdin and writes the pickled outcomes to stdout.
_CHILD = r"""
import pickle, sys
from conformance.native.build import build
from conformance.source import fetch
from conformance.native.binding import NativeKernel
series, page_shift, calls = pickle.load(sys.stdin.buffer)
h = NativeKernel(build(fetch(series), page_shift))
out = []
for call in calls:
    if call[0] == "run":
        out.append(h.run(call[1]))
    else:
        _, image, header, steps = call
        out.append(h.restore(image, header, steps))
sys.stdout.buffer.write(pickle.dumps(out))
"""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_in_child(series: str, page_shift: int, calls: list[tuple], timeout: float = 120) -> list:
    """calls: ("run", Program) or ("restore", Image, Header, steps). Returns
    the outcomes; fails the test if the child dies (e.g. an uncontained fault)."""
    get_build(series, page_shift)  # build in this process: the child only loads
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], input=pickle.dumps((series, page_shift, calls)),
        capture_output=True, cwd=REPO, env=child_env(), timeout=timeout,
    )
    if proc.returncode:
        pytest.fail(f"kernel child for {series}/{page_shift} died with {proc.returncode}: {proc.stderr.decode()[-2000:]}")
    return pickle.loads(proc.stdout)


@pytest.fixture(scope="session")
def in_child():
    return run_in_child
