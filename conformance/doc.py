"""Documentation against code, per kernel version: every compatible string,
FDT property, node and entry name, ABI constant and macro that the KHO
documentation shows, held to the code's definitions, one named check per
item (the "doc" family of the report).

Where the documentation is read:
- the kernel-doc comments (``/** ... */``) of ``include/linux/kho/abi/*.h``,
  which ``Documentation/core-api/kho/*.rst`` render: FDT overviews
  (``compatible = "...";``, ``name = <...>;``, ``node {``), property lists
  (``- name: u64``), named KHO entries and subtrees, macros a comment names
  (``..._COMPATIBLE``, a kernel-doc'd macro and what it is "defined as"), and
  the radix tree's figures at the page size the text states (depth, root
  level, order-bit positions, pfn bits, the key diagram's bit fields);
- the ``.. kernel-doc::`` directives of the rst files: each names a file the
  suite reads (others are outside its files and not checked) and a ``DOC:``
  section it must hold.

What the code defines: ``#define``s of the files the suite reads, and the
radix tree's constants as a build of the tree computes them
(``NativeKernel.abi_constants``, ``encode_key``).

A compatible string is matched to the definition of the same name without
its version (``kho-v3`` to ``KHO_FDT_COMPATIBLE "kho-v4"``); a name to the
definition with that value, or, failing that, a string its own header
defines sharing a word with it (a renamed property); a name nothing comes
near is an example or defined in code the suite does not read, and its
check is skipped, saying so. Known
documentation slips are ``corpus/known/`` records of kind "documentation"
listing the checks they explain (``doc_checks``). Reports name constants and
names, never quote the documentation's text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .compare.triage import known_doc_slip
from .native.binding import NativeKernel
from .native.build import build
from .report import CheckResult
from .source import KernelSource
from .source.tree_files import ABI_HEADER, needed_files

ABI_DIR = "include/linux/kho/abi"
DOC_DIR = "Documentation/core-api/kho"
DOC_PAGE_SHIFT = 12  # the page size the radix tree's figures are given for, unless the text says otherwise


@dataclass(frozen=True)
class Shown:
    """One thing the documentation shows."""

    check: str  # the check's name: doc.compatible, doc.prop.blob-size, doc.luo.compatible.luo-session, ...
    kind: str  # compatible | property | node | entry | reference | constant | figure | section
    value: str  # as the documentation shows it
    where: str  # file:line
    code_name: str = ""  # what the code calls it, where the documentation says: a macro, a figure (Constants' key)
    page_shift: int = 0  # a figure's page shift


@dataclass(frozen=True)
class Definition:
    name: str
    value: str  # a string literal's contents, else the macro's text
    literal: bool  # a string literal
    file: str
    line: int


# ---- reading the tree ---------------------------------------------------------------


def kernel_doc(text: str) -> Iterator[tuple[int, list[str]]]:
    """(first line number, lines without the comment's `` * `` margin) of
    every kernel-doc comment."""
    for m in re.finditer(r"/\*\*(.*?)\*/", text, re.S):
        first = text.count("\n", 0, m.start()) + 1
        yield first, [re.sub(r"^\s*\*? ?", "", line) for line in m.group(1).split("\n")]


def definitions(root: Path) -> dict[str, Definition]:
    """Every ``#define`` of the C files the suite reads, by name."""
    out: dict[str, Definition] = {}
    for rel in needed_files(root):
        if not rel.endswith((".h", ".c")) or rel.startswith("scripts/"):
            continue
        text = (root / rel).read_text(errors="replace")
        for m in re.finditer(r"^[ \t]*#[ \t]*define[ \t]+(\w+)(?!\()[ \t]*((?:.*\\\n)*.*)$", text, re.M):
            body = re.sub(r"\\\n", " ", m.group(2)).split("/*")[0].strip()
            literal = re.fullmatch(r'"([^"]*)"', body)
            line = text.count("\n", 0, m.start()) + 1
            out.setdefault(m.group(1), Definition(m.group(1), literal.group(1) if literal else body, bool(literal), rel, line))
    return out


def _abi_name(rel: str) -> str:
    """The check-name part for an ABI header: "" for the core KHO header."""
    return "" if rel == ABI_HEADER else Path(rel).stem.replace("_", "-") + "."


def _stem(compatible: str) -> str:
    return re.sub(r"-v\d+$", "", compatible)


_DTS_NODE = re.compile(r"^\s*(/|[\w.,@-]+)\s*\{\s*$")
_DTS_PROP = re.compile(r"^\s*([\w.,#-]+)\s*=\s*(.+?);\s*$")
_BULLET = re.compile(r"^\s*-\s+([\w.,#-]+):\s*(\S.*?)\s*$")
_ENTRY = re.compile(r'KHO\s+entry\s+named\s+"([\w.-]+)"|[Tt]he\s+"([\w.-]+)"\s+subtree')
_COMPATIBLE_REF = re.compile(r"\b([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*_COMPATIBLE)\b")
_MACRO_DOC = re.compile(r"([A-Z][A-Z0-9_]+)\s+-\s")
_DEFINED_AS = re.compile(r"defined\s+as\s+`?([A-Za-z_]\w*)`?")


def _matches(pattern: re.Pattern[str], body: str, rel: str, first: int) -> Iterator[tuple[re.Match[str], str]]:
    """Matches of ``pattern`` in a comment's text (across lines), each with
    its file:line."""
    for m in pattern.finditer(body):
        yield m, f"{rel}:{first + body.count(chr(10), 0, m.start())}"


def _header_items(rel: str, text: str) -> Iterator[Shown]:
    abi = _abi_name(rel)
    for first, lines in kernel_doc(text):
        body = "\n".join(lines)
        for m, where in _matches(_ENTRY, body, rel, first):
            name = m.group(1) or m.group(2)
            yield Shown(f"doc.{abi}entry.{name}", "entry", name, where)
        for m, where in _matches(_COMPATIBLE_REF, body, rel, first):
            yield Shown(f"doc.{abi}ref.{m.group(1)}", "reference", m.group(1), where)
        # A kernel-doc'd macro ("NAME - what it is"), and what it is "defined as".
        head = body.lstrip()
        if m := _MACRO_DOC.match(head):
            where = f"{rel}:{first + body.count(chr(10), 0, len(body) - len(head))}"
            yield Shown(f"doc.{abi}ref.{m.group(1)}", "reference", m.group(1), where)
            for d, at in _matches(_DEFINED_AS, body, rel, first):
                yield Shown(f"doc.{abi}const.{m.group(1)}", "constant", d.group(1), at, code_name=m.group(1))
        for i, line in enumerate(lines):
            where = f"{rel}:{first + i}"
            if m := _DTS_NODE.match(line):
                if m.group(1) != "/" and not m.group(1).startswith("<"):
                    yield Shown(f"doc.{abi}node.{m.group(1)}", "node", m.group(1), where)
                continue
            m = _DTS_PROP.match(line) or _BULLET.match(line)
            if m:
                name, value = m.groups()
                if name == "compatible":
                    compat = value.strip('"')
                    check = "doc.compatible" if not abi else f"doc.{abi}compatible.{_stem(compat)}"
                    yield Shown(check, "compatible", compat, where)
                elif m.re is _DTS_PROP or re.fullmatch(r"u\d+|<.*>", value):
                    yield Shown(f"doc.{abi}prop.{name}", "property", name, where)
        if "radix tree" in body:
            yield from _tree_figures(rel, first, lines, body)


_FIGURES = (  # (figure, pattern whose last group is the value)
    ("depth", re.compile(r"\b(\d+)-level\s+hierarchy")),
    ("order-bit.0", re.compile(r"order\s+bit\s+is\s+set\s+at\s+position\s+(\d+)")),
    ("pfn-bits", re.compile(r"shifted\s+physical\s+address\s+\(for\s+order\s+0\)\s+is\s+(\d+)\s+bits")),
)
_ORDER_ROW = re.compile(r"^\s*\|\s*(\d+)\s*\|.*\(at bit (\d+)\)", re.M)
_LEVEL = re.compile(r"^\s*\|\s*Level (\d+)\s*\|", re.M)


def _tree_figures(rel: str, first: int, lines: list[str], body: str) -> Iterator[Shown]:
    """The radix tree's figures a kernel-doc comment gives, at the page size
    it states: the check names carry that page shift."""
    ps = int(m.group(1)) if (m := re.search(r"PAGE_SHIFT\s*=\s*(\d+)", body)) else DOC_PAGE_SHIFT

    def figure(name: str, value: str, where: str) -> Shown:
        return Shown(f"doc.const.{name}.ps{ps}", "figure", value, where, code_name=name, page_shift=ps)

    for name, pattern in _FIGURES:
        for m, where in _matches(pattern, body, rel, first):
            yield figure(name, m.group(1), where)
    for m, where in _matches(_ORDER_ROW, body, rel, first):
        yield figure(f"order-bit.{m.group(1)}", m.group(2), where)
    levels = list(_matches(_LEVEL, body, rel, first))
    if levels:  # the tree diagram: its top level is the root's
        top, where = max(levels, key=lambda mw: int(mw[0].group(1)))
        yield figure("root-level", top.group(1), where)
    # The key diagram: a row of bit fields ("63:60  59:51 ... 14:0") over a
    # row of labels ("| 0 | Lv 5 | ... | Lv 0 (bitmap) |").
    for i, line in enumerate(lines[:-2]):
        fields = re.findall(r"(\d+):(\d+)", line)
        labels = re.findall(r"\|\s*([^|]+?)\s*(?=\|)", lines[i + 2]) if len(fields) > 2 else []
        if len(labels) != len(fields):
            continue
        for (hi, lo), label in zip(fields, labels):
            if m := re.fullmatch(r"Lv (\d+)( \(bitmap\))?", label):
                name = "bitmap-bits" if m.group(2) else f"table-bits.lv{m.group(1)}"
                yield figure(name, str(int(hi) - int(lo) + 1), f"{rel}:{first + i}")


def _rst_items(rel: str, text: str, read: set[str]) -> Iterator[Shown]:
    """``.. kernel-doc:: FILE`` with ``:doc: TITLE``: the file must hold that
    ``DOC:`` section (files the suite does not read are not checked)."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        m = re.match(r"\s*\.\.\s+kernel-doc::\s+(\S+)", line)
        if not m or m.group(1) not in read:
            continue
        title = next((t.group(1).strip() for t in (re.match(r"\s+:doc:\s+(.+)", x) for x in lines[i + 1 : i + 4]) if t), None)
        if title:
            slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
            yield Shown(f"doc.section.{Path(m.group(1)).name}:{slug}", "section", f"{m.group(1)}: {title}",
                        f"{rel}:{i + 1}")


def shown(root: Path) -> list[Shown]:
    """What the documentation of the tree at ``root`` shows, in reading order."""
    read = set(needed_files(root))
    out: list[Shown] = []
    for rel in sorted(r for r in read if r.startswith(ABI_DIR + "/") and r.endswith(".h")):
        out += _header_items(rel, (root / rel).read_text(errors="replace"))
    for rel in sorted(r for r in read if r.startswith(DOC_DIR + "/") and r.endswith(".rst")):
        out += _rst_items(rel, (root / rel).read_text(errors="replace"), read)
    return out


# ---- holding it to the code ------------------------------------------------------------

Constants = Callable[[int], dict[str, int]]  # page shift -> the code's radix tree figures


def code_constants(source: KernelSource) -> Constants:
    """The radix tree's figures as a (plain) build of ``source`` computes them."""
    cache: dict[int, dict[str, int]] = {}

    def at(page_shift: int) -> dict[str, int]:
        if page_shift not in cache:
            native = NativeKernel(build(source, page_shift, "plain"))
            c = native.abi_constants()
            figures = {"depth": c["depth"], "root-level": c["depth"] - 1, "pfn-bits": c["key_width"] - 1,
                       "bitmap-bits": c["bitmap_log2"]}
            figures |= {f"table-bits.lv{level}": c["table_log2"] for level in range(1, c["depth"])}
            figures |= {f"order-bit.{order}": native.encode_key(0, order).bit_length() - 1
                        for order in range(64 - page_shift)}
            cache[page_shift] = figures
        return cache[page_shift]

    return at


def _words(name: str) -> set[str]:
    return {w for w in re.split(r"[^a-z0-9]+", name.lower()) if len(w) >= 3 and not re.fullmatch(r"v\d+", w)}


def _compare(item: Shown, defs: dict[str, Definition], constants: Constants) -> tuple[str, str, str]:
    """(status: pass, fail or skipped; what the code has; its name) for one item."""
    if item.kind == "compatible":
        same = [d for d in defs.values() if "COMPATIBLE" in d.name and _stem(d.value) == _stem(item.value)]
        d = next((d for d in same if d.value == item.value), same[0] if same else None)
        if d is None:
            return "skipped", "", ""
        return ("pass" if d.value == item.value else "fail"), d.value, d.name
    if item.kind in ("property", "node", "entry"):
        exact = next((d for d in defs.values() if d.literal and d.value == item.value), None)
        if exact:
            return "pass", exact.value, exact.name
        # Renamed? A name of the same header sharing a word with it.
        near = [d for d in defs.values() if d.literal and d.file == item.where.split(":")[0]
                and _words(d.value) & _words(item.value)]
        return ("fail", near[0].value, near[0].name) if near else ("skipped", "", "")
    if item.kind == "figure":
        value = constants(item.page_shift).get(item.code_name)
        if value is None:  # e.g. a level the code's tree does not have
            return "fail", "", item.code_name
        return ("pass" if str(value) == item.value else "fail"), str(value), item.code_name
    # a reference names a macro; a constant is what a macro is "defined as"
    macro = item.value if item.kind == "reference" else item.code_name
    d = defs.get(macro)
    if d is None:
        return "fail", "", macro
    return ("pass" if item.kind == "reference" or d.value == item.value else "fail"), d.value, d.name


def _section(root: Path, item: Shown) -> tuple[str, str, str]:
    rel, title = item.value.split(": ", 1)
    found = re.search(rf"DOC:\s*{re.escape(title)}\s*$", (root / rel).read_text(errors="replace"), re.M)
    return ("pass", f"DOC: {title}", rel) if found else ("fail", "", f"DOC: {title} in {rel}")


def doc_checks(source: KernelSource, constants: Constants | None = None) -> list[CheckResult]:
    """One check per documented item of ``source``: pass, known (a
    documentation finding lists it), fail, or skipped (nothing in the files
    read defines it). The radix tree's figures are computed by plain builds
    of ``source`` (``constants``)."""
    root = source.root
    defs = definitions(root)
    constants = constants or code_constants(source)
    grouped: dict[str, list[Shown]] = {}
    for item in shown(root):
        grouped.setdefault(item.check, []).append(item)
    results = []
    for check, items in grouped.items():
        verdicts = [(_section(root, it) if it.kind == "section" else _compare(it, defs, constants), it) for it in items]
        bad = [(v, it) for v, it in verdicts if v[0] == "fail"]
        (status, code, name), item = (bad or verdicts)[0]
        results.append(_result(check, status, item, code, name, len(items), source.release))
    return results


def _result(check: str, status: str, item: Shown, code: str, name: str, times: int, release: str) -> CheckResult:
    shown_as = f"{item.value!r}" + (f" ({times} places)" if times > 1 else "")
    if status == "pass":
        return CheckResult(check, "pass", detail=f"{item.kind} {shown_as}: {name} = {code!r}")
    if status == "skipped":
        return CheckResult(check, "skipped", detail=f"{item.kind} {shown_as} at {item.where}: no file kho-conform reads "
                                                    f"defines it, nothing to hold it to (an example, or defined elsewhere)")
    has = f"code {name} = {code!r}" if code else f"the tree defines no {name or item.value}"
    detail = f"{item.kind}: documentation at {item.where} shows {item.value!r}, {has}"
    div = {"op_index": None, "op": "", "field": name or item.value, "expected": item.value, "actual": code,
           "signature": check, "check": "doc"}
    known = known_doc_slip(check, release)
    if known:
        return CheckResult(check, "known", detail=detail, divergence=div, known_id=known.id)
    return CheckResult(check, "fail", detail=detail, divergence=div)
