"""The hypothesis state machine (conformance.stateful) against every kernel
series the cache holds (the newest version of each of 7.1, 7.2, 7.3) at page
shifts 12, 14 and 16: one generated TestCase per (series, page shift).

Nothing is fetched here: a series that is not in the cache is not tested
(``kho-conform fetch 7.N`` puts it there). A divergence that
``conformance.known`` documents as a kernel bug does not fail a test.
"""

from __future__ import annotations

import pytest
from kernels import newest_per_series

from conformance.compare.target import target_for
from conformance.errors import KhoConformError
from conformance.native.build import build
from conformance.programs.machine import machine_for
from reference.geometry import PAGE_SHIFTS


def _skipping(reason: str) -> type:
    class Skipped:
        def test_state_machine(self):
            pytest.skip(reason)

    return Skipped


def _generate() -> dict[str, type]:
    classes: dict[str, type] = {}
    sources = newest_per_series()
    for series, source in sources.items():
        for ps in PAGE_SHIFTS:
            name = f"TestKho_{series.replace('.', '_')}_ps{ps}"
            try:
                case = machine_for(target_for(build(source, ps))).TestCase
            except KhoConformError as e:
                case = _skipping(f"{source.version} ps{ps}: {e}")
            classes[name] = type(name, (case,), {"__module__": __name__})
    if not sources:
        classes["TestKho_no_kernel"] = _skipping("no kernel source in the cache: run `kho-conform fetch 7.2`")
    return classes


globals().update(_generate())
