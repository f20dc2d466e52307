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
  source line's text, which stays the same when lines move).

Divergence signatures are for de-duplication only, never for attribution.
A model or shim bug is never recorded as a known finding: it is fixed.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from reference.quirks import ALL as QUIRKS

from ..corpus import known_dir
from ..errors import KhoConformError
from .diff import Comparison, Divergence, compare
from .target import Target

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
            reproducers=tuple(map(str, data.get("reproducers", ()))), description=data["description"].strip(),
            why_model_is_right=data["why_model_is_right"].strip(), path=path,
        )
    except (TypeError, AttributeError) as e:  # a list where a string belongs, or the other way round
        raise KhoConformError(f"{path}: a value has the wrong type ({e}); fix or remove it") from None


@lru_cache(maxsize=None)
def load_known(directory: Path | None = None) -> tuple[KnownFinding, ...]:
    """Every record of ``directory`` (default: the corpus's known/)."""
    return tuple(_record(path) for path in sorted((directory or known_dir()).glob("*.toml")))


def by_id(known_id: str) -> KnownFinding | None:
    return next((k for k in load_known() if k.id == known_id), None)


@dataclass(frozen=True)
class Verdict:
    status: str  # "pass" | "known" | "fail"
    divergence: Divergence | None = None  # the first new divergence (fail), else the first (known); None: pass
    known: tuple[KnownFinding, ...] = ()  # the findings proven to cause what diverged
    new: tuple[Divergence, ...] = ()  # what no known finding explains
    quirks: frozenset[str] = field(default_factory=frozenset)  # the quirks the proof needed

    @property
    def known_ids(self) -> str:
        return ",".join(k.id for k in self.known)


def _by_site(d: Divergence) -> bool:
    return bool(d.site)


def triage(cmp: Comparison, target: Target, *, attribute: bool = True) -> Verdict:
    """The verdict on one comparison of ``target``'s kernel with the model.
    ``attribute=False`` decides only new or not (what fuzzing needs): the
    quirks are not narrowed down to the ones the agreement needs, so the
    verdict names only the findings matched by a sanitizer site."""
    if cmp.ok:
        return Verdict("pass")
    findings = [k for k in load_known() if k.affects(target.build.source.release)]
    owners = {site: k for k in findings for site in k.sites}
    reported = [d for d in cmp.divergences if _by_site(d)]
    new = [d for d in reported if d.site not in owners]
    credited = {owners[d.site].id: owners[d.site] for d in reported if d.site in owners}

    used: frozenset[str] = frozenset()
    if any(not _by_site(d) for d in cmp.divergences):
        available = frozenset(q for k in findings for q in k.quirks)

        def remaining(quirks: frozenset[str]) -> list[Divergence]:
            c = compare(cmp.program, target, quirks=quirks, again=cmp)
            return [d for d in c.divergences if not _by_site(d)]

        rest = remaining(available) if available else [d for d in cmp.divergences if not _by_site(d)]
        if rest:
            new += rest
        elif attribute:
            used = available
            for quirk in sorted(available):  # keep only the quirks the agreement needs
                if not remaining(used - {quirk}):
                    used -= {quirk}
            credited.update((k.id, k) for k in findings if set(k.quirks) & used)
    new.sort(key=lambda d: -1 if d.op_index is None else d.op_index)
    known = tuple(credited.values())
    if new:
        return Verdict("fail", new[0], known, tuple(new), used)
    return Verdict("known", cmp.first, known, (), used)
