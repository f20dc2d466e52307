"""Build housekeeping: a failed build leaves nothing in the cache and its
error names the file in the tree; a cached library needs no compiler."""

from __future__ import annotations

import shutil

import pytest
from conftest import get_build
from planted import UNPRESERVE_KEEPS_BIT, site_line

from conformance.errors import KhoConformError
from conformance.native.build import build
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
