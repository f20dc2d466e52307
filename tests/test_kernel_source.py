"""Tests of conformance.kernel_source.

Everything except ``test_fetch_real_7_2`` runs offline against temporary
files and canned apt output; that one uses (and if needed fills) the real
cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest

from conformance import source as ks
from conformance.errors import KhoConformError
from conformance.source import mirror, tree_files, versions

MIRROR = "http://mirror.example/debian"


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("KHO_CONFORM_CACHE", str(cache))
    return cache


# --------------------------------------------------------------------------
# Mirror URI from the apt sources


def _sources(tmp_path: Path, one_line: str = "", parts: dict[str, str] | None = None) -> tuple[Path, Path]:
    sources_list = tmp_path / "sources.list"
    sources_list.write_text(one_line)
    sources_dir = tmp_path / "sources.list.d"
    sources_dir.mkdir()
    for name, text in (parts or {}).items():
        (sources_dir / name).write_text(text)
    return sources_list, sources_dir


def test_mirror_uri_deb822(tmp_path):
    deb822 = f"""\
Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Enabled: no
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm

Types: deb
# a comment inside the stanza
URIs: {MIRROR}/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
    third_party = "Types: deb\nURIs: https://vendor.example/apt\nSuites: nodistro\nComponents: main\n"
    paths = _sources(tmp_path, parts={"a-vendor.sources": third_party, "debian.sources": deb822,
                                      "ignored.list.disabled": "deb http://other.example/debian sid main\n"})
    assert mirror.mirror_uri(*paths) == MIRROR


def test_mirror_uri_one_line(tmp_path):
    one_line = f"""\
# deb http://commented.example/debian bookworm main
deb http://security.example/debian-security bookworm-security main
deb-src [ arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg ] {MIRROR} bookworm main
deb http://later.example/debian bookworm main
"""
    assert mirror.mirror_uri(*_sources(tmp_path, one_line)) == MIRROR


def test_mirror_uri_sources_list_comes_first(tmp_path):
    paths = _sources(tmp_path, f"deb {MIRROR} trixie main\n",
                     {"debian.sources": "Types: deb\nURIs: http://second.example/debian\nSuites: trixie\n"})
    assert mirror.mirror_uri(*paths) == MIRROR


def test_mirror_uri_none(tmp_path):
    paths = _sources(tmp_path, "deb http://vendor.example/apt nodistro main\n")
    with pytest.raises(KhoConformError, match="no Debian mirror"):
        mirror.mirror_uri(*paths)


# --------------------------------------------------------------------------
# Versions, on canned apt output

POLICY = f"""\
linux-source-7.2:
  Installed: (none)
  Candidate: 7.2.13-1
  Version table:
     7.2.13-1 500
        500 {MIRROR} sid/main amd64 Packages
     7.2.12-1~bpo13+1 100
        100 {MIRROR} trixie-backports/main amd64 Packages
     7.2.9-1~bpo13+1 100
        100 {MIRROR} trixie-backports/main amd64 Packages
linux-source-7.3:
  Installed: (none)
  Candidate: 7.3.4-1~bpo13+1
  Version table:
     7.3.4-1~bpo13+1 100
        100 {MIRROR} trixie-backports/main amd64 Packages
     7.3~rc7-1~exp1 1
          1 {MIRROR} experimental/main amd64 Packages
"""


def _showsrc(*versions: str) -> str:
    return "\n".join(
        f"Package: linux\nBinary: linux-doc, linux-source-{'.'.join(v.split('.')[:2])}\nVersion: {v}\n"
        f"Files:\n 0123 45 linux_{v}.dsc\n" for v in versions
    )


SHOWSRC = _showsrc("6.12.107-1", "7.0.13-1", "7.1.8-2", "7.2.13-1", "7.1.3-1~bpo13+1", "7.1.8-1~bpo13+1",
                   "7.1.13-1~bpo13+1", "7.2.6-1~bpo13+1") + "\nPackage: linux-signed-amd64\nVersion: 7.9.1-1\n"


@pytest.fixture
def available():
    return versions.build_available(POLICY, SHOWSRC)


def test_build_available(available):
    assert {s: [(c.upstream, c.debian, c.package) for c in cands] for s, cands in available.items()} == {
        # 7.1 has no linux-source-7.1: orig tarballs, highest revision per upstream version
        "7.1": [("7.1.13", "7.1.13-1~bpo13+1", "linux"), ("7.1.8", "7.1.8-2", "linux"),
                ("7.1.3", "7.1.3-1~bpo13+1", "linux")],
        # 7.2 and 7.3 come from linux-source-7.N only; rc sorts before the release
        "7.2": [("7.2.13", "7.2.13-1", "linux-source-7.2"), ("7.2.12", "7.2.12-1~bpo13+1", "linux-source-7.2"),
                ("7.2.9", "7.2.9-1~bpo13+1", "linux-source-7.2")],
        "7.3": [("7.3.4", "7.3.4-1~bpo13+1", "linux-source-7.3"), ("7.3~rc7", "7.3~rc7-1~exp1", "linux-source-7.3")],
    }
    assert available["7.1"][1].provider == "debian:linux=7.1.8-2 (orig)"
    assert available["7.2"][0].provider == "debian:linux-source-7.2=7.2.13-1"


def _upstreams(candidates):
    return [c.upstream for c in candidates]


def test_series_resolves_to_newest_first(available):
    assert _upstreams(versions.candidates("7.2", available)) == ["7.2.13", "7.2.12", "7.2.9"]
    assert _upstreams(versions.candidates("7.1", available)) == ["7.1.13", "7.1.8", "7.1.3"]


def test_exact_pin(available):
    assert _upstreams(versions.candidates("7.2.12", available))[0] == "7.2.12"
    assert _upstreams(versions.candidates(" 7.1.8 ", available))[0] == "7.1.8"
    assert _upstreams(versions.candidates("7.3-rc7", available))[0] == "7.3~rc7"


def test_pin_missing_falls_back_to_newest(available, caplog):
    with caplog.at_level(logging.WARNING):
        assert _upstreams(versions.candidates("7.2.10", available))[0] == "7.2.13"
    assert "7.2.10 is not offered" in caplog.text


@pytest.mark.parametrize("request_", ["6.12", "7.0", "7.0.13", "5.10.1"])
def test_pre_7_1_refused(available, request_):
    with pytest.raises(KhoConformError, match=rf"kernel {request_} has no KHO radix tree \(first in 7\.1\)"):
        versions.candidates(request_, available)
    with pytest.raises(KhoConformError, match="no KHO radix tree"):
        ks.fetch(request_)  # refused before any apt or cache access


@pytest.mark.parametrize("request_", ["x", "", "7", "7.2.x", "latest", "7.2.13.1"])
def test_garbage_refused(available, request_):
    with pytest.raises(KhoConformError, match="unknown kernel version"):
        versions.candidates(request_, available)


def test_unknown_series_lists_available(available):
    with pytest.raises(KhoConformError, match=r"unknown kernel version '7\.9'; available: 7\.1\.13, 7\.2\.13, 7\.3\.4"):
        versions.candidates("7.9", available)


@pytest.mark.parametrize("a, b, expected", [
    ("7.3~rc7-1~exp1", "7.3.4-1~bpo13+1", -1),
    ("7.1.8-2", "7.1.8-1~bpo13+1", 1),
    ("7.2.13-1", "7.2.9-1", 1),
    ("1.0~", "1.0", -1),
    ("1.0", "1.0.0", -1),
    ("1:0.1", "9.9", 1),
    ("7.2.13-1", "7.2.13-1", 0),
])
def test_debian_version_compare(a, b, expected):
    result = versions.debian_version_compare(a, b)
    assert (result > 0) - (result < 0) == expected


# --------------------------------------------------------------------------
# Local trees and patches


def _fake_tree(root: Path, *, radix: bool = True, patchlevel: int = 2) -> Path:
    files = {
        "Makefile": f"VERSION = 7\nPATCHLEVEL = {patchlevel}\nSUBLEVEL = 0\nEXTRAVERSION = -rc1\nNAME = Test\n",
        "kernel/liveupdate/kexec_handover.c": "int kho_a;\nint kho_b;\nint kho_c;\n",
        "include/linux/kho/abi/kexec_handover.h": "#define KHO_ABI 1\n",
        "scripts/dtc/libfdt/fdt.c": "/* fdt */\n",
        "scripts/dtc/libfdt/fdt.o": "build output\n",
        "scripts/dtc/libfdt/.fdt.o.cmd": "build output\n",
        "mm/memblock.c": "int memblock;\n",
    }
    if radix:
        files["include/linux/kho_radix_tree.h"] = "struct kho_radix_tree;\n"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


GOOD_PATCH = """\
From 0000 Mon Sep 17 00:00:00 2001
Subject: [PATCH] kho: change b

--- a/kernel/liveupdate/kexec_handover.c
+++ b/kernel/liveupdate/kexec_handover.c
@@ -1,3 +1,3 @@
 int kho_a;
-int kho_b;
+int kho_b = 2;
 int kho_c;
diff --git a/mm/memblock.c b/mm/memblock.c
index 1111111..2222222 100644
--- a/mm/memblock.c
+++ b/mm/memblock.c
@@ -1 +1 @@
-int memblock;
+int memblock = 1;
--
2.43.0
"""

BAD_PATCH = """\
--- a/kernel/liveupdate/kexec_handover.c
+++ b/kernel/liveupdate/kexec_handover.c
@@ -1,3 +1,3 @@
 int kho_x;
-int kho_y;
+int kho_y = 2;
 int kho_z;
"""


def test_from_tree(tmp_cache, tmp_path):
    tree = _fake_tree(tmp_path / "linux")
    source = ks.from_tree(tree)
    assert source.root == tree.resolve()
    assert source.version == "local-7.2.0-rc1"
    assert source.makefile_version == "7.2.0-rc1"
    assert source.provider == f"tree:{tree.resolve()}"
    assert sorted(source.files) == [  # needed files only; build output and mm/ left out
        "Makefile", "include/linux/kho/abi/kexec_handover.h", "include/linux/kho_radix_tree.h",
        "kernel/liveupdate/kexec_handover.c", "scripts/dtc/libfdt/fdt.c",
    ]
    assert source.files["Makefile"] == hashlib.sha256((tree / "Makefile").read_bytes()).hexdigest()
    assert json.loads(json.dumps(source.identity()))["files"] == source.files
    assert not tmp_cache.exists()  # read-only use writes nothing


def test_digest_changes_with_a_file(tmp_cache, tmp_path):
    tree = _fake_tree(tmp_path / "linux")
    before = ks.from_tree(tree)
    assert ks.from_tree(tree).digest() == before.digest()
    (tree / "include/linux/kho_radix_tree.h").write_text("struct kho_radix_tree { int changed; };\n")
    after = ks.from_tree(tree)
    assert after.digest() != before.digest()
    assert after.files["include/linux/kho_radix_tree.h"] != before.files["include/linux/kho_radix_tree.h"]


def test_from_tree_with_patch(tmp_cache, tmp_path):
    tree = _fake_tree(tmp_path / "linux")
    patch = tmp_path / "fix.patch"
    patch.write_text(GOOD_PATCH)
    plain = ks.from_tree(tree)
    patched = ks.resolve(None, tree, None, patch)
    assert patched.root.is_relative_to(tmp_cache)
    assert patched.provider == f"tree:{tree.resolve()}+patch:fix.patch"
    assert patched.version == plain.version
    assert "int kho_b = 2;" in (patched.root / "kernel/liveupdate/kexec_handover.c").read_text()
    assert (tree / "kernel/liveupdate/kexec_handover.c").read_text() == "int kho_a;\nint kho_b;\nint kho_c;\n"
    assert set(patched.files) == set(plain.files)  # the mm/ part of the patch is dropped
    assert patched.digest() != plain.digest()
    assert ks.resolve(None, tree, None, patch).root == patched.root  # cached
    assert any(s.provider == patched.provider for s in ks.list_cached())


def test_from_tree_with_patch_that_does_not_apply(tmp_cache, tmp_path):
    tree = _fake_tree(tmp_path / "linux")
    patch = tmp_path / "bad.patch"
    patch.write_text(BAD_PATCH)
    with pytest.raises(KhoConformError, match="bad.patch does not apply to tree:"):
        ks.resolve(None, tree, None, patch)
    assert (tree / "kernel/liveupdate/kexec_handover.c").read_text() == "int kho_a;\nint kho_b;\nint kho_c;\n"
    assert ks.list_cached() == []


def test_patch_touching_no_needed_file(tmp_cache, tmp_path):
    tree = _fake_tree(tmp_path / "linux")
    patch = tmp_path / "mm.patch"
    patch.write_text(GOOD_PATCH[GOOD_PATCH.index("diff --git"):])
    with pytest.raises(KhoConformError, match="changes none of the files the suite uses"):
        ks.resolve(None, tree, None, patch)


def test_removed_lines_that_look_like_headers(tmp_cache, tmp_path):
    # A hunk removing "-- a/..." and adding "++ b/..." lines: the diff lines
    # "--- a/..." and "+++ b/..." are content, not a file header.
    tree = _fake_tree(tmp_path / "linux")
    (tree / "kernel/liveupdate/kexec_handover.c").write_text("-- a/fake header\nint kho_b;\n")
    patch = tmp_path / "tricky.patch"
    patch.write_text("""\
--- a/kernel/liveupdate/kexec_handover.c
+++ b/kernel/liveupdate/kexec_handover.c
@@ -1,2 +1,2 @@
--- a/fake header
+++ b/fake header
 int kho_b;
""")
    patched = ks.resolve(None, tree, None, patch)
    assert (patched.root / "kernel/liveupdate/kexec_handover.c").read_text() == "++ b/fake header\nint kho_b;\n"


def _series_patch(n: int, old: str, new: str) -> str:
    return f"""\
From {n:040x} Mon Sep 17 00:00:00 2001
From: Dev <dev@example.org>
Subject: [PATCH {n}/2] kho: step {n}

---
 kernel/liveupdate/kexec_handover.c | 2 +-

--- a/kernel/liveupdate/kexec_handover.c
+++ b/kernel/liveupdate/kexec_handover.c
@@ -1,3 +1,3 @@
 int kho_a;
-{old}
+{new}
 int kho_c;
--
2.43.0

"""


def test_series_as_mbox_and_directory(tmp_cache, tmp_path):
    tree = _fake_tree(tmp_path / "linux")
    first, second = _series_patch(1, "int kho_b;", "int kho_b = 1;"), _series_patch(2, "int kho_b = 1;", "int kho_b = 2;")
    mbox = tmp_path / "series.mbx"
    mbox.write_text(first + second)
    directory = tmp_path / "outgoing"
    directory.mkdir()
    (directory / "0000-cover-letter.patch").write_text("From 0 Mon Sep 17 00:00:00 2001\nSubject: [PATCH 0/2] cover\n\nno diff\n")
    (directory / "0001-kho-step-1.patch").write_text(first)
    (directory / "0002-kho-step-2.patch").write_text(second)
    for path in (mbox, directory):
        patched = ks.resolve(None, tree, None, path)
        assert "int kho_b = 2;" in (patched.root / "kernel/liveupdate/kexec_handover.c").read_text()
        assert len(patched.patches) == 2 and patched.provider.endswith(f"+series:{path.name}")
    # applied in order: the second patch alone does not apply
    lone = tmp_path / "0002-only.patch"
    lone.write_text(second)
    with pytest.raises(KhoConformError, match=r"0002-only.patch does not apply to tree:.*the hunk at kernel/liveupdate/kexec_handover.c:1 fails"):
        ks.resolve(None, tree, None, lone)


def test_tree_without_radix_tree_refused(tmp_cache, tmp_path):
    tree = _fake_tree(tmp_path / "linux", radix=False, patchlevel=0)
    with pytest.raises(KhoConformError, match=r"\(kernel 7\.0\.0-rc1\) has no KHO radix tree"):
        ks.from_tree(tree)
    with pytest.raises(KhoConformError, match="not a directory"):
        ks.from_tree(tmp_path / "missing")


def test_from_tarball(tmp_cache, tmp_path):
    tree = _fake_tree(tmp_path / "linux")
    tarball = tmp_path / "linux-7.2-rc1.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tree, arcname="linux-7.2-rc1")
    source = ks.from_tarball(tarball)  # most NEEDED_PATHS are missing from it: tolerated
    assert source.root.is_relative_to(tmp_cache)
    assert source.version == "7.2.0-rc1"
    assert source.provider == f"tarball:{tarball}"
    assert source.digest() == ks.from_tree(tree).digest()
    assert "mm/memblock.c" not in source.files
    assert ks.from_tarball(tarball).root == source.root


def test_tarball_without_radix_tree_refused(tmp_cache, tmp_path):
    tarball = tmp_path / "linux-7.0.tar"
    with tarfile.open(tarball, "w") as tar:
        data = b"VERSION = 7\nPATCHLEVEL = 0\nSUBLEVEL = 0\n"
        info = tarfile.TarInfo("linux-7.0/Makefile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(KhoConformError, match="no KHO radix tree"):
        ks.from_tarball(tarball)


def test_resolve_options(tmp_cache, tmp_path):
    tree = _fake_tree(tmp_path / "linux")
    assert ks.resolve(None, tree, None, None).root == tree.resolve()
    with pytest.raises(KhoConformError, match="--kernel and --kernel-tree conflict"):
        ks.resolve("7.2", tree, None, None)


def test_cache_inside_repo_refused(monkeypatch):
    monkeypatch.setenv("KHO_CONFORM_CACHE", str(Path(ks.__file__).parent / "cache"))
    with pytest.raises(KhoConformError, match="inside the repository"):
        ks.cache_dir()


def test_unreachable_mirror(tmp_cache, tmp_path, monkeypatch):
    # Port 9 on localhost refuses connections: fails fast without network.
    sources_list, sources_dir = _sources(tmp_path, "deb http://127.0.0.1:9/debian bookworm main\n")
    monkeypatch.setattr(mirror, "APT_SOURCES_LIST", sources_list)
    monkeypatch.setattr(mirror, "APT_SOURCES_DIR", sources_dir)
    with pytest.raises(KhoConformError, match="mirror unreachable: apt-get update failed: .*--kernel-tree"):
        ks.fetch("7.2")


# --------------------------------------------------------------------------
# The real thing (downloads into the real cache when it is empty)


def test_fetch_real_7_2():
    source = ks.fetch("7.2")
    assert source.version.startswith("7.2.")
    assert source.provider.startswith("debian:linux-source-7.2=")
    assert source.makefile_version.startswith("7.2.")
    assert source.root.is_relative_to(ks.cache_dir())
    for rel in tree_files.ESSENTIAL_PATHS:
        assert (source.root / rel).is_file()
        assert source.files[rel] == hashlib.sha256((source.root / rel).read_bytes()).hexdigest()
    assert ks.fetch(source.version).root == source.root  # exact pin hits the cache
