"""Triage: the one policy that says whether a comparison is a pass, a known
finding, or a new failure. check, fuzz, the state machine, replay and the
corpus tests all ask ``triage()``.

Known findings (kernel bugs, limitations, documentation slips) are described
in ``corpus/known/<id>.toml``. A divergence is credited to one only when its
cause is proven:

- behaviour: the whole program agrees once the model runs with the quirks
  (``reference.quirks``) of the known findings that affect this kernel
  version; each quirk kept is needed (without it the program diverges), and
  the findings credited are those whose quirks were needed. Whatever still
  differs with every quirk on is new, even where a known bug fires first;
- undefined behaviour, which has no model: a sanitizer report is known when a
  finding lists its exact site (check kind, function, and the hash of the
  source line's text, which stays the same when lines move);
- documentation against code: a doc check is known when a documentation
  finding lists that check by name (``doc_checks``).

Across versions (a ``Pair``), each kernel answers for its own part: the old
kernel's version's findings (their quirks, their sanitizer sites) for what
happens before kexec, the next kernel's version's for the handover and
after. The proof is the same: the whole program agrees once the model's old
kernel runs with the first quirks and its next kernel with the second.

Divergence signatures are for de-duplication only, never for attribution.
A model or shim bug is never recorded as a known finding: it is fixed.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from reference import shortcuts
from reference.program import Program
from reference.quirks import ALL as QUIRKS

from ..corpus import known_dir
from ..errors import KhoConformError
from .diff import Comparison, Divergence, compare
from .target import Pair, Target

KINDS = ("kernel-bug", "kernel-limitation", "documentation")


@dataclass(frozen=True)
class KnownFinding:
    id: str
    title: str
    kind: str  # one of KINDS
    affected: tuple[str, ...]  # version prefixes, e.g. ("7.1",) or ("7.1", "7.2", "7.3")
    fixed_in: str  # first fixed version, "" while unfixed
    quirks: tuple[str, ...]  # model quirks that reproduce it
    sites: tuple[tuple[str, str, str], ...]  # sanitizer sites: (kind, function, line hash)
    doc_checks: tuple[str, ...]  # documentation checks it explains (conformance.doc), by name
    reproducers: tuple[str, ...]  # corpus/crashes/ findings that show it
    description: str
    why_model_is_right: str
    path: Path

    def affects(self, release: str) -> bool:
        """``release``: a release number such as "7.3.4" (KernelSource.release)."""
        m = re.search(r"\d+(\.\d+)+", release)
        release = m.group(0) if m else release
        if not any(release == a or release.startswith(a + ".") for a in self.affected):
            return False
        return not self.fixed_in or _version_key(release) < _version_key(self.fixed_in)


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def _record(path: Path) -> KnownFinding:
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise KhoConformError(f"{path}: not valid TOML ({e}); fix or remove it") from None
    line = lambda key: next((n for n, s in enumerate(text.splitlines(), 1) if s.startswith(key)), 1)  # noqa: E731
    missing = [k for k in ("id", "title", "kind", "affected", "description", "why_model_is_right") if k not in data]
    if missing:
        raise KhoConformError(f"{path}:1: no key {', '.join(map(repr, missing))}; fix or remove it")
    if data["kind"] not in KINDS:
        raise KhoConformError(f"{path}:{line('kind')}: kind {data['kind']!r} is not one of {', '.join(KINDS)}; fix or remove it")
    unknown = set(data.get("quirks", ())) - QUIRKS
    if unknown:
        raise KhoConformError(f"{path}:{line('quirks')}: no model quirk {', '.join(sorted(unknown))} "
                              f"(the model has {', '.join(sorted(QUIRKS))}); fix or remove it")
    try:
        sites = tuple((s["kind"], s["function"], s["line"]) for s in data.get("sanitizer", ()))
    except (KeyError, TypeError):
        raise KhoConformError(f"{path}:{line('[[sanitizer]]')}: a [[sanitizer]] entry needs kind, function and line; "
                              "fix or remove it") from None
    try:
        return KnownFinding(
            id=str(data["id"]), title=str(data["title"]), kind=data["kind"], affected=tuple(map(str, data["affected"])),
            fixed_in=str(data.get("fixed_in", "")), quirks=tuple(data.get("quirks", ())), sites=sites,
            doc_checks=tuple(map(str, data.get("doc_checks", ()))),
            reproducers=tuple(map(str, data.get("reproducers", ()))), description=data["description"].strip(),
            why_model_is_right=data["why_model_is_right"].strip(), path=path,
        )
    except (TypeError, AttributeError) as e:  # a list where a string belongs, or the other way round
        raise KhoConformError(f"{path}: a value has the wrong type ({e}); fix or remove it") from None


@lru_cache(maxsize=None)
def load_known(directory: Path | None = None) -> tuple[KnownFinding, ...]:
    """Every record of ``directory`` (default: the corpus's known/)."""
    return tuple(_record(path) for path in sorted((directory or known_dir()).glob("*.toml")))


def known_doc_slip(check: str, release: str) -> KnownFinding | None:
    """The documentation finding that explains doc check ``check`` failing
    on kernel ``release``, if one does."""
    return next((k for k in load_known() if check in k.doc_checks and k.affects(release)), None)


@dataclass(frozen=True)
class Verdict:
    status: str  # "pass" | "known" | "fail"
    divergence: Divergence | None = None  # the first new divergence (fail), else the first (known); None: pass
    known: tuple[KnownFinding, ...] = ()  # the findings proven to cause what diverged
    new: tuple[Divergence, ...] = ()  # what no known finding explains
    quirks: frozenset[str] = field(default_factory=frozenset)  # the quirks the proof needed (a handover's old kernel's)
    next_quirks: frozenset[str] | None = None  # a handover across versions: its next kernel's

    @property
    def known_ids(self) -> str:
        return ",".join(k.id for k in self.known)

    def proof(self) -> str:
        """How the model came to agree: "" (it needed no quirk), or
        "; the model with quirk(s) ... agrees"."""
        if self.next_quirks is None:
            return f"; the model with quirk(s) {', '.join(sorted(self.quirks))} agrees" if self.quirks else ""
        parts = [f"{kernel} kernel with quirk(s) {', '.join(sorted(q))}"
                 for kernel, q in (("old", self.quirks), ("next", self.next_quirks)) if q]
        return f"; the model's {' and '.join(parts)} agrees" if parts else ""


def _by_site(d: Divergence) -> bool:
    return bool(d.site)


# Which kernel a quirk is switched on for: a Target's one kernel, or a Pair's old or next.
BOTH, OLD, NEXT = "both", "old", "next"


def _affecting(target: Target) -> tuple[KnownFinding, ...]:
    """The known findings that affect the target's release; asked for every
    program, so kept per release and per list of findings (load_known's)."""
    found, release = load_known(), target.build.source.release
    hit = _AFFECTING.get(release)
    if hit is None or hit[0] is not found:
        hit = _AFFECTING[release] = (found, tuple(k for k in found if k.affects(release)))
    return hit[1]


_AFFECTING: dict[str, tuple[tuple[KnownFinding, ...], tuple[KnownFinding, ...]]] = {}


def _next_side(d: Divergence, kexec: int | None) -> bool:
    """Whether a divergence is the next kernel's doing (its boot or later)."""
    if d.check == "handover:model-image":
        return True
    return kexec is not None and d.op_index is not None and d.op_index >= kexec


def triage(cmp: Comparison, target: Target | Pair, *, attribute: bool = True) -> Verdict:
    """The verdict on one comparison of ``target``'s kernel with the model.
    ``attribute=False`` decides only new or not (what fuzzing needs): the
    quirks are not narrowed down to the ones the agreement needs, so the
    verdict names only the findings matched by a sanitizer site."""
    if cmp.ok:
        return Verdict("pass")
    findings = {OLD: _affecting(target.old), NEXT: _affecting(target.next)}
    owners = {side: {site: k for k in found for site in k.sites} for side, found in findings.items()}
    kexec = cmp.program.kexec_index()
    new, credited = [], {}
    for d in cmp.divergences:
        if _by_site(d):
            owner = owners[NEXT if _next_side(d, kexec) else OLD].get(d.site)
            if owner is None:
                new.append(d)
            else:
                credited[owner.id] = owner

    # A Target's quirks hold for both its kernels; a Pair's for one side each.
    if isinstance(target, Pair):
        available = frozenset((side, q) for side in (OLD, NEXT) for k in findings[side] for q in k.quirks)
    else:
        available = frozenset((BOTH, q) for k in findings[OLD] for q in k.quirks)

    def split(chosen: frozenset[tuple[str, str]]) -> tuple[frozenset[str], frozenset[str]]:
        return (frozenset(q for side, q in chosen if side in (BOTH, OLD)),
                frozenset(q for side, q in chosen if side in (BOTH, NEXT)))

    used: frozenset[tuple[str, str]] = frozenset()
    if any(not _by_site(d) for d in cmp.divergences):

        def remaining(chosen: frozenset[tuple[str, str]]) -> list[Divergence]:
            old, nxt = split(chosen)
            c = compare(cmp.program, target, quirks=old, next_quirks=nxt, again=cmp, locate=cmp.located)
            return [d for d in c.divergences if not _by_site(d)]

        rest = remaining(available) if available else [d for d in cmp.divergences if not _by_site(d)]
        if rest:
            new += rest
        elif attribute:
            used = available
            for quirk in sorted(available):  # keep only the quirks the agreement needs
                if not remaining(used - {quirk}):
                    used -= {quirk}
            for side, found in findings.items():
                needed = {q for s, q in used if s in (BOTH, side)}
                credited.update((k.id, k) for k in found if set(k.quirks) & needed)
    new.sort(key=lambda d: -1 if d.op_index is None else d.op_index)
    known = tuple(credited.values())
    old, nxt = split(used)
    quirks = (old, nxt) if isinstance(target, Pair) else (old, None)
    if new:
        return Verdict("fail", new[0], known, tuple(new), *quirks)
    return Verdict("known", cmp.first, known, (), *quirks)


def screen(program: Program, target: Target | Pair) -> tuple[Comparison, Verdict]:
    """Compare and decide new or not (``triage(attribute=False)``), as
    fuzzing and the state machine need it, for many programs.

    A shortcut: the first comparison does not bisect for the op that caused
    a state divergence. Whether a divergence is new does not depend on
    where it is placed (``triage`` asks only whether any divergence is left
    under the quirks, and places sanitizer reports by their own op), so
    only a new one is compared again, located, for its record and
    signature. A known verdict from an unlocated comparison names no
    divergence."""
    cmp = compare(program, target, locate=not shortcuts.ENABLED)
    verdict = triage(cmp, target, attribute=False)
    if verdict.status == "fail" and not cmp.located:
        cmp = compare(program, target, again=cmp)
        verdict = triage(cmp, target, attribute=False)
    if verdict.status == "known" and not cmp.located:
        verdict = replace(verdict, divergence=None)
    return cmp, verdict
