"""The readable trace of a comparison: every op with the model's and the
kernel's results side by side, the first divergence marked, then all
divergences, the kernel's events and both next kernels. What ``replay``
prints and every saved finding keeps (``trace.txt``)."""

from __future__ import annotations

from reference.outcome import NextBoot, OpResult

from .diff import Comparison
from .target import Pair, Target

MARK = "<== first divergence"


def _result(r: OpResult | None) -> str:
    if r is None:
        return "-"
    parts = [f"rc={r.rc}"]
    if r.value:
        parts.append(f"v={r.value:#x}")
    if r.value2:
        parts.append(f"v2={r.value2:#x}")
    if r.pages:
        parts.append("pages=" + ",".join(f"{pfn:#x}+{n:#x}" for pfn, n in r.pages))
    if r.warnings:
        # "function:line" only: a kernel site also carries its WARN condition, a
        # piece of kernel source that findings (committed files) must not hold.
        parts.append("warn=" + ",".join(":".join(w.split(":")[:2]) for w in r.warnings))
    if r.may_time_out:
        parts.append("(may outlast the CPU budget)")
    return " ".join(parts)


def _next_summary(n: NextBoot | None) -> str:
    if n is None:
        return "no next kernel"
    if not n.accepted:
        return f"refused the handover: {n.reason or '?'}"
    return (f"accepted; walk {len(n.walk)} blocks, reserved {len(n.reserved)}, noinit {len(n.noinit)}, "
            f"scratch marks {len(n.scratch_marks)}, magic heads {len(n.magic)}, phantom pages {len(n.phantom)}")


def _kernel_line(target: Target | Pair) -> str:
    """Which kernel (or handover) ran, from what source, held to which profile."""
    if isinstance(target, Pair):
        old, new = target.old, target.next
        return (f"{target.kernels}: old kernel {old.build.source.version} ({old.build.source.provider}), next kernel "
                f"{new.build.source.version} ({new.build.source.provider}) ps{target.page_shift} {old.build.flavor}; "
                f"model profiles {old.profile.name} → {new.profile.name}")
    src = target.build.source
    return (f"kernel {src.version} ({src.provider}) ps{target.build.page_shift} {target.build.flavor}; "
            f"model profile {target.profile.name}")


def trace(comparison: Comparison, target: Target | Pair | None = None) -> str:
    """Header, every op with the model's and the kernel's results side by
    side (the first divergence marked), then all divergences, the kernel's
    events and both next kernels."""
    c = comparison
    lines = []
    if target is not None:
        lines.append(_kernel_line(target))
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
