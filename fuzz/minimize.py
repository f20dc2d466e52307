"""Minimizing a diverging program while keeping its divergence signature,
and replaying any input (finding directory, program text, fuzzer bytes)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

from conformance.compare.diff import compare
from conformance.compare.target import Pair, Target
from conformance.compare.trace import trace
from conformance.compare.triage import triage
from conformance.errors import KhoConformError
from conformance.source import KernelSource, fetch, from_tree, list_cached
from conformance.source.identity import SHORT_DIGEST
from reference.profiles import PROFILES
from reference.program import Header, Program, ProgramError, Step, parse_program

from .decode import decode
from .findings import finding_of

Predicate = Callable[[Program], bool]


def signature_of(target: Target | Pair, program: Program) -> str | None:
    """The signature a comparison is filed under: its first unexplained
    divergence's, else its first divergence's (None: no divergence)."""
    c = compare(program, target)
    return None if c.ok else triage(c, target, attribute=False).divergence.signature


def signature_predicate(target: Target | Pair, signature: str) -> Predicate:
    """True for programs filed under ``signature`` on ``target``."""

    def still_fails(program: Program) -> bool:
        try:
            return signature_of(target, program) == signature
        except KhoConformError:  # e.g. a header the driver refuses
            return False

    return still_fails


class _Budget:
    """Counts predicate runs; candidates that are invalid programs are free."""

    def __init__(self, predicate: Predicate, runs: int) -> None:
        self.predicate = predicate
        self.left = runs

    def __call__(self, program: Program) -> bool:
        try:
            program.header.validate()
        except ProgramError:
            return False
        if self.left <= 0:
            return False
        self.left -= 1
        return self.predicate(program)


def minimize(program: Program, still_fails: Predicate, budget_runs: int = 400) -> Program:
    """A smaller program for which ``still_fails`` holds: delta debugging
    over the ops (chunks, then single ops), then simpler header and operand
    values. At most ``budget_runs`` calls of ``still_fails``."""
    test = _Budget(still_fails, budget_runs)
    best = program
    best = _ddmin_ops(best, test)
    best = _simplify_header(best, test)
    best = _simplify_values(best, test)
    # Simpler values can make more ops removable.
    return _ddmin_ops(best, test)


def _with_steps(p: Program, steps: list[Step] | tuple[Step, ...]) -> Program:
    return Program(p.header, tuple(steps))


def _ddmin_ops(p: Program, test: _Budget) -> Program:
    """Remove chunks of ops, halving the chunk size down to single ops."""
    steps = list(p.steps)
    chunk = max(len(steps) // 2, 1)
    while test.left > 0:
        i = 0
        while i < len(steps):
            candidate = steps[:i] + steps[i + chunk :]
            if test(_with_steps(p, candidate)):
                steps = candidate
            else:
                i += chunk
        if chunk == 1:
            break
        chunk //= 2
    return _with_steps(p, steps)


def _smaller(value: int) -> Iterator[int]:
    """Candidates simpler than ``value``, simplest first."""
    seen = set()
    for v in (0, 1, value.bit_length() and 1 << (value.bit_length() - 1), value >> 1, value & (value - 1)):
        if v < value and v not in seen:
            seen.add(v)
            yield v


def _simplify_header(p: Program, test: _Budget) -> Program:
    """The default (or no) ram, numa and scratch lists, else fewer entries;
    no fault injection; a smaller arena."""
    best = p
    default = Header(page_shift=p.header.page_shift)

    def attempt(**changes) -> bool:
        nonlocal best
        candidate = replace(best, header=replace(best.header, **changes))
        if candidate.header != best.header and test(candidate):
            best = candidate
            return True
        return False

    for name in ("scratch", "ram", "numa"):
        if attempt(**{name: getattr(default, name)}):
            continue
        i = 0
        while i < len(entries := getattr(best.header, name)):
            # ram and numa keep one entry: an empty list is the default in the text form
            if (name != "scratch" and len(entries) == 1) or not attempt(**{name: entries[:i] + entries[i + 1 :]}):
                i += 1
    attempt(fail_alloc=0)
    for pages in (16, 32, 64, 128, 256):
        if pages < best.header.arena_pages and attempt(arena_pages=pages):
            break
    return best


def _simplify_values(p: Program, test: _Budget) -> Program:
    """Each operand shrunk as far as the predicate allows (toward 0, 1 and
    powers of two), each subtree name replaced by "a"."""
    steps = list(p.steps)

    def attempt(i: int, **changes) -> bool:
        candidate = steps[:i] + [replace(steps[i], **changes)] + steps[i + 1 :]
        if candidate[i] != steps[i] and test(_with_steps(p, candidate)):
            steps[:] = candidate
            return True
        return False

    for i in range(len(steps)):
        for name in ("a", "b", "c"):
            while test.left > 0 and any(attempt(i, **{name: v}) for v in _smaller(getattr(steps[i], name))):
                pass
        if steps[i].name and test.left > 0:
            attempt(i, name="a")
    return _with_steps(p, steps)


# ---- files -------------------------------------------------------------------


def load_input(path: Path, page_shift: int) -> tuple[Program, dict | None]:
    """The program of a finding directory (with its finding.json), a program
    text, or raw fuzzer bytes (``.bin``, decoded for ``page_shift``)."""
    path = Path(path)
    finding = finding_of(path)
    if path.is_dir():
        path = path / "program.txt"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KhoConformError(f"{path}: cannot read it ({e.strerror}); give a program text, a finding directory "
                              "or a fuzzer input") from None
    if path.suffix == ".bin":
        return decode(data, page_shift), finding
    try:
        return parse_program(data.decode()), finding
    except UnicodeDecodeError:
        return decode(data, page_shift), finding
    except ProgramError as e:
        raise KhoConformError(f"{path}: {e}") from None


def finding_source(finding: dict) -> KernelSource:
    """The kernel source a finding was saved from: the same files (by
    digest) in the tree it names or in the cache, else its version from the
    mirror (``source_note`` then says whether the files differ). For a
    handover, the old kernel's."""
    return _saved_source(finding, finding)


def finding_next_source(finding: dict) -> KernelSource | None:
    """The next kernel's source of a finding saved from a handover across
    versions (found as ``finding_source`` finds the old kernel's), else None."""
    return _saved_source(finding, finding["next"]) if "next" in finding else None


def _saved_source(finding: dict, part: dict) -> KernelSource:
    """``part``: the finding's record of one kernel (kernel_version, source)."""
    saved = part["source"]
    digest, provider = _saved_digest(part), str(saved.get("provider", ""))
    if provider.startswith("tree:") and Path(provider[len("tree:"):]).is_dir():
        tree = from_tree(Path(provider[len("tree:"):]))
        if tree.digest() == digest:
            return tree
    for cached in list_cached():
        if cached.digest() == digest:
            return cached
    if provider.startswith("debian:") and not _PATCHED.search(provider):
        return fetch(part["kernel_version"])
    how = "--kernel-tree, --kernel-tarball or --patch"
    whose, how = ("its next kernel", f"it as {how}, with --handover-from {finding['kernel_version']},") \
        if part is not finding else ("it", f"the same {how}")
    raise KhoConformError(f"{finding['path']}: {whose} was saved from {provider} (files {digest[:SHORT_DIGEST]}), which "
                          f"is not at hand; pass {how} to replay it")


_PATCHED = re.compile(r"\+(patch|series):")


def _saved_digest(part: dict) -> str:
    """The digest of the files a finding (or its next kernel) was saved
    from (older findings record only the files' hashes)."""
    saved = part["source"]
    return saved.get("digest") or KernelSource.from_identity(saved, Path()).digest()


def source_note(finding: dict | None, target: Target | Pair) -> str:
    """A warning when a source under test is not the one a finding was
    saved from ("" when it is, or for a plain program)."""
    if finding is None:
        return ""
    parts = [(finding, target.old)] + ([(finding["next"], target.next)] if "next" in finding else [])
    notes = []
    for part, kernel in parts:
        if (saved := _saved_digest(part)) != (digest := kernel.build.source.digest()):
            notes.append(f"note: the finding was saved from {part['source'].get('provider', '?')} (files "
                         f"{saved[:SHORT_DIGEST]}); this is {kernel.build.source.provider} (files {digest[:SHORT_DIGEST]}), "
                         "so its outcome may differ")
    return "\n".join(notes)


def _profiled(target: Target, part: dict, finding: dict) -> Target:
    if part["profile"] == target.profile.name:
        return target
    if part["profile"] not in PROFILES:
        raise KhoConformError(f"{finding['path']}: model profile {part['profile']!r} is not one of "
                              f"{', '.join(PROFILES)}; this kho-conform is older than the finding")
    return replace(target, profile=PROFILES[part["profile"]])


def as_saved(target: Target | Pair, finding: dict | None) -> Target | Pair:
    """``target`` held to the model profile(s) the finding was saved with."""
    if finding is None:
        return target
    if isinstance(target, Pair):
        new = _profiled(target.next, finding["next"], finding) if "next" in finding else target.next
        return Pair(_profiled(target.old, finding, finding), new)
    return _profiled(target, finding, finding)


def _for_target(program: Program, target: Target | Pair, path: Path) -> Program:
    if program.header.page_shift != target.page_shift:
        raise KhoConformError(
            f"{path} is a page shift {program.header.page_shift} program; pass --page-shift {program.header.page_shift}"
        )
    return program


def replay(path: Path, target: Target | Pair, as_json: bool = False) -> tuple[str, bool]:
    """Run an input on both implementations: (the trace or JSON, whether it
    diverged). A saved finding runs with the model profile it was saved
    with, and the output says whether the divergence still has the recorded
    signature (and whether the source differs from the saved one)."""
    program, finding = load_input(path, target.page_shift)
    target = as_saved(target, finding)
    c = compare(_for_target(program, target, path), target)
    verdict = triage(c, target)
    signature = verdict.divergence.signature if verdict.divergence else None
    expected = finding["signature"] if finding else None
    # A finding stays the divergence it was saved for, first or not (a quirk
    # added since may explain it, and a known bug may now come first); it was
    # saved as triage's new divergence, which may be one only the model under
    # the known findings' quirks shows.
    same = expected is not None and (expected == signature or expected in {d.signature for d in c.divergences})
    note = source_note(finding, target)
    if as_json:
        out = {
            "input": str(path), "kernel": target.old.build.identity(), "profile": target.old.profile.name, "ok": c.ok,
            "verdict": verdict.status, "known": [k.id for k in verdict.known], "signature": signature,
            "program": program.text(), "divergences": [d.to_json() for d in c.divergences],
            "recorded_signature": expected, "reproduced": same if finding else None,
            "same_source": not note if finding else None,
            "model": [asdict(r) for r in c.model.ops], "kernel_ops": [asdict(r) for r in c.kernel.ops],
            "events": list(c.kernel.events),
        }
        if isinstance(target, Pair):
            out |= {"next_kernel": target.next.build.identity(), "next_profile": target.next.profile.name}
        return json.dumps(out, indent=1, default=list), not c.ok
    text = trace(c, target)
    text += f"\nverdict: {verdict.status}" + (f" ({', '.join(k.id for k in verdict.known)})" if verdict.known else "") + "\n"
    if finding:
        outcome = "reproduced" if same else ("diverges differently" if signature else "no longer diverges")
        text += (note + "\n" if note else "") + f"recorded signature {expected}: {outcome}\n"
    return text, not c.ok


def minimize_file(path: Path, target: Target | Pair, out: Path | None = None) -> Path:
    """Minimize the input at ``path`` (as ``replay`` reads it), keeping its
    signature; write the program text to ``out`` (default: ``<name>.min.txt``
    beside it, ``program.min.txt`` in a finding)."""
    path = Path(path)
    program, finding = load_input(path, target.page_shift)
    target = as_saved(target, finding)
    signature = signature_of(target, _for_target(program, target, path))
    if signature is None:
        raise KhoConformError(f"{path} does not diverge on {target.label}: nothing to minimize")
    small = minimize(program, signature_predicate(target, signature))
    if out is None:
        out = path / "program.min.txt" if path.is_dir() else path.with_name(path.stem + ".min.txt")
    out.write_text(small.text())
    return out
