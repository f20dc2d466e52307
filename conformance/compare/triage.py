"""Triage: the one policy that says whether a comparison is a pass, a known
finding, or a new failure. Used by check, fuzz, the state machine, replay
and the corpus tests alike.

Known findings are kernel bugs (and documentation slips) described in
``corpus/known/<id>.toml``; once the kernel fixes one, its divergence must
disappear on the fixed versions. A model or shim bug is never recorded
there: it is fixed.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..corpus import known_dir
from ..errors import KhoConformError
from .diff import Comparison, Divergence


@dataclass(frozen=True)
class KnownFinding:
    id: str
    title: str
    kind: str  # "kernel-bug" | "kernel-limitation" | "documentation"
    signatures: tuple[str, ...]
    # Rules for divergences whose signature varies with the input (which op,
    # which sanitizer check): each a dict of Divergence attribute -> regex,
    # all of which must match in full.
    rules: tuple[dict[str, str], ...]
    affected: tuple[str, ...]  # version prefixes, e.g. ("7.1",) or ("7.1", "7.2", "7.3")
    fixed_in: str  # first fixed version, "" while unfixed
    description: str
    why_model_is_right: str
    path: Path

    def affects(self, version: str) -> bool:
        """``version``: a release number ("7.3.4"; KernelSource.release)."""
        m = re.search(r"\d+(\.\d+)+", version)
        version = m.group(0) if m else version
        if not any(version == a or version.startswith(a + ".") for a in self.affected):
            return False
        return not self.fixed_in or _version_key(version) < _version_key(self.fixed_in)


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


@lru_cache(maxsize=None)
def load_known(directory: Path | None = None) -> tuple[KnownFinding, ...]:
    directory = directory or known_dir()
    found = []
    for path in sorted(directory.glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text())
            found.append(KnownFinding(
                id=data["id"], title=data["title"], kind=data["kind"], signatures=tuple(data.get("signatures", ())),
                rules=tuple(data.get("match", ())),
                affected=tuple(data["affected"]), fixed_in=data.get("fixed_in", ""),
                description=data["description"].strip(), why_model_is_right=data["why_model_is_right"].strip(), path=path,
            ))
        except (KeyError, TypeError, AttributeError, ValueError) as e:  # ValueError: TOMLDecodeError, with the line
            problem = f"no key {e}" if isinstance(e, KeyError) else str(e)
            raise KhoConformError(f"{path}: not a valid known-finding record ({problem}); fix or remove it") from None
    return tuple(found)


def known_finding(divergence: Divergence, version: str) -> KnownFinding | None:
    """The known finding whose signatures or rules match this divergence on
    this version, if any."""
    for known in load_known():
        if not known.affects(version):
            continue
        if divergence.signature in known.signatures or any(_matches(rule, divergence) for rule in known.rules):
            return known
    return None


@dataclass(frozen=True)
class Verdict:
    status: str  # "pass" | "known" | "fail"
    divergence: Divergence | None = None  # the divergence the verdict is about (None: pass)
    known: tuple[KnownFinding, ...] = ()  # the findings that explain it


def triage(cmp: Comparison, version: str) -> Verdict:
    """The verdict on one comparison: pass when nothing diverges, known when
    a known finding explains the first divergence (what follows it is taken
    for its consequence), fail otherwise."""
    if cmp.ok:
        return Verdict("pass")
    known = known_finding(cmp.first, version)
    return Verdict("known", cmp.first, (known,)) if known else Verdict("fail", cmp.first)


def _matches(rule: dict[str, str], divergence) -> bool:
    return all(re.fullmatch(pattern, str(getattr(divergence, key, "")), re.S) for key, pattern in rule.items())


def by_id(known_id: str) -> KnownFinding | None:
    return next((k for k in load_known() if k.id == known_id), None)
