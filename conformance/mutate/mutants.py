"""Mutants of the kernel's KHO code: generated from pycparser's AST of the
functions the driver reaches, applied to the kernel file's text as small
edits.

How a mutant is found and placed:

1. the tree is staged and preprocessed as a build does it (``extract.stage``,
   ``extract.preprocess``), and the preprocessed lines of the KHO file are
   kept with their line numbers (the preprocessor's line markers);
2. each reached function (``Build.kept``) is parsed by pycparser with those
   line markers, so every node's coordinate is (kernel line, column in the
   preprocessed line);
3. the tokens of each preprocessed line are aligned with the tokens of the
   kernel lines it came from (comments removed): a token the kernel file
   spells itself maps to its place there; a token a macro expansion produced
   maps nowhere and is never mutated, since it is not in the file;
4. each operator walks the AST, finds its tokens in the preprocessed stream
   (an operator between its operands, a statement up to its ``;`` or ``}``)
   and, when they all map into the file, records an edit of the file's text.

Edits keep the file's line count (a dropped statement leaves its lines
blank), so line numbers in reports and sanitizer sites stay the kernel's;
only swapped branches of different lengths move lines. A mutant is named by
its function, first line, operator kind and an id hashed from its edits, the
same for every run on the same file.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from pycparser import c_ast, c_parser
from pycparser.c_parser import ParseError

from ..errors import KhoConformError
from ..native.build import Build, find_compiler
from ..native.extract import blank, lines_of, preprocess, split_items, stage, strip_gnu, typedef_names
from ..processes import temp_dir
from ..report.schema import mutant_name
from ..source.tree_files import KHO_C

# Operator kinds, in report order, with what each does to the code.
KINDS = {
    "relational": "a comparison swapped for its boundary or its negation (< <= > >= == !=)",
    "logical": "&& and || swapped",
    "arithmetic": "+ - * / % ++ -- swapped",
    "bitwise": "& | ^ swapped",
    "shift": "a shift's direction swapped or its width changed by one",
    "negation": "a unary !, - or ~ removed",
    "constant": "an integer constant changed by one",
    "drop-call": "a call statement removed",
    "drop-assign": "an assignment or increment statement removed",
    "drop-stmt": "an if, return, break, continue or goto removed",
    "swap-branches": "if/else (or ?:) branches swapped; an if without else gets its condition negated",
    "int-type": "the integer type of a local variable or cast changed",
}

_RELATIONAL = {"<": ("<=", ">="), "<=": ("<", ">"), ">": (">=", "<="), ">=": (">", "<"), "==": ("!=",), "!=": ("==",)}
_BINARY = {
    **{op: ("relational", to) for op, to in _RELATIONAL.items()},
    "&&": ("logical", ("||",)), "||": ("logical", ("&&",)),
    "+": ("arithmetic", ("-",)), "-": ("arithmetic", ("+",)), "*": ("arithmetic", ("/",)),
    "/": ("arithmetic", ("*",)), "%": ("arithmetic", ("/",)),
    "&": ("bitwise", ("|",)), "|": ("bitwise", ("&",)), "^": ("bitwise", ("|",)),
    "<<": ("shift", (">>",)), ">>": ("shift", ("<<",)),
    "+=": ("arithmetic", ("-=",)), "-=": ("arithmetic", ("+=",)), "*=": ("arithmetic", ("/=",)),
    "/=": ("arithmetic", ("*=",)), "%=": ("arithmetic", ("/=",)),
    "&=": ("bitwise", ("|=",)), "|=": ("bitwise", ("&=",)), "^=": ("bitwise", ("|=",)),
    "<<=": ("shift", (">>=",)), ">>=": ("shift", ("<<=",)),
}
# A narrower or differently signed type for each integer type (by its
# normalised spelling); the shims define every name on the right.
_TYPES = {
    "int": ("long", "unsigned int"), "unsigned int": ("int", "unsigned long"),
    "long": ("int", "unsigned long"), "unsigned long": ("unsigned int", "long"),
    "long long": ("int", "unsigned long long"), "unsigned long long": ("unsigned int", "long long"),
    "u64": ("u32", "s64"), "u32": ("u64", "u16"), "s64": ("s32", "u64"), "s32": ("s64", "u32"),
    "phys_addr_t": ("u32",), "size_t": ("unsigned int",),
}
_INT_WORDS = {"unsigned", "signed", "long", "int"}
_LITERAL = re.compile(r"(0[xX][0-9a-fA-F]+|0[0-7]+|\d+)([uUlL]*)")
_TOKEN = re.compile(r"""[A-Za-z_]\w*|\.?\d(?:[eEpP][+-]|[\w.])*|"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'"""
                    r"""|\.\.\.|<<=|>>=|->|\+\+|--|<<|>>|<=|>=|==|!=|&&|\|\||[-+*/%&|^]=|\#\#|\S""")
_COMMENT_OR_LITERAL = re.compile(r"""//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'""", re.S)
_OPEN, _CLOSE = {"(": ")", "[": "]", "{": "}"}, {")", "]", "}"}


@dataclass(frozen=True)
class Edit:
    """Replace the text from (line, col) up to (end_line, end_col), columns
    1-based and the end exclusive, by ``text``."""

    line: int
    col: int
    end_line: int
    end_col: int
    text: str


@dataclass(frozen=True)
class Mutant:
    id: str  # hashed from the function and the edits: stable across runs
    function: str
    line: int  # the first line it edits
    kind: str  # one of KINDS
    description: str  # what changed, e.g. "'<' -> '<='"
    edits: tuple[Edit, ...]

    @property
    def name(self) -> str:
        return mutant_name(self.function, self.line, self.kind, self.id)

    @property
    def lines(self) -> set[int]:
        return {n for e in self.edits for n in range(e.line, e.end_line + 1)}

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Mutant:
        return cls(**{**data, "edits": tuple(Edit(**e) for e in data["edits"])})


class Tok(NamedTuple):
    line: int
    col: int
    text: str

    @property
    def end(self) -> int:
        return self.col + len(self.text)


def tokens(line: int, text: str) -> list[Tok]:
    return [Tok(line, m.start() + 1, m[0]) for m in _TOKEN.finditer(text)]


def code_lines(text: str) -> list[str]:
    """The file's lines with comments and preprocessor directives blanked
    (columns kept): what its tokens are read from."""
    code = _COMMENT_OR_LITERAL.sub(lambda m: blank(m[0]) if m[0][0] == "/" else m[0], text).split("\n")
    continued = False
    for i, line in enumerate(code):
        if continued or line.lstrip().startswith("#"):
            continued = line.rstrip().endswith("\\")
            code[i] = ""
    return code


def apply(text: str, edits: tuple[Edit, ...]) -> str:
    """``text`` with ``edits`` (disjoint) applied."""
    starts = [0]
    for line in text.split("\n"):
        starts.append(starts[-1] + len(line) + 1)
    for e in sorted(edits, key=lambda e: (e.line, e.col), reverse=True):
        a, b = starts[e.line - 1] + e.col - 1, starts[e.end_line - 1] + e.end_col - 1
        text = text[:a] + e.text + text[b:]
    return text


def diff(text: str, mutant: Mutant) -> str:
    """The mutant as a unified diff of the lines it changes (no context)."""
    return "".join(difflib.unified_diff(text.splitlines(keepends=True), apply(text, mutant.edits).splitlines(keepends=True),
                                        f"a/{KHO_C}", f"b/{KHO_C}", n=0))


class _Unplaced(Exception):
    """The statement walk met tokens it did not expect (a macro that hides a
    statement's structure): that function gets no statement mutants."""


class _Function:
    """One reached function: its AST, its preprocessed tokens and where each
    of them is in the kernel file."""

    def __init__(self, name: str, node: c_ast.FuncDef, pp: list[Tok], file_lines: list[str], code: list[str]):
        self.name, self.node, self.pp, self.file_lines = name, node, pp, file_lines
        self.at = {(t.line, t.col): i for i, t in enumerate(pp)}
        first, last = pp[0].line, pp[-1].line
        self.orig = [t for n in range(first, last + 1) for t in tokens(n, code[n - 1])]
        self.orig_at = {(t.line, t.col): i for i, t in enumerate(self.orig)}
        self.map = self._align()
        self._spans: dict[int, tuple[int, int]] = {}

    def _align(self) -> dict[int, int]:
        """preprocessed token index -> kernel token index. Tokens of a
        preprocessed line are matched with those of the kernel lines from its
        own up to the next preprocessed line (a macro call over several lines
        expands on its first)."""
        out: dict[int, int] = {}
        lines = sorted({t.line for t in self.pp})
        for n, upto in zip(lines, lines[1:] + [lines[-1] + 1]):
            mine = [i for i, t in enumerate(self.pp) if t.line == n]
            theirs = [i for i, t in enumerate(self.orig) if n <= t.line < upto]
            match = difflib.SequenceMatcher(None, [self.pp[i].text for i in mine], [self.orig[i].text for i in theirs],
                                            autojunk=False)
            for a, b, size in match.get_matching_blocks():
                out.update((mine[a + k], theirs[b + k]) for k in range(size))
        return out

    # ---- tokens of the preprocessed stream ----

    def index(self, node: c_ast.Node) -> int | None:
        c = node.coord
        return None if c is None else self.at.get((c.line, c.column))

    def span(self, node: c_ast.Node) -> tuple[int, int]:
        """First and last preprocessed token any node of the subtree starts at."""
        if id(node) not in self._spans:
            found = [i for n in _walk(node) if (i := self.index(n)) is not None]
            if not found:
                raise _Unplaced(f"no token for {type(node).__name__}")
            self._spans[id(node)] = (min(found), max(found))
        return self._spans[id(node)]

    def match(self, i: int) -> int:
        """The closer of the opener at ``i``."""
        depth = 0
        for j in range(i, len(self.pp)):
            t = self.pp[j].text
            depth += (t in _OPEN) - (t in _CLOSE)
            if depth == 0:
                return j
        raise _Unplaced("unbalanced")

    def between(self, left: c_ast.Node, right: c_ast.Node, op: str) -> int | None:
        """The token ``op`` between two operands: the first at the nesting
        depth the left operand ends at (its closing parentheses come first,
        the right one's casts and prefixes after)."""
        try:
            lo, hi = self.span(left)[1] + 1, self.span(right)[0]
        except _Unplaced:
            return None
        depth = 0
        for i in range(lo, hi):
            t = self.pp[i].text
            depth += (t in _OPEN) - (t in _CLOSE)
            if t == op and depth <= 0:
                return i
        return None

    def prefix(self, node: c_ast.UnaryOp) -> int | None:
        try:
            j = self.span(node.expr)[0] - 1
        except _Unplaced:
            return None
        while j >= 0 and self.pp[j].text == "(":
            j -= 1
        return j if j >= 0 and self.pp[j].text == node.op else None

    def postfix(self, node: c_ast.UnaryOp) -> int | None:
        try:
            j = self.span(node.expr)[1] + 1
        except _Unplaced:
            return None
        while j < len(self.pp) and self.pp[j].text in (")", "]"):
            j += 1
        return j if j < len(self.pp) and self.pp[j].text == node.op[1:] else None

    # ---- where it is in the kernel file ----

    def kernel(self, i: int | None) -> Tok | None:
        """The kernel file's token for preprocessed token ``i``, if it spells it."""
        return None if i is None or i not in self.map else self.orig[self.map[i]]

    def after(self, before: int, last: int) -> list[Tok] | None:
        """The kernel tokens after the one of preprocessed token ``before`` up
        to the one of ``last``: a statement, from the token ending what
        precedes it to its own last token. None unless both map and the span
        is balanced."""
        if before not in self.map or last not in self.map or self.map[before] >= self.map[last]:
            return None
        toks = self.orig[self.map[before] + 1 : self.map[last] + 1]
        depth = 0
        for t in toks:
            depth += (t.text in _OPEN) - (t.text in _CLOSE)
            if depth < 0:
                return None
        return toks if depth == 0 else None

    def text(self, toks: list[Tok]) -> str:
        """The file's own text from the first token to the end of the last, comments included."""
        a, b = toks[0], toks[-1]
        if a.line == b.line:
            return self.file_lines[a.line - 1][a.col - 1 : b.end - 1]
        return "\n".join([self.file_lines[a.line - 1][a.col - 1 :], *self.file_lines[a.line : b.line - 1],
                          self.file_lines[b.line - 1][: b.end - 1]])


def _walk(node: c_ast.Node) -> Iterator[c_ast.Node]:
    yield node
    for _, child in node.children():
        yield from _walk(child)


def _replace(tok: Tok, text: str) -> Edit:
    return Edit(tok.line, tok.col, tok.line, tok.end, text)


def _spanning(toks: list[Tok], text: str) -> Edit:
    return Edit(toks[0].line, toks[0].col, toks[-1].line, toks[-1].end, text)


class _Operators:
    """Every mutation operator over one function; ``found`` collects
    (kind, description, edits)."""

    def __init__(self, fn: _Function) -> None:
        self.fn = fn
        self.found: list[tuple[str, str, tuple[Edit, ...]]] = []
        self.unplaced = ""  # why the statements could not be placed, if they could not

    def add(self, kind: str, description: str, *edits: Edit) -> None:
        self.found.append((kind, description, edits))

    def run(self) -> None:
        body = self.fn.node.body
        for node in _walk(body):
            if isinstance(node, (c_ast.BinaryOp, c_ast.Assignment)):
                self.binary(node)
            elif isinstance(node, c_ast.UnaryOp):
                self.unary(node)
            elif isinstance(node, c_ast.Constant):
                self.constant(node)
            elif isinstance(node, c_ast.TernaryOp):
                self.ternary(node)
            elif isinstance(node, c_ast.Decl) and isinstance(node.type, c_ast.TypeDecl):
                self.int_type(node.type)
            elif isinstance(node, c_ast.Cast) and isinstance(node.to_type.type, c_ast.TypeDecl):
                self.int_type(node.to_type.type, cast=True)
        try:
            _Statements(self).block(body, self.fn.index(body), top=True)
        except _Unplaced as e:
            self.unplaced = str(e)  # this function gets no statement mutants

    def binary(self, node: c_ast.BinaryOp | c_ast.Assignment) -> None:
        left, right = (node.left, node.right) if isinstance(node, c_ast.BinaryOp) else (node.lvalue, node.rvalue)
        if node.op not in _BINARY:
            return
        tok = self.fn.kernel(self.fn.between(left, right, node.op))
        if tok is None:
            return
        kind, replacements = _BINARY[node.op]
        for new in replacements:
            self.add(kind, f"'{node.op}' -> '{new}'", _replace(tok, new))
        literal = isinstance(right, c_ast.Constant) and self.fn.kernel(self.fn.index(right)) is not None
        if node.op in ("<<", ">>") and not literal:  # a literal width is the constant operator's
            # Shifts bind looser than +: "a << 1 + b" shifts by b + 1.
            for delta in ("1", "-1"):
                self.add("shift", f"shift width {'+' if delta == '1' else '-'}1", _replace(tok, f"{node.op} {delta} +"))

    def unary(self, node: c_ast.UnaryOp) -> None:
        if node.op in ("!", "-", "~"):
            tok = self.fn.kernel(self.fn.prefix(node))
            if tok is not None:
                self.add("negation", f"'{node.op}' removed", _replace(tok, ""))
        elif node.op in ("++", "--", "p++", "p--"):
            bare = node.op.lstrip("p")
            tok = self.fn.kernel(self.fn.postfix(node) if node.op[0] == "p" else self.fn.prefix(node))
            if tok is not None:
                new = "--" if bare == "++" else "++"
                self.add("arithmetic", f"'{bare}' -> '{new}'", _replace(tok, new))

    def constant(self, node: c_ast.Constant) -> None:
        if "int" not in node.type and "long" not in node.type:
            return
        tok = self.fn.kernel(self.fn.index(node))
        m = _LITERAL.fullmatch(tok.text) if tok is not None else None
        if m is None:
            return
        digits, suffix = m.groups()
        value = int(digits, 0) if not (len(digits) > 1 and digits[0] == "0" and digits[1] not in "xX") else int(digits, 8)
        for new in (value + 1, value - 1):
            if new < 0:
                continue
            if digits[:2] in ("0x", "0X"):
                spelled = digits[:2] + (f"{new:X}" if any(c in "ABCDEF" for c in digits[2:]) else f"{new:x}")
            elif len(digits) > 1 and digits[0] == "0":
                spelled = f"0{new:o}"
            else:
                spelled = str(new)
            self.add("constant", f"{tok.text} -> {spelled}{suffix}", _replace(tok, spelled + suffix))

    def ternary(self, node: c_ast.TernaryOp) -> None:
        fn = self.fn
        q, c = fn.kernel(fn.between(node.cond, node.iftrue, "?")), fn.kernel(fn.between(node.iftrue, node.iffalse, ":"))
        if q is None or c is None:
            return
        qi, ci = fn.orig_at[(q.line, q.col)], fn.orig_at[(c.line, c.col)]
        depth, end = 0, ci + 1
        while end < len(fn.orig) and not (depth == 0 and fn.orig[end].text in (";", ",", ")", "]", "}", ":")):
            depth += (fn.orig[end].text in _OPEN) - (fn.orig[end].text in _CLOSE)
            end += 1
        yes, no = fn.orig[qi + 1 : ci], fn.orig[ci + 1 : end]
        if yes and no:
            self.add("swap-branches", "?: branches swapped", _spanning(yes, fn.text(no)), _spanning(no, fn.text(yes)))

    def int_type(self, decl: c_ast.TypeDecl, cast: bool = False) -> None:
        ident = decl.type
        if not isinstance(ident, c_ast.IdentifierType):
            return
        name = _normalised(ident.names)
        start = self.fn.index(ident)
        if name not in _TYPES or start is None:
            return
        count = len(ident.names)
        spelled = [self.fn.kernel(i) for i in range(start, start + count)]
        if any(t is None for t in spelled) or [t.text for t in spelled] != [p.text for p in self.fn.pp[start : start + count]]:
            return
        first, last = (self.fn.orig_at[(t.line, t.col)] for t in (spelled[0], spelled[-1]))
        if last - first != count - 1:
            return
        for new in _TYPES[name]:
            self.add("int-type", f"{'cast ' if cast else ''}'{' '.join(ident.names)}' -> '{new}'", _spanning(spelled, new))


def _normalised(names: list[str]) -> str:
    """An integer type's spelling without its optional words: "long unsigned
    int" -> "unsigned long"; a typedef name as is."""
    if len(names) == 1 and names[0] not in _INT_WORDS:
        return names[0]
    if set(names) - _INT_WORDS:
        return ""
    base = {0: "int", 1: "long", 2: "long long"}.get(names.count("long"), "")
    return ("unsigned " if "unsigned" in names else "") + base


class _Statements:
    """Statements with their extent in the preprocessed stream: each starts
    right after what precedes it (the block's ``{``, a condition's ``)``, the
    previous statement's last token) and ends at its ``;`` or ``}``."""

    def __init__(self, ops: _Operators) -> None:
        self.ops, self.fn = ops, ops.fn

    def expect(self, i: int, text: str) -> int:
        pp = self.fn.pp
        if i >= len(pp) or pp[i].text != text:
            if any(a.text == "(" and b.text == "{" for a, b in zip(pp[max(i - 1, 0) : i + 2], pp[i : i + 3])):
                # A macro that expands to ({ ... }): its statements are not the source's.
                raise _Unplaced("a GNU statement expression among its statements")
            raise _Unplaced(f"expected {text!r}")
        return i

    def block(self, node: c_ast.Compound, start: int | None, top: bool = False) -> int:
        i = self.expect(start if start is not None else -1, "{")
        items = node.block_items or []
        for n, item in enumerate(items):
            if isinstance(item, c_ast.Decl) and (at := self.fn.index(item)) is not None and at <= i:
                continue  # a further declarator of the declaration just walked
            last_return = top and n == len(items) - 1 and isinstance(item, c_ast.Return)
            i = self.statement(item, i, in_block=True, droppable=not last_return)
        return self.expect(i + 1, "}")

    def statement(self, node: c_ast.Node, before: int, in_block: bool, droppable: bool = True) -> int:
        """Walk the statement that follows token ``before``; its last token."""
        fn, start = self.fn, before + 1
        if isinstance(node, c_ast.Compound):
            end = self.block(node, start)
        elif isinstance(node, c_ast.If):
            close = fn.match(self.expect(self.expect(start, "if") + 1, "("))
            then_end = self.statement(node.iftrue, close, in_block=False)
            end = then_end
            if node.iffalse is not None:
                end = self.statement(node.iffalse, self.expect(then_end + 1, "else"), in_block=False)
            self.branches(node, start, close, then_end, end)
        elif isinstance(node, (c_ast.For, c_ast.While, c_ast.Switch)):
            keyword = {c_ast.For: "for", c_ast.While: "while", c_ast.Switch: "switch"}[type(node)]
            close = fn.match(self.expect(self.expect(start, keyword) + 1, "("))
            end = self.statement(node.stmt, close, in_block=False)
        elif isinstance(node, c_ast.DoWhile):
            body_end = self.statement(node.stmt, self.expect(start, "do"), in_block=False)
            end = self.expect(fn.match(self.expect(self.expect(body_end + 1, "while") + 1, "(")) + 1, ";")
        elif isinstance(node, c_ast.Label):
            end = self.statement(node.stmt, self.expect(start + 1, ":"), in_block=False)
        elif isinstance(node, (c_ast.Case, c_ast.Default)):
            end = self.colon(start)
            for stmt in node.stmts or []:
                end = self.statement(stmt, end, in_block=True)
        else:
            end = self.semicolon(start)
        if droppable:
            self.drop(node, before, end, in_block)
        return end

    def semicolon(self, i: int) -> int:
        depth = 0
        for j in range(i, len(self.fn.pp)):
            t = self.fn.pp[j].text
            depth += (t in _OPEN) - (t in _CLOSE)
            if t == ";" and depth == 0:
                return j
        raise _Unplaced("no ';'")

    def colon(self, i: int) -> int:
        while i < len(self.fn.pp) and self.fn.pp[i].text != ":":
            i += 1
        return self.expect(i, ":")

    def drop(self, node: c_ast.Node, before: int, end: int, in_block: bool) -> None:
        kind = _drop_kind(node)
        toks = self.fn.after(before, end) if kind else None
        if not toks:
            return
        text = self.fn.text(toks)
        # In a block the statement goes; as an if's or a loop's body, an empty one stays.
        keep = "\n" * text.count("\n") + ("" if in_block else ";")
        self.ops.add(kind, f"removed: {' '.join(text.split())[:60]}", _spanning(toks, keep))

    def branches(self, node: c_ast.If, start: int, close: int, then_end: int, end: int) -> None:
        fn = self.fn
        if node.iffalse is None:
            paren, closing = fn.kernel(start + 1), fn.kernel(close)
            negated = isinstance(node.cond, c_ast.UnaryOp) and node.cond.op == "!"  # the negation operator's already
            if paren is not None and closing is not None and not negated:
                self.ops.add("swap-branches", "if condition negated", Edit(paren.line, paren.end, paren.line, paren.end, "!("),
                             Edit(closing.line, closing.col, closing.line, closing.col, ")"))
            return
        yes, no = fn.after(close, then_end), fn.after(then_end + 1, end)
        if yes and no:
            braced = lambda toks: fn.text(toks) if toks[0].text == "{" else "{ " + fn.text(toks) + " }"  # noqa: E731
            self.ops.add("swap-branches", "if/else branches swapped", _spanning(yes, braced(no)), _spanning(no, braced(yes)))


def _drop_kind(node: c_ast.Node) -> str:
    if isinstance(node, c_ast.FuncCall):
        return "drop-call"
    if isinstance(node, c_ast.Assignment) or (isinstance(node, c_ast.UnaryOp) and node.op in ("++", "--", "p++", "p--")):
        return "drop-assign"
    if isinstance(node, (c_ast.If, c_ast.Return, c_ast.Break, c_ast.Continue, c_ast.Goto)):
        return "drop-stmt"
    return ""


@dataclass(frozen=True)
class Generated:
    mutants: list[Mutant]
    functions: list[str]  # every reached function, in file order
    unplaced: list[str]  # functions whose statements could not be placed (so no statement mutants), and why


def generate(build: Build) -> Generated:
    """Every mutant of the functions ``build`` reaches in its KHO file, in
    file order, at the build's page shift (macros such as PAGE_SHIFT decide
    what the preprocessed code is)."""
    root = build.source.root
    with temp_dir(prefix="kho-mutants-") as work:
        staged = work / "stage"
        stage(root, staged)
        pp = preprocess(staged, build.page_shift, find_compiler("plain"))
    file_text = (root / KHO_C).read_text(errors="surrogateescape")
    file_lines, code = file_text.split("\n"), code_lines(file_text)
    items = split_items(pp)
    kho = lines_of(pp, KHO_C)
    parser = c_parser.CParser()
    typedefs: list[str] = []
    starts = {first: (names, last) for names, first, last in build.kept}
    mutants: dict[tuple, Mutant] = {}
    functions, unplaced = [], []
    for item in items:
        reached = item.file.endswith(KHO_C) and item.line in starts and starts[item.line][1] == item.end
        if reached and "(" in item.text.split("{", 1)[0] and item.text.rstrip().endswith("}"):
            fn = _parse(parser, typedefs, kho, item.line, item.end, file_lines, code)
            if fn is not None:
                functions.append(fn.name)
                ops = _Operators(fn)
                ops.run()
                if ops.unplaced:
                    unplaced.append(f"{fn.name} ({ops.unplaced})")
                for kind, description, edits in ops.found:
                    key = tuple(sorted((e.line, e.col, e.end_line, e.end_col, e.text) for e in edits))
                    if key not in mutants:
                        mutants[key] = _mutant(fn.name, kind, description, edits)
        typedefs.extend(sorted(typedef_names(item.text) - set(typedefs)))
    order = {name: i for i, name in enumerate(functions)}
    ranked = sorted(mutants.values(), key=lambda m: (order[m.function], m.line, m.edits[0].col, list(KINDS).index(m.kind), m.id))
    return Generated(ranked, functions, unplaced)


def _parse(parser: c_parser.CParser, typedefs: list[str], kho: dict[int, str], first: int, last: int,
           file_lines: list[str], code: list[str]) -> _Function | None:
    numbers = [n for n in range(first, last + 1) if n in kho]
    stripped = strip_gnu("\n".join(kho[n] for n in numbers)).split("\n")
    prelude = "".join(f"typedef int {t};\n" for t in typedefs)
    text = prelude + "".join(f'# {n} "{KHO_C}"\n{line}\n' for n, line in zip(numbers, stripped))
    try:
        node = parser.parse(text, filename=KHO_C).ext[-1]
    except (ParseError, AssertionError):
        return None  # the build parsed it; a function it cannot place is left out
    if not isinstance(node, c_ast.FuncDef):
        return None
    pp = [t for n, line in zip(numbers, stripped) for t in tokens(n, line)]
    return _Function(node.decl.name, node, pp, file_lines, code)


def _mutant(function: str, kind: str, description: str, edits: tuple[Edit, ...]) -> Mutant:
    edits = tuple(sorted(edits, key=lambda e: (e.line, e.col)))
    digest = hashlib.sha256(repr((function, [tuple(asdict(e).values()) for e in edits])).encode()).hexdigest()[:10]
    return Mutant(digest, function, edits[0].line, kind, description, edits)


def select(mutants: list[Mutant], functions: list[str] | None, lines: set[int] | None) -> list[Mutant]:
    """The mutants of ``functions`` (all if None) that touch ``lines`` (all if None)."""
    return [m for m in mutants if (functions is None or m.function in functions) and (lines is None or m.lines & lines)]


def check_functions(requested: list[str], reached: list[str]) -> None:
    unknown = [f for f in requested if f not in reached]
    if unknown:
        raise KhoConformError(f"--functions {', '.join(unknown)}: not a function the harness reaches in {KHO_C}; "
                              f"choose from {', '.join(reached)}")


def kernel_text(root: Path) -> str:
    return (Path(root) / KHO_C).read_text(errors="surrogateescape")
