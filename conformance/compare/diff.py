"""The differential engine: one program on the reference model and on the
kernel's C code; every difference becomes a ``Divergence`` record.

Compared: per op the return code, values and
warning count; the old kernel's canonical tree, raw node pages and FDT bytes
(at kexec, or at the end); the next kernel's restored map; what ended a run
early (a fault, a timeout, a BUG: the model may predict one under a quirk);
and every sanitizer report, which ends nothing, so everything after it is
compared too. Handover is also checked across implementations: the C image
restored by the model, and the model image restored by the C code.

The model runs with the quirks it is given (none: the specification), the
next kernel's own when it is another version's (a ``Pair``); the kernel's
own outcome may be passed in, so that triage can hold it to the model under
several quirk sets without running the kernel again.

All of it is compared first in one equality test; the field-by-field diff
runs only when that fails.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field, fields, replace

from reference import model, shortcuts
from reference.outcome import EINVAL, Image, NextBoot, OpResult, Outcome
from reference.program import NOT_RUN, Header, Op, Program, Step

from ..native.contract import pack_image
from .target import Pair, Target

MAX_SHOWN = 240  # characters of expected/actual kept in a record


@dataclass(frozen=True)
class Divergence:
    check: str  # ops | boot | tree | node_pages | fdt | next | events | sanitizer | handover:c-image | handover:model-image
    op_index: int | None  # first op where the two differ (None: before any op)
    op: str  # that op in the text form
    field: str
    expected: str  # the model
    actual: str  # the kernel's C code
    signature: str  # for de-duplication: stable across values and positions
    site: tuple[str, str, str] | None = None  # a sanitizer report's (kind, function, line hash)

    def to_json(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        where = f"op {self.op_index} ({self.op})" if self.op_index is not None else "boot"
        return f"[{self.check}] {where}: {self.field}: model {self.expected} != kernel {self.actual}"


def _short(x: object) -> str:
    s = x.hex() if isinstance(x, bytes) else repr(x)
    return s if len(s) <= MAX_SHOWN else s[: MAX_SHOWN - 3] + "..."


_NUMBERS = re.compile(r"0x[0-9a-f]+|\d+")


def _signature(check: str, field_name: str, op: Step | None, expected: object, actual: object) -> str:
    """What kind of difference this is, without the values that vary between
    inputs: check, field (indices dropped), op kind, and for return codes the
    two codes themselves (a -ENOMEM vs 0 is another bug than -EINVAL vs 0)."""
    kind = op.op.name if op is not None else "-"
    # State fields are named by position (tree path, page, byte offset), which
    # depends on the page shift: the field's kind is what identifies a bug.
    if check in ("tree", "node_pages", "fdt"):
        field_name = field_name.split("[", 1)[0]
    detail = ""
    if field_name in ("rc", "accepted"):
        detail = f"{expected}->{actual}"
    elif field_name in ("value", "value2") and isinstance(expected, int) and isinstance(actual, int):
        detail = "kernel-less" if actual < expected else "kernel-more"  # e.g. fewer pages restored
    elif check == "events":
        detail = _NUMBERS.sub("#", str(actual))
    elif check == "sanitizer":
        detail = str(actual)  # the site: kind, function, line-text hash
    elif check == "tree":
        detail = _tree_difference(expected, actual)
    text = "|".join((check, _NUMBERS.sub("#", field_name), kind, detail))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _tree_difference(expected: object, actual: object) -> str:
    """How two versions of one tree node differ: a missing node, or slots or
    bits the kernel has in excess or lacks (a missed split and a lost key
    are different bugs, though both show at the same op)."""
    if expected is None or actual is None:
        return "node-missing-in-kernel" if actual is None else "node-extra-in-kernel"
    (_, level, want), (_, _, got) = expected, actual
    extra, missing = bool(set(got) - set(want)), bool(set(want) - set(got))
    kind = "leaf-bits" if level == 0 else "table-slots"
    return f"{kind}:{'extra' if extra else ''}{'+' if extra and missing else ''}{'missing' if missing else ''}"


@dataclass
class NativeRuns:
    """The kernel's runs a comparison needed besides the program itself, kept
    so that comparing the same program again (triage, under other quirks)
    runs the kernel only on what it has not seen: its restore of an image,
    and its old-kernel state after a prefix of the program."""

    restores: dict[bytes, Outcome] = field(default_factory=dict)  # packed image + steps -> outcome
    prefixes: dict[int, dict] = field(default_factory=dict)  # prefix length -> old-kernel view
    own: tuple[Image, tuple[Step, ...], Outcome] | None = None  # the program's own next kernel (see ``ran``)

    def restore(self, target: Target | Pair, image: Image, header: Header, steps: tuple[Step, ...]) -> Outcome:
        if self.own is not None and self.own[1] == steps and self.own[0] == image:
            return self.own[2]
        packed = pack_image(image, 1 << header.page_shift)
        h = hashlib.blake2b(packed, digest_size=16)
        h.update(repr(steps).encode())
        key = h.digest()
        if key not in self.restores:
            self.restores[key] = target.next.native.restore_packed(packed, header, steps)
        return self.restores[key]

    def ran(self, image: Image, steps: tuple[Step, ...], outcome: Outcome) -> None:
        """The next kernel's restore of ``image`` that the program's own run
        made: the same call, so the same outcome, as ``restore`` would get
        for an equal image."""
        self.own = (image, steps, outcome)

    def old_view(self, target: Target | Pair, prefix: Program) -> dict:
        if len(prefix.steps) not in self.prefixes:
            self.prefixes[len(prefix.steps)] = _old_view(target.old.run(prefix))
        return self.prefixes[len(prefix.steps)]


@dataclass
class Comparison:
    program: Program
    model: Outcome
    kernel: Outcome
    divergences: list[Divergence] = field(default_factory=list)
    quirks: frozenset[str] = frozenset()  # the model's old kernel's
    next_quirks: frozenset[str] = frozenset()  # the model's next kernel's
    native: NativeRuns = field(default_factory=NativeRuns)
    # False: a state divergence (tree, node pages, FDT) is placed at the last
    # op before the state was taken, not at the op that caused it (see compare).
    located: bool = True

    @property
    def ok(self) -> bool:
        return not self.divergences

    @property
    def first(self) -> Divergence | None:
        return self.divergences[0] if self.divergences else None


_OP_FIELDS = ("rc", "value", "value2", "warnings", "pages")


def _op_view(r: OpResult) -> tuple:
    return (r.rc, r.value, r.value2, len(r.warnings), r.pages)


# What a next kernel's boot is compared by: all but the refusal's wording and the model's own foresight.
_NEXT_FIELDS = tuple(f.name for f in fields(NextBoot) if f.name not in ("reason", "may_time_out"))


def _next_view(n: NextBoot | None) -> dict | None:
    """What a next kernel's boot is compared by (read only: views are kept)."""
    if n is None:
        return None
    # A comparison asks for the same boots' views up to six times, and a boot
    # of 10^5 blocks takes milliseconds to sort: kept per object (immutable)
    # for one comparison, the entry holding the object so that its id is not reused.
    kept = _NEXT_VIEWS.get(id(n))
    if kept is not None and kept[0] is n:
        return kept[1]
    view = {name: getattr(n, name) for name in _NEXT_FIELDS}
    # Order of magic reads and phantom touches is an artefact of who reads
    # the struct pages; the set is the contract.
    view["magic"] = tuple(sorted(set(n.magic)))
    view["phantom"] = tuple(sorted(set(n.phantom)))
    _NEXT_VIEWS[id(n)] = (n, view)
    return view


_NEXT_VIEWS: dict[int, tuple[NextBoot, dict]] = {}  # emptied as each comparison starts


def _state(o: Outcome, name: str) -> object:
    """One field of the old kernel's state, exactly (node pages as words)."""
    return tuple(n.canonical() for n in o.tree) if name == "tree" else getattr(o, name)


def _old_view(o: Outcome) -> dict:
    """The old kernel's state, its node pages hashed: the bisection keeps
    one per prefix of the program."""
    return {
        "tree": _state(o, "tree"),
        "node_pages": {p: hashlib.blake2b(o.node_pages[p], digest_size=8).hexdigest() for p in o.node_pages},
        "fdt": o.fdt.hex(),
    }


def _event_kind(event: str) -> str:
    """What ended a run, without the details only the kernel's side has
    (addresses, code locations): "fault", "timeout", "BUG"."""
    return event.split(":", 1)[0].split(" ", 1)[0]


def _events_view(o: Outcome) -> tuple:
    return tuple((_event_kind(e), at) for e, at in zip(o.events, o.event_ops))[:1]


def _view(o: Outcome) -> dict:
    """Everything compared, for one equality test: equal views, no
    divergence (``_diff`` compares the same fields). The state is held as
    it is (node pages as words), not hashed: equal is exact and cheaper."""
    return {
        "boot": _op_view(o.boot), "ops": [_op_view(r) for r in o.ops],
        "tree": _state(o, "tree"), "node_pages": o.node_pages, "fdt": o.fdt,
        "next": _next_view(o.next), "events": _events_view(o), "reports": [r.site for r in o.reports],
    }


def compare(program: Program, target: Target | Pair, *, quirks: frozenset[str] = frozenset(),
            next_quirks: frozenset[str] | None = None, again: Comparison | None = None,
            handover: bool = True, locate: bool = True) -> Comparison:
    """Run both implementations on ``program`` (the model's old kernel with
    ``quirks``, its next kernel with ``next_quirks``, by default the same)
    and list where they differ, first divergence first. ``again``: an
    earlier comparison of the same program, whose kernel runs are reused.
    ``locate=False`` skips bisecting for the op that caused a state
    divergence, which runs both sides on prefixes of the program: whether
    the two differ, and in what, is the same either way."""
    next_quirks = quirks if next_quirks is None else next_quirks
    _NEXT_VIEWS.clear()
    expected = model.run(program, target.old.profile, quirks, next_profile=target.next.profile, next_quirks=next_quirks)
    if again is not None:
        actual, native = again.kernel, again.native
    else:
        native = NativeRuns()
        actual, handed = target.old.native.run_parts(program, target.next.native, like=expected)
        if handed is not None and shortcuts.ENABLED:  # the model's image, when equal, is not restored again
            native.ran(actual.image, program.steps[program.kexec_index() + 1 :], handed)
    cmp = Comparison(program, expected, actual, quirks=quirks, next_quirks=next_quirks, native=native, located=locate)
    if _view(expected) != _view(actual):
        cmp.divergences += _diff(program, expected, actual, target, cmp)
    if handover:
        cmp.divergences += _cross_handover(program, expected, actual, target, cmp)
    cmp.divergences.sort(key=lambda d: (d.op_index if d.op_index is not None else -1))
    return cmp


def _steps_after_kexec(program: Program) -> tuple[int, tuple[Step, ...]] | None:
    k = program.kexec_index()
    return None if k is None else (k, program.steps[k + 1 :])


def _diff(program: Program, exp: Outcome, act: Outcome, target: Target | Pair, cmp: Comparison) -> list[Divergence]:
    out: list[Divergence] = []
    steps = program.steps

    def add(check: str, index: int | None, field_name: str, e: object, a: object) -> None:
        step = steps[index] if index is not None and index < len(steps) else None
        out.append(Divergence(check, index, step.text() if step else "", field_name, _short(e), _short(a),
                              _signature(check, field_name, step, e, a)))  # e, a: the values themselves

    for r in act.reports:  # undefined behaviour has no model: every report is a divergence
        add("sanitizer", r.op, r.kind, "no report", r.where() + (f": {r.detail}" if r.detail else ""))
        out[-1] = replace(out[-1], signature=_signature("sanitizer", r.kind, None, "", r.site), site=r.site)
    for name, e, a in zip(_OP_FIELDS, _op_view(exp.boot), _op_view(act.boot)):
        if e != a:
            add("boot", None, name, e, a)
    cut = _events_view(act) or _events_view(exp)
    foreseen = bool(cut) and cut[0][0] == "timeout" and _may_time_out(program, exp, cut[0][1])
    if _events_view(exp) != _events_view(act) and not foreseen:
        # What ended a run early is the divergence; the op it cut short and
        # the ones after it never ran. Expected: the model's answer for that op.
        at = cut[0][1]
        want = exp.events[0] if exp.events else _op_view(exp.boot if at is None else exp.ops[at])
        add("events", at, "event", want, act.events[0] if act.events else "no event")
    voided = {r.op for r in act.reports if r.ended_op}
    for i, (re_, ra) in enumerate(zip(exp.ops, act.ops)):
        if cut and (ra.rc == NOT_RUN or re_.rc == NOT_RUN):
            break
        if i in voided:
            continue
        for name, e, a in zip(_OP_FIELDS, _op_view(re_), _op_view(ra)):
            if e != a:
                add("ops", i, name, e, a)
                break
        else:
            continue
        break  # later ops usually differ because of this one: keep the first
    if cut and (act.image is None or exp.image is None):
        return out  # cut short in the old kernel: no state at kexec to compare
    kexec = program.kexec_index()
    state_at = kexec if kexec is not None else len(steps) - 1
    for name in ("tree", "node_pages", "fdt"):
        if _state(exp, name) != _state(act, name):
            e, a = _first_difference(name, exp, act)
            add(name, _first_state_op(program, target, name, state_at, cmp) if cmp.located else state_at, e[0], e[1], a)
    en, an = _next_view(exp.next), _next_view(act.next)
    if en != an and kexec is not None and not cut:  # an event cut the next kernel short
        for key in (en or an):  # NextBoot's field order: deterministic
            e = (en or {}).get(key)
            a = (an or {}).get(key)
            if e != a:
                add("next", kexec, key, e, a)
                break
    return out


def _may_time_out(program: Program, exp: Outcome, at: int | None) -> bool:
    """The model foresaw that op ``at`` (the kexec: the next kernel's boot)
    may outlast the kernel's CPU budget."""
    if at is None:
        return False
    if at == program.kexec_index():
        return exp.next is not None and exp.next.may_time_out
    return at < len(exp.ops) and exp.ops[at].may_time_out


def _first_difference(name: str, exp: Outcome, act: Outcome) -> tuple[tuple[str, object], object]:
    """The first differing element of a state field, for the record."""
    if name == "fdt":
        for i, (x, y) in enumerate(zip(exp.fdt, act.fdt)):
            if x != y:
                return (f"fdt[{i:#x}]", exp.fdt[i : i + 16]), act.fdt[i : i + 16]
        return ("fdt.length", len(exp.fdt)), len(act.fdt)
    if name == "tree":
        et = {n.path: n.canonical() for n in exp.tree}
        at = {n.path: n.canonical() for n in act.tree}
        for path in sorted(et.keys() | at.keys()):
            if et.get(path) != at.get(path):
                return (f"tree{list(path)}", et.get(path)), at.get(path)
    for phys in sorted(exp.node_pages.keys() | act.node_pages.keys()):
        e, a = exp.node_pages.get(phys), act.node_pages.get(phys)
        if e != a:
            if e is None or a is None:
                return (f"node_pages[{phys:#x}]", e is not None), a is not None
            i = next(i for i in range(len(e)) if e[i] != a[i])
            return (f"node_pages[{phys:#x}][{i:#x}]", e[i & ~7 : (i & ~7) + 8]), a[i & ~7 : (i & ~7) + 8]
    return (name, "?"), "?"


def _first_state_op(program: Program, target: Target | Pair, name: str, last: int, cmp: Comparison) -> int | None:
    """The first op after which the old kernel's state differs: bisect on
    prefixes of the program (only run on a mismatch)."""
    steps = program.steps[: last + 1]

    def differs(k: int) -> bool:
        prefix = Program(program.header, tuple(s for s in steps[:k] if s.op != Op.KEXEC))
        return _old_view(model.run(prefix, target.old.profile, cmp.quirks))[name] != cmp.native.old_view(target, prefix)[name]

    if differs(0):
        return None
    lo, hi = 0, len(steps)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if differs(mid) else (mid, hi)
    return hi - 1


def _cross_handover(program: Program, exp: Outcome, act: Outcome, target: Target | Pair,
                    cmp: Comparison) -> list[Divergence]:
    """Each next kernel restores the other implementation's image."""
    after = _steps_after_kexec(program)
    if after is None or exp.image is None or act.image is None or exp.events:
        return []
    k, steps = after
    out = []
    h = program.header
    if not act.events:  # a kernel run cut short has no next-kernel answer to hold the model's against
        if shortcuts.ENABLED and act.image == exp.image:
            # The model's next kernel on an equal image: model.run already ran it (a pure function).
            m_next, m_ops = exp.next, list(exp.ops[k + 1 :])
        else:
            m_next, m_ops = model.restore(act.image, steps, h, target.next.profile, cmp.next_quirks)
        m_kexec = OpResult(0 if m_next.accepted else -EINVAL)
        out += _next_diff("handover:c-image", program, k, act.next, act.ops[k:], m_next, [m_kexec, *m_ops], swap=True)
    c = cmp.native.restore(target, exp.image, h, steps)
    for r in c.reports:  # the foreign run's op 0 is the kexec
        at = k + (r.op or 0)
        out.append(Divergence("handover:model-image", at, program.steps[at].text(), r.kind, "no report", _short(r.where()),
                              _signature("sanitizer", r.kind, None, "", r.site), r.site))
    at = k + (c.event_ops[0] or 0) if c.events else k
    if c.events and _event_kind(c.events[0]) == "timeout" and _may_time_out(program, exp, at):
        pass  # an op the model foresaw could outlast the CPU budget
    elif c.events:  # the event is the answer; what it cut short is not
        step = program.steps[at]
        out.append(Divergence("handover:model-image", at, step.text(), "event", "()", _short(c.events[0]),
                              _signature("events", "event", step, (), c.events[0])))
    else:
        out += _next_diff("handover:model-image", program, k, exp.next, exp.ops[k:], c.next, list(c.ops), swap=False)
    return out


def _next_diff(check: str, program: Program, k: int, ref_next: NextBoot | None, ref_ops, other_next: NextBoot | None,
               other_ops, swap: bool) -> list[Divergence]:
    """Compare a next kernel run on a foreign image (``other``) with the
    image owner's own next kernel (``ref``). Expected is always the model."""
    rv, ov = _next_view(ref_next), _next_view(other_next)
    pairs = [(rv, ov, "next")] + [(_op_view(r), _op_view(o), f"ops[{i}]") for i, (r, o) in enumerate(zip(ref_ops, other_ops))]
    for i, (r, o, name) in enumerate(pairs):
        if r == o:
            continue
        e, a = (o, r) if swap else (r, o)  # the model is "expected"
        index = k + max(i - 1, 0)
        step = program.steps[index]
        field_name = name
        if isinstance(r, dict) and isinstance(o, dict):
            field_name = next(key for key in r if r[key] != o.get(key))
            e, a = (o[field_name], r[field_name]) if swap else (r[field_name], o[field_name])
        return [Divergence(check, index, step.text(), field_name, _short(e), _short(a),
                           _signature(check, field_name, step, e, a))]
    return []
