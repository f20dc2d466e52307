"""Patches and patch series, applied to a scratch copy of a source's needed
files in the cache (the source itself is never written).

A series is what kernel developers have: one diff, an mbox of several patches
(``git format-patch --stdout``, ``b4 am``), a ``git format-patch`` directory,
or a commit range of a git tree. ``git apply`` does the applying and tells
which files a patch touches; changes to files the suite never reads are left
out (``--include``), and a patch that does not apply is a one-line error
naming the patch and the failing hunk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import KhoConformError
from .cache import cached_entry, install_entry
from .identity import KernelSource, ranges_of
from .tree_files import NEEDED_PATHS, check_essentials, is_needed

_log = logging.getLogger(__name__)

_MBOX_FROM = re.compile(rb"^From \S+", re.M)
_SUBJECT = re.compile(r"^Subject:\s*(.*(?:\n[ \t].*)*)", re.M)
# A message holds a change when it has a file header pair; a cover letter
# ("[PATCH 0/N]") or a reply in the mbox does not.
_HAS_DIFF = re.compile(rb"^--- \S.*\n\+\+\+ \S", re.M)
_HUNK = re.compile(r"^@@ -\d+(?:,\d+)? \+(\d+)(?:,(\d+))? @@", re.M)


@dataclass(frozen=True)
class Patch:
    name: str  # file name, or "<mbox>#<n>: <subject>" for a message of an mbox
    text: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text).hexdigest()


def _git(args: list[str], cwd: Path, *, stdin: bytes | None = None, timeout: float = 120):
    # git must never find a repository above the scratch directory: a patch
    # would then be applied relative to that repository's top.
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(cwd.parent), LC_ALL="C")
    try:
        return subprocess.run(["git", *args], cwd=cwd, env=env, input=stdin, capture_output=True, timeout=timeout)
    except FileNotFoundError:
        raise KhoConformError("git not found: patches are applied with `git apply`; install git") from None


def _subject(message: bytes) -> str:
    m = _SUBJECT.search(message.decode("utf-8", "replace"))
    return " ".join(m[1].split()) if m else ""


def _split_mbox(path: Path, data: bytes) -> list[Patch]:
    """The messages of an mbox, in order, split by ``git mailsplit``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "split"
        out.mkdir()
        proc = _git(["mailsplit", "-o" + str(out), str(path.resolve())], Path(tmp))
        if proc.returncode:
            raise KhoConformError(f"{path}: not a readable mbox ({proc.stderr.decode(errors='replace').strip()}); "
                                  "pass a diff, an mbox or a git format-patch directory")
        messages = [p.read_bytes() for p in sorted(out.iterdir())]
    if len(messages) == 1:
        return [Patch(path.name, messages[0])]
    patches = [Patch(f"{path.name}#{i}: {_subject(m) or '(no subject)'}", m)
               for i, m in enumerate(messages, 1) if _HAS_DIFF.search(m)]
    skipped = len(messages) - len(patches)
    if skipped:
        _log.info("%s: skipping %d message(s) without a diff (cover letter, replies)", path.name, skipped)
    if not patches:
        raise KhoConformError(f"{path}: none of its {len(messages)} messages holds a diff; pass the mbox b4 am or "
                              "git format-patch wrote")
    return patches


def read_series(path: Path) -> list[Patch]:
    """The patches at ``path``, in the order they apply: a diff, an mbox, or a
    directory of ``*.patch`` (``git format-patch``; cover letters skipped)."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".patch", ".diff") and p.is_file()
                       and not p.name.startswith("0000-"))  # 0000-cover-letter.patch has no diff
        if not files:
            raise KhoConformError(f"patch directory {path} holds no *.patch or *.diff files; "
                                  "pass a git format-patch directory, an mbox or a diff")
        return [p for f in files for p in read_series(f)]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KhoConformError(f"cannot read patch {path}: {e.strerror}; pass a diff, an mbox or a format-patch directory") from None
    if len(_MBOX_FROM.findall(data)) > 1:
        return _split_mbox(path, data)
    return [Patch(path.name, data)]


def series_from_commits(tree: Path, revisions: str) -> list[Patch]:
    """The commits ``A..B`` of the git tree at ``tree`` as a patch series."""
    if ".." not in revisions:
        raise KhoConformError(f"--commits {revisions}: give a range A..B (e.g. v7.3..HEAD)")
    proc = _git(["format-patch", "--stdout", "--no-signature", revisions], Path(tree))
    if proc.returncode:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise KhoConformError(f"--commits {revisions}: git format-patch failed in {tree}: "
                              f"{detail[0] if detail else 'no output'}; is it a git tree with those commits?")
    if not proc.stdout.strip():
        raise KhoConformError(f"--commits {revisions}: the range holds no commits")
    with tempfile.TemporaryDirectory() as tmp:
        mbox = Path(tmp) / ("commits-" + re.sub(r"[^\w.-]", "_", revisions) + ".mbox")
        mbox.write_bytes(proc.stdout)
        patches = _split_mbox(mbox, proc.stdout)
    return [Patch(p.name.split("#", 1)[-1], p.text) for p in patches]


def touched_files(patch: Patch, cwd: Path) -> list[str]:
    """Paths the patch changes (``git apply --numstat``), without a/ b/ prefix."""
    proc = _git(["apply", "--numstat", "-"], cwd, stdin=patch.text)
    if proc.returncode:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise KhoConformError(f"patch {patch.name} is not a diff git can read: {detail[0] if detail else '?'}")
    return [line.split("\t", 2)[2] for line in proc.stdout.decode(errors="replace").splitlines() if line.count("\t") >= 2]


_FAILED_HUNK = re.compile(r"error: patch failed: (\S+:\d+)")


def _apply(patch: Patch, staged: Path, provider: str) -> None:
    includes = [f"--include={p}" for p in NEEDED_PATHS]
    for extra in (["--check"], []):  # check first: never leave a half-patched tree
        proc = _git(["apply", "-p1", *includes, *extra, "-"], staged, stdin=patch.text)
        if proc.returncode:
            err = proc.stderr.decode(errors="replace")
            hunk = _FAILED_HUNK.search(err)
            lines = [ln.removeprefix("error: ") for ln in err.splitlines() if ln.strip()]
            where = f"the hunk at {hunk[1]} fails" if hunk else (lines[0] if lines else "git apply failed")
            raise KhoConformError(f"patch {patch.name} does not apply to {provider}: {where}; rebase it onto that kernel")


def changed_lines(base: Path, patched: Path) -> tuple[tuple[int, int], ...]:
    """Line ranges ``(first, last)`` of ``patched`` (1-based, its own
    numbering) that differ from ``base`` (``git diff -U0``): added and
    changed lines, and where lines were only removed, the lines on either
    side of the removal. A file the series created is changed throughout."""
    proc = _git(["diff", "--no-index", "--no-color", "-U0", "--", str(base if base.exists() else os.devnull),
                 str(patched)], patched.parent)
    if proc.returncode not in (0, 1):  # 1: the files differ
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise KhoConformError(f"git diff of {patched.name} failed: {detail[0] if detail else '?'}")
    lines: set[int] = set()
    for m in _HUNK.finditer(proc.stdout.decode(errors="replace")):
        start, count = int(m[1]), int(m[2] if m[2] is not None else 1)
        lines.update(range(start, start + count) if count else (start, start + 1))
    total = len(patched.read_bytes().splitlines())
    return ranges_of(n for n in lines if 1 <= n <= total)


def apply_series(source: KernelSource, patches: list[Patch], label: str) -> KernelSource:
    """``source`` with ``patches`` applied in order to a copy of its needed
    files in the cache. ``label`` names the series in the provider string."""
    if not patches:
        raise KhoConformError(f"{label}: no patches to apply")
    with tempfile.TemporaryDirectory() as tmp:
        touched = [(p, touched_files(p, Path(tmp))) for p in patches]
    used = [p for p, files in touched if any(is_needed(f) for f in files)]
    if not used:
        raise KhoConformError(f"{label} changes none of the files the suite uses (NEEDED_PATHS); is it a -p1 kernel diff?")
    ignored = sorted({f for _, files in touched for f in files if not is_needed(f)})
    if ignored:
        _log.info("%s: ignoring changes to %s", label, ", ".join(ignored))
    provider = f"{source.provider}+{'patch' if len(patches) == 1 else 'series'}:{label}"
    key = "\0".join([source.version, provider, source.digest(), *(p.sha256 for p in patches)])
    name = "patched_" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]

    def make(root: Path, work: Path) -> KernelSource:
        staged = work / "tree"
        for rel in source.files:
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source.root / rel, staged / rel)
        for patch in used:
            _apply(patch, staged, provider)
        check_essentials(staged, f"{source.provider} with {label}")
        # In the patched files' numbering: what coverage marks as the series' lines.
        changed = {f: r for f in sorted({f for _, files in touched for f in files if is_needed(f)})
                   if (staged / f).is_file() and (r := changed_lines(source.root / f, staged / f))}
        return install_entry(root, name, staged, source.version, provider,
                             patches=[(p.name, p.sha256) for p in patches], changed_lines=changed)

    return cached_entry(name, make)
