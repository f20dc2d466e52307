"""KUnit export: a finding on a kernel with a planted bug becomes a KUnit
test that, built into that kernel's KHO code here (shims plus the userspace
KUnit of c/kunit/), fails; built into the unpatched kernel, it passes. Findings
a test in one kernel cannot reproduce are refused in one line.

The planted patch is made here from the cached kernel file (tmp_path); no
kernel text is part of this repository.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO, child_env
from kernels import newest_per_series
from planted import planted_patch

from conformance.compare.diff import compare
from conformance.compare.target import target_for
from conformance.errors import KhoConformError
from conformance.export import export_kunit
from conformance.native.build import build
from conformance.native.kunit import run_kunit
from conformance.source import apply_series, read_series
from fuzz.findings import save_finding
from reference.program import parse_program

SERIES = newest_per_series()
# Pages relocated into a block (0x80001..0x80007 -> order 3), a folio of order 4,
# a radix key the tree keeps as a number, subtrees added and removed; the last
# unpreserve is what the planted bug gets wrong.
PROGRAM = """\
page_shift 12
---
preserve_pages 0x80001 0x7
preserve_folio 0x90000 4
radix_add 0x123454 2
add_subtree blob 0x1000 0x10
add_subtree 'a b' 0x2000 0x20
remove_subtree 0x2000
unpreserve_pages 0x80001 0x7
preserve_folio 0x80004 0
"""
EXPORTED_API = {"kho_preserve_pages", "kho_unpreserve_pages", "kho_preserve_folio", "kho_add_subtree",
                "kho_remove_subtree", "kho_radix_walk_tree"}


def planted(series: str, source, tmp_path):
    patch = planted_patch(tmp_path, series)
    return apply_series(source, read_series(patch), patch.name)


@pytest.mark.parametrize("series", list(SERIES))
def test_finding_becomes_a_kunit_test_that_fails_on_the_bug_and_passes_without(series, tmp_path):
    pristine = SERIES[series]
    buggy = planted(series, pristine, tmp_path)
    program = parse_program(PROGRAM)
    assert compare(program, target_for(build(pristine, 12))).ok
    target = target_for(build(buggy, 12))
    cmp = compare(program, target)
    finding = save_finding(tmp_path / "crashes", program, cmp, target)
    assert finding is not None and json.loads((finding / "finding.json").read_text())["first"]["check"] == "tree"

    exported = export_kunit(finding, "test")
    text = exported.text
    test_file = tmp_path / f"{exported.name}.c"
    test_file.write_text(text)
    assert text.startswith("// SPDX-License-Identifier: GPL-2.0\n") and "#include <kunit/test.h>" in text
    assert f"KUNIT_CASE({exported.name}_program)" in text and f"kunit_test_suite({exported.name}_suite);" in text
    calls = set(re.findall(r"\b(kho_\w+)\(", text)) - {f"{exported.name}_{f}" for f in ("program", "free", "page", "leaf", "key")}
    key_api = "kho_radix_add_key" in calls
    assert EXPORTED_API <= calls
    assert calls - EXPORTED_API <= {"kho_is_enabled", "kho_radix_add_page", "kho_radix_add_key", "kho_radix_init_tree",
                                    "kho_radix_destroy_tree"}, calls
    assert ("kho_radix_add_key(&kho_out.radix_tree, 0x" in text) == key_api  # 7.3: a key literal from the model
    assert text.count("KUNIT_EXPECT_EQ_MSG(test, rc, 0,") == 6  # the int-returning calls, all 0

    on_bug = run_kunit(buggy, 12, test_file)
    assert on_bug.failed, on_bug.output
    assert "keys in the preservation tree" in on_bug.output
    on_fixed = run_kunit(pristine, 12, test_file)
    assert on_fixed.passed, on_fixed.output


def _finding(tmp_path, program: str, first: dict, profile: str = "kho-v4"):
    d = tmp_path / "crashes" / "0123456789ab"
    d.mkdir(parents=True)
    (d / "program.txt").write_text(program)
    meta = {"signature": "0123456789ab", "first": {"op_index": 0, "op": "", "field": "tree[0]", "expected": "",
                                                  "actual": "", "signature": "0123456789ab", **first},
            "profile": profile, "source": {"version": "7.2.13", "provider": "debian:x"},
            "kernel_version": "7.2.13", "page_shift": 12, "flavor": "plain"}
    (d / "finding.json").write_text(json.dumps(meta))
    return d


@pytest.mark.parametrize(("program", "first", "why"), [
    ("page_shift 12\n---\npreserve_folio 0x10 0\nkexec\nrestore_folio 0x10000\n", {"check": "next", "op_index": 2},
     "needs a kexec"),
    ("page_shift 12\n---\npreserve_folio 0x10 0\n", {"check": "handover:c-image"}, "needs a kexec"),
    ("page_shift 12\n---\npreserve_folio 0x10 0\n", {"check": "boot", "op_index": None}, "KHO's own initialisation"),
    ("page_shift 12\n---\npreserve_folio 0x10 0\n", {"check": "events", "actual": "fault: SEGV"}, "fault or sanitizer"),
    ("page_shift 12\n---\nunpreserve_folio 0x10 0\n", {"check": "ops", "field": "warnings"}, "count WARN"),
    ("page_shift 12\nfail_alloc 3\n---\npreserve_folio 0x10 0\n", {"check": "tree"}, "fail_alloc"),
    ("page_shift 12\n---\npreserve_folio 0x11 4\n", {"check": "tree"}, "naturally aligned"),
    ("page_shift 12\n---\npreserve_pages 0x0 0x10000\n", {"check": "tree"}, "2^16 pages"),
    ("page_shift 12\n---\npreserve_pages 0x0 0x20\npreserve_folio 0x10 4\n", {"check": "tree"}, "shares pages"),
    ("page_shift 12\n---\npreserve_folio 0x1fffffffff0000 0\n", {"check": "ops"}, "outside the key domain"),
    ("page_shift 12\nnuma 0x0 0\nnuma 0x8 1\n---\npreserve_pages 0x0 0x10\n", {"check": "tree"}, "NUMA"),
    ("page_shift 12\n---\nis_kho_enabled\nalloc_preserve 0 0x1000\n", {"check": "tree"}, "allocator"),
    ("page_shift 12\n---\npreserve_vmalloc 0 0x1000 8 0 1\n", {"check": "tree"}, "allocator"),
    ("page_shift 12\n---\nfill_fdt 0 100 63\n", {"check": "fdt"}, "not exported"),
])
def test_what_one_kernel_cannot_show_is_refused_in_one_line(tmp_path, program, first, why):
    with pytest.raises(KhoConformError) as e:
        export_kunit(_finding(tmp_path, program, first), "test")
    assert why in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("cannot export ")


def test_cli_writes_the_file_and_refuses_a_non_finding(tmp_path):
    finding = _finding(tmp_path, "page_shift 12\n---\nradix_add 0x123 0\nradix_del 0x123 0\n", {"check": "tree"})
    out = tmp_path / "t.c"
    cli = [sys.executable, "-m", "conformance.cli", "export", "kunit"]
    proc = subprocess.run([*cli, str(finding), "--no-run", "-o", str(out)], capture_output=True, text=True, cwd=REPO,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr
    assert "kho_radix_add_page(&kho_out.radix_tree, 0x123UL, 0)" in out.read_text()
    proc = subprocess.run([*cli, str(tmp_path)], capture_output=True, text=True, cwd=REPO, env=child_env())
    assert proc.returncode == 2 and "not a saved finding" in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr
