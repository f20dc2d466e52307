"""A developer's patch series: an mbox with a cover letter, the lines a
series changes, and ``--kernel-tree PATH --commits A..B`` end to end on a real
git repository made here from a cached kernel's needed files (in tmp_path:
no kernel text is part of this repository)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from planted import UNPRESERVE_KEEPS_BIT, site_line

from conformance.compare.diff import compare
from conformance.compare.target import target_for
from conformance.errors import KhoConformError
from conformance.native.build import build
from conformance.source import KernelSource, fetch, resolve
from conformance.source.patch import changed_lines, read_series
from conformance.source.tree_files import KHO_C
from reference.program import parse_program

GIT = ["git", "-c", "user.name=Dev", "-c", "user.email=dev@example.org", "-c", "init.defaultBranch=main"]
# Unpreserving a folio must clear its bit: the planted bug keeps it.
UNPRESERVE = parse_program("page_shift 12\n---\npreserve_folio 0x80000 0\nunpreserve_folio 0x80000 0\n")


def _git(repo, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git tree of 7.2's needed files: base, then two commits (the planted
    bug, then a comment-only change)."""
    source = fetch("7.2")
    repo = tmp_path_factory.mktemp("linux")
    for rel in source.files:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.root / rel, repo / rel)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base")
    _git(repo, "tag", "base")
    # lines named by function and text hash (the build's site table)
    sites = build(source, 12).sites
    removed = site_line(source, UNPRESERVE_KEEPS_BIT)
    path = repo / KHO_C
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: removed - 1] + lines[removed:]))
    _git(repo, "commit", "-qam", "kho: forget to clear the bit")
    # then a comment added at the end of a line of kho_radix_add_page's (after the removal: one line up)
    commented = min(n for n, (function, _) in sites.items() if function == "kho_radix_add_page") - 1
    lines = path.read_text().splitlines(keepends=True)
    lines[commented - 1] = lines[commented - 1].rstrip("\n") + " /* may allocate */\n"
    path.write_text("".join(lines))
    _git(repo, "commit", "-qam", "kho: say why it may sleep")
    return repo, removed, commented


def test_commits_range_is_tested_as_a_series(repo):
    tree, removed_at, commented = repo
    source = resolve(None, tree, None, None, commits="base..HEAD")
    assert source.provider.startswith(f"git:{tree.resolve()}@") and source.provider.endswith("+series:commits base..HEAD")
    assert [name.split(": ", 1)[1] for name, _ in source.patches] == [
        "[PATCH 1/2] kho: forget to clear the bit", "[PATCH 2/2] kho: say why it may sleep"]
    # a removal marks the lines either side of it; a changed line marks itself
    changed = {n for a, b in source.changed_lines[KHO_C] for n in range(a, b + 1)}
    assert changed == {removed_at - 1, removed_at, commented}
    assert source.identity()["changed_lines"][KHO_C] == [list(r) for r in source.changed_lines[KHO_C]]
    again = KernelSource.from_identity(source.identity(), source.root)
    assert again.changed_lines == source.changed_lines
    # the range's code is what gets built: the planted bug shows
    first = compare(UNPRESERVE, target_for(build(source, 12))).first
    assert first is not None and first.check == "tree"
    with pytest.raises(KhoConformError, match="the range holds no commits"):
        resolve(None, tree, None, None, commits="HEAD..HEAD")
    with pytest.raises(KhoConformError, match=r"git rev-parse nope in .* failed: .*is it a git tree holding that revision"):
        resolve(None, tree, None, None, commits="nope..HEAD")


def test_mbox_with_cover_letter(repo, tmp_path):
    tree, _, _ = repo
    mbox = tmp_path / "v2_20261124_dev_kho.mbx"
    mbox.write_text(_git(tree, "format-patch", "--cover-letter", "--stdout", "base..HEAD"))
    names = [p.name for p in read_series(mbox)]
    assert names == [f"{mbox.name}#2: [PATCH 1/2] kho: forget to clear the bit",
                     f"{mbox.name}#3: [PATCH 2/2] kho: say why it may sleep"]
    patched = resolve("7.2", None, None, mbox)
    assert patched.provider.endswith(f"+series:{mbox.name}") and len(patched.patches) == 2
    assert patched.changed_lines == resolve(None, tree, None, None, commits="base..HEAD").changed_lines
    cover_only = tmp_path / "cover.mbx"
    cover_only.write_text(mbox.read_text().split("\nFrom ", 1)[0] + "\n" + mbox.read_text().split("\nFrom ", 1)[0])
    with pytest.raises(KhoConformError, match="holds a diff"):
        read_series(cover_only)


def test_changed_lines(tmp_path):
    base, new = tmp_path / "base.c", tmp_path / "new.c"
    base.write_text("a\nb\nc\nd\ne\nf\ng\nh\ni\n")
    new.write_text("a\nB\nc\nd\ne\ng\nh\ni\nj\n")  # b changed, f removed, j added
    assert changed_lines(base, new) == ((2, 2), (5, 6), (9, 9))  # 2; 5 and 6 either side of f; 9
    assert changed_lines(base, base) == ()
    assert changed_lines(tmp_path / "absent.c", new) == ((1, 9),)
