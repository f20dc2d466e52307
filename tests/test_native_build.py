"""Build housekeeping: a failed build leaves nothing in the cache and its
error names the file in the tree; a cached library needs no compiler; the
fuzz flavor's coverage is the kernel's code alone."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import get_build
from planted import UNPRESERVE_KEEPS_BIT, site_line

from conformance.errors import KhoConformError
from conformance.native.build import build
from conformance.native.extract import C_DIR
from conformance.source import fetch, from_tree
from conformance.source.tree_files import KHO_C


@pytest.fixture
def broken_tree(tmp_path):
    """7.2's files with one statement that does not compile."""
    source = fetch("7.2")
    tree = tmp_path / "tree"
    for rel in source.files:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.root / rel, tree / rel)
    lines = (tree / KHO_C).read_text().splitlines(keepends=True)
    lines[site_line(source, UNPRESERVE_KEEPS_BIT) - 1] = "kc_no_such_variable = 1;\n"
    (tree / KHO_C).write_text("".join(lines))
    return tree


def test_failed_build_leaves_nothing(broken_tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("KHO_CONFORM_CACHE", str(cache))
    with pytest.raises(KhoConformError, match="kc_no_such_variable") as e:
        build(from_tree(broken_tree), 12, "plain")
    message = str(e.value)
    assert message.startswith(f"compiling {KHO_C} against the shims failed: {KHO_C}:"), message
    assert str(cache) not in message
    assert list((cache / "builds").iterdir()) == []


def test_cached_library_loads_without_a_compiler(tmp_path, monkeypatch):
    ready = get_build("7.2", 12)
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler to be found
    again = build(ready.source, 12, "plain")
    assert again.cached and again.library == ready.library
    with pytest.raises(KhoConformError, match="no C compiler"):
        build(ready.source, 12, "plain", force=True)


def _functions_by_file(obj: Path) -> dict[str, str]:
    """The functions ``obj`` defines, by name, with the file each is declared in (its debug info)."""
    dump = subprocess.run(["llvm-dwarfdump-16", "--debug-info", str(obj)], capture_output=True, text=True, check=True).stdout
    out = {}
    for entry in dump.split("\n\n"):
        if "DW_TAG_subprogram" in entry and "DW_AT_low_pc" in entry:
            name, file = re.search(r'DW_AT_name\t\("([^"]+)"\)', entry), re.search(r'DW_AT_decl_file\t\("([^"]+)"\)', entry)
            if name and file:
                out[name[1]] = file[1]
    return out


def _coverage_counters(obj: Path) -> dict[str, int]:
    """Per function of ``obj``, how many coverage counters its code bumps (relocations to the counters' section)."""
    dump = subprocess.run(["objdump", "-dr", str(obj)], capture_output=True, text=True, check=True).stdout
    counts: dict[str, int] = {}
    function = ""
    for line in dump.splitlines():
        if m := re.match(r"[0-9a-f]+ <(\w+)>:$", line):
            function = m[1]
        elif "__sancov_cntrs" in line:
            counts[function] = counts.get(function, 0) + 1
    return counts


def test_the_fuzzer_sees_the_kernels_code_only():
    """The fuzz flavor's coverage guides atheris by the kernel's code alone:
    the driver's and shims' functions compiled into the unit bump no
    counter (c/not-under-test.ignorelist names them all), the runtime has no
    coverage, the kernel's functions do, and no comparison is traced."""
    b = build(fetch("7.2"), 12, "fuzz")
    unit = b.library.parent / "kho.o"
    counters = _coverage_counters(unit)
    # By the path below the checkout: a cached build may come from another clone of the project.
    project_c = {"/" + str(path.relative_to(C_DIR.parents[2])) for path in C_DIR.rglob("*.[ch]")}
    ours = {name for name, file in _functions_by_file(unit).items() if any(file.endswith(rel) for rel in project_c)}
    assert {"kc_step", "kc_old_kernel_op", "kc_find_next_bit"} <= ours  # the driver's, a shim's
    assert sorted(name for name in ours if counters.get(name)) == []
    assert all(counters.get(name, 0) > 0 for name in ("kho_radix_add_page", "kho_preserve_pages", "kho_restore_folio"))
    for obj in ("kc_runtime.o", "kc_sanitizer.o"):
        undefined = subprocess.run(["nm", "-u", str(b.library.parent / obj)], capture_output=True, text=True, check=True).stdout
        assert "sancov" not in undefined and "sanitizer_cov" not in undefined, obj
    undefined = subprocess.run(["nm", "-u", str(b.library)], capture_output=True, text=True, check=True).stdout
    assert "__sanitizer_cov_trace_pc_indir" in undefined and "_cmp" not in undefined
