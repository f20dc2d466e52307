"""Known findings: kernel bugs (and documentation slips) that kho-conform has
triaged, described in ``corpus/known/<id>.toml``. A program whose first
divergence has a signature a known finding lists, on a kernel version it
affects, is reported as known rather than as a new failure (what follows the
first divergence is its consequence); once the kernel fixes it, the
divergence must disappear on the fixed versions.

A model or shim bug is never recorded here: it is fixed.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import KhoConformError

KNOWN_DIR = Path(__file__).resolve().parent.parent / "corpus" / "known"


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
        # A developer's tree is "local-7.3.4": its release number is what counts.
        m = re.search(r"\d+(\.\d+)+", version)
        version = m.group(0) if m else version
        if not any(version == a or version.startswith(a + ".") for a in self.affected):
            return False
        return not self.fixed_in or _version_key(version) < _version_key(self.fixed_in)


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


@lru_cache(maxsize=None)
def load_known(directory: Path = KNOWN_DIR) -> tuple[KnownFinding, ...]:
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
        except (tomllib.TOMLDecodeError, KeyError) as e:
            raise KhoConformError(f"{path}: not a valid known-finding record ({e}); fix or remove it") from None
    return tuple(found)


def is_known(divergence, version: str) -> KnownFinding | None:
    """The known finding that explains this divergence on this version, if any."""
    for known in load_known():
        if not known.affects(version):
            continue
        if divergence.signature in known.signatures or any(_matches(rule, divergence) for rule in known.rules):
            return known
    return None


def _matches(rule: dict[str, str], divergence) -> bool:
    return all(re.fullmatch(pattern, str(getattr(divergence, key, "")), re.S) for key, pattern in rule.items())


def by_id(known_id: str) -> KnownFinding | None:
    return next((k for k in load_known() if k.id == known_id), None)
