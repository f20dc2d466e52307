"""Findings on disk.

A finding is one divergence signature: ``<crashes>/<signature>/`` holds

- ``program.txt``   the minimized program (text form): the reproducer;
- ``original.txt``  the program as the fuzzer found it;
- ``input.bin``     the raw fuzzer bytes, when there were any;
- ``finding.json``  signature, divergences, kernel source identity, page
                    shift, flavor, model profile, creation time; for a
                    handover across versions, ``next``: the next kernel's
                    version, source identity and profile;
- ``trace.txt``     ``trace()`` of the minimized program.

Directories are written under a temporary name (in a staging directory on
the same file system, which the fuzz runner owns and removes) and renamed
into place, so a killed fuzzer never leaves half a finding, and two processes
racing on one signature keep exactly one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from conformance.compare.diff import Comparison, compare
from conformance.compare.target import Pair, Target
from conformance.compare.trace import trace
from conformance.compare.triage import triage
from conformance.errors import KhoConformError
from conformance.native.build import FLAVORS
from reference.program import Program

FINDING_FILES = ("program.txt", "original.txt", "finding.json", "trace.txt")
# What replay needs of finding.json, with its type.
FINDING_KEYS = {"signature": str, "kernel_version": str, "page_shift": int, "flavor": str, "profile": str, "source": dict}
# ... and of its "next", for a handover across versions.
NEXT_KEYS = {"kernel_version": str, "profile": str, "source": dict}


def save_finding(root: Path, program: Program, comparison: Comparison, target: Target | Pair,
                 raw: bytes | None = None, staging: Path | None = None) -> Path | None:
    """Save ``program`` (the minimized reproducer of ``comparison``, which is
    the run of the original input) under ``root/<signature>``, written in
    ``staging`` (default ``root``) first. None when the comparison is not a
    new failure or the signature is already saved."""
    verdict = triage(comparison, target, attribute=False)
    if verdict.status != "fail":
        return None
    first = verdict.divergence
    dest = Path(root) / first.signature
    if dest.exists():
        return None
    minimized = compare(program, target) if program != comparison.program else comparison
    meta = {
        "signature": first.signature,
        "first": (minimized.first or first).to_json(),
        "divergences": [d.to_json() for d in minimized.divergences],
        "events": list(minimized.kernel.events),
        "reports": [r.where() for r in minimized.kernel.reports],
        "original_divergences": [d.to_json() for d in comparison.divergences],
        "kernel_version": target.old.build.source.version,
        "page_shift": target.page_shift,
        "flavor": target.old.build.flavor,
        "profile": target.old.profile.name,
        "source": target.old.build.identity(),
        "ops": len(program.steps),
        "original_ops": len(comparison.program.steps),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if isinstance(target, Pair):
        meta["next"] = {"kernel_version": target.next.build.source.version, "profile": target.next.profile.name,
                        "source": target.next.build.identity()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{first.signature}.", dir=staging or dest.parent))
    try:
        (tmp / "program.txt").write_text(program.text())
        (tmp / "original.txt").write_text(comparison.program.text())
        if raw is not None:
            (tmp / "input.bin").write_bytes(raw)
        (tmp / "finding.json").write_text(json.dumps(meta, indent=1) + "\n")
        (tmp / "trace.txt").write_text(trace(minimized, target))
        tmp.chmod(0o755)
        tmp.rename(dest)  # fails if another process saved this signature meanwhile
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if dest.exists():
            return None
        raise
    return dest


def load_finding(path: Path) -> dict:
    """finding.json of a finding directory (or of the directory holding a
    file), checked for what replay needs; a one-line error naming the file
    otherwise."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    meta = directory / "finding.json"
    fix = "restore it from where the finding came from (e.g. git checkout) or delete the directory"
    if not meta.is_file():
        raise KhoConformError(f"{directory} is not a finding directory (no finding.json); "
                              "give corpus/crashes/<signature>/, a program text or a fuzzer input")
    try:
        data = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise KhoConformError(f"{meta} is damaged ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise KhoConformError(f"{meta} is not a finding record (a JSON object); {fix}")
    for key, kind in FINDING_KEYS.items():
        if not isinstance(data.get(key), kind):
            raise KhoConformError(f"{meta}: {key!r} is missing or not a {kind.__name__}; {fix}")
    if "next" in data:
        for key, kind in NEXT_KEYS.items():
            if not isinstance(data["next"], dict) or not isinstance(data["next"].get(key), kind):
                raise KhoConformError(f"{meta}: 'next.{key}' is missing or not a {kind.__name__}; {fix}")
    if data["flavor"] not in FLAVORS:
        raise KhoConformError(f"{meta}: unknown flavor {data['flavor']!r} (not one of {', '.join(FLAVORS)}); {fix}")
    if not (directory / "program.txt").is_file():
        raise KhoConformError(f"{directory}: program.txt is missing, the finding is incomplete; {fix}")
    data["path"] = str(directory)
    return data


def finding_of(path: Path) -> dict | None:
    """The finding ``path`` is (a finding directory) or is in (one of its
    files), checked as by ``load_finding``; None for anything else."""
    path = Path(path)
    return load_finding(path) if path.is_dir() or (path.parent / "finding.json").exists() else None


def iter_findings(root: Path) -> Iterator[Path]:
    """Complete finding directories under ``root``, sorted (temporary
    directories of saves in progress start with a dot and are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and all((d / f).is_file() for f in FINDING_FILES):
            yield d


def needs_sanitizer(finding: dict) -> bool:
    """Whether a finding needs ASan/UBSan to show: found on a sanitizer
    flavor with a sanitizer report (faults and timeouts the plain flavor
    reports too; "undefined behaviour trap" events are reports saved before
    UBSan recovered)."""
    return finding.get("flavor", "plain") != "plain" and (bool(finding.get("reports")) or any(
        not e.startswith(("fault:", "timeout:")) for e in finding.get("events", ())))
