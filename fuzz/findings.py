"""Findings on disk, and the readable trace of a comparison.

A finding is one divergence signature: ``<crashes>/<signature>/`` holds

- ``program.txt``   the minimized program (text form): the reproducer;
- ``original.txt``  the program as the fuzzer found it;
- ``input.bin``     the raw fuzzer bytes, when there were any;
- ``finding.json``  signature, divergences, kernel source identity, page
                    shift, flavor, creation time;
- ``trace.txt``     ``trace()`` of the minimized program.

Directories are written to a temporary name and renamed into place, so a
killed fuzzer never leaves half a finding, and two processes racing on one
signature keep exactly one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from conformance.diff import Comparison, Target, compare
from reference.outcome import NextKernel, OpResult
from reference.program import Program

FINDING_FILES = ("program.txt", "original.txt", "finding.json", "trace.txt")
MARK = "<== first divergence"


def is_known(comparison: Comparison, version: str) -> bool:
    """Whether the first divergence is a triaged finding on this version
    (conformance.known; without it nothing is known)."""
    try:
        from conformance.known import is_known as known
    except ImportError:
        return False
    return comparison.first is not None and known(comparison.first, version) is not None


def save_finding(root: Path, program: Program, comparison: Comparison, target: Target,
                 raw: bytes | None = None) -> Path | None:
    """Save ``program`` (the minimized reproducer of ``comparison``, which is
    the run of the original input) under ``root/<signature>``. None when the
    divergence is known on this kernel or the signature is already saved."""
    first = comparison.first
    if first is None or is_known(comparison, target.build.source.version):
        return None
    dest = Path(root) / first.signature
    if dest.exists():
        return None
    minimized = compare(program, target) if program != comparison.program else comparison
    meta = {
        "signature": first.signature,
        "first": (minimized.first or first).to_json(),
        "divergences": [d.to_json() for d in minimized.divergences],
        "events": list(minimized.kernel.events),
        "original_divergences": [d.to_json() for d in comparison.divergences],
        "kernel_version": target.build.source.version,
        "page_shift": target.build.page_shift,
        "flavor": target.build.flavor,
        "profile": target.profile.name,
        "source": target.build.identity(),
        "ops": len(program.steps),
        "original_ops": len(comparison.program.steps),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{first.signature}.", dir=dest.parent))
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
    """finding.json of a finding directory (or of the directory holding a file)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    data = json.loads((directory / "finding.json").read_text())
    data["path"] = str(directory)
    return data


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
    flavor with a sanitizer report among its events (faults and timeouts
    the plain flavor reports too)."""
    return finding.get("flavor", "plain") != "plain" and any(
        not e.startswith(("fault:", "timeout:")) for e in finding.get("events", ()))


# ---- trace ------------------------------------------------------------------


def _result(r: OpResult | None) -> str:
    if r is None:
        return "-"
    parts = [f"rc={r.rc}"]
    if r.value:
        parts.append(f"v={r.value:#x}")
    if r.value2:
        parts.append(f"v2={r.value2:#x}")
    if r.warnings:
        # "function:line" only: a kernel site also carries its WARN condition, a
        # piece of kernel source that findings (committed files) must not hold.
        parts.append("warn=" + ",".join(":".join(w.split(":")[:2]) for w in r.warnings))
    return " ".join(parts)


def _next_summary(n: NextKernel | None) -> str:
    if n is None:
        return "no next kernel"
    if not n.accepted:
        return f"refused the handover: {n.reason or '?'}"
    return (f"accepted; walk {len(n.walk)} blocks, reserved {len(n.reserved)}, noinit {len(n.noinit)}, "
            f"scratch marks {len(n.scratch_marks)}, magic heads {len(n.magic)}, phantom pages {len(n.phantom)}")


def trace(comparison: Comparison, target: Target | None = None) -> str:
    """Header, every op with the model's and the kernel's results side by
    side (the first divergence marked), then all divergences, the kernel's
    events and both next kernels."""
    c = comparison
    lines = []
    if target is not None:
        src = target.build.source
        lines.append(f"kernel {src.version} ({src.provider}) ps{target.build.page_shift} {target.build.flavor}; "
                     f"model profile {target.profile.name}")
    header, _, _ = c.program.text().partition("---\n")
    lines += ["", *header.splitlines(), ""]
    width = max([len(s.text()) for s in c.program.steps] + [10])
    mark_at = c.first.op_index if c.first else None
    mark_boot = c.first is not None and c.first.op_index is None
    lines.append(f"{'#':>4}  {'op':<{width}}  {'model':<28}  kernel")
    lines.append(f"{'boot':>4}  {'':<{width}}  {_result(c.model.boot):<28}  {_result(c.kernel.boot)}"
                 + (f"  {MARK}" if mark_boot else ""))
    for i, step in enumerate(c.program.steps):
        m = c.model.ops[i] if i < len(c.model.ops) else None
        k = c.kernel.ops[i] if i < len(c.kernel.ops) else None
        mark = f"  {MARK}" if i == mark_at else ""
        lines.append(f"{i:>4}  {step.text():<{width}}  {_result(m):<28}  {_result(k)}{mark}")
    lines += ["", f"divergences ({len(c.divergences)}):" if c.divergences else "no divergence"]
    lines += [f"  {d.line()}  [{d.signature}]" for d in c.divergences]
    if c.kernel.events:
        lines += ["", "kernel events:", *(f"  {e}" for e in c.kernel.events)]
    lines += ["", "next kernel:", f"  model:  {_next_summary(c.model.next)}", f"  kernel: {_next_summary(c.kernel.next)}"]
    return "\n".join(lines) + "\n"
