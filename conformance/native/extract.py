"""Extraction: kernel source -> one translation unit holding the KHO code the
driver drives, ready to compile in userspace.

Steps (after the kernel's own tools/testing/radix-tree harness, which
compiles the real file unchanged against small shim headers):
1. stage: copy the few tree files used unmodified (the KHO C file, the ABI
   headers, libfdt's header, the generic bit helpers) and add forwarding
   headers that send every other kernel include to the project's shims;
2. preprocess with ``cc -E -nostdinc`` for one page shift;
3. split the unit into top-level items, parse each with pycparser (an item
   that does not parse is dropped unless something needed lives in it);
4. keep every header item and, of the KHO C file, the closure of what the
   driver's entry points reach (and its static_asserts);
5. emit the kernel file itself with the lines of unreached items emptied (so
   line numbers in diagnostics and sanitizer reports stay the kernel's),
   then a table of the file's globals for per-program reset, then the
   driver (c/driver/kc_driver.c), which is compiled inside the same unit.

The API generation (page or key API, early memory init) is detected from what
the tree defines, never from its version string.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pycparser import c_ast, c_parser
from pycparser.c_parser import ParseError

from ..errors import KhoConformError
from ..source.tree_files import ABI_HEADER, COMPILED_FILES, KHO_C, OPTIONAL_COMPILED_FILES
from .contract import c_header

C_DIR = Path(__file__).parent / "c"
SHIMS = C_DIR / "shims"
RUNTIME_DIR = C_DIR / "runtime"

# Every other header the KHO code (or the tree headers above) includes is the
# environment, provided by shims/kc/all.h. Relative includes of mm/ and
# kernel/ internals are staged at the path the C file names.
FORWARDED = (
    "linux/types.h", "asm/types.h", "linux/compiler.h", "linux/build_bug.h", "linux/limits.h",
    "linux/math.h", "linux/minmax.h", "linux/bits.h", "linux/bitops.h", "asm/bitops.h",
    "asm/barrier.h", "linux/err.h", "linux/errno.h", "linux/mutex_types.h", "linux/mutex.h",
    "linux/cleanup.h", "linux/kmemleak.h", "linux/kasan.h", "linux/utsname.h", "linux/list.h",
    "linux/string.h", "linux/unaligned.h", "asm/byteorder.h", "linux/crash_dump.h",
    "linux/printk.h", "linux/bug.h", "linux/cma.h", "linux/memblock.h", "linux/page-isolation.h",
    "linux/vmalloc.h", "linux/mm.h", "asm/page.h", "asm/early_ioremap.h", "linux/kexec.h",
    "linux/debugfs.h", "linux/io.h", "linux/slab.h", "linux/gfp.h", "linux/numa.h",
    "asm-generic/kexec_handover.h",
)
RELATIVE_FORWARDED = ("mm/internal.h", "mm/mm_init.h", "mm/vmalloc.h", "kernel/kexec_internal.h")

# What the driver calls or touches, in either API generation; names a tree
# does not define are simply absent from the closure's roots.
ENTRY_POINTS = (
    "kho_init", "kho_enable", "kho_out", "kho_in", "kho_scratch", "kho_scratch_cnt",
    "kho_preserve_folio", "kho_unpreserve_folio", "kho_preserve_pages", "kho_unpreserve_pages",
    "kho_radix_add_page", "kho_radix_del_page", "kho_radix_add_key", "kho_radix_del_key",
    "kho_radix_walk_tree", "kho_radix_init_tree", "kho_add_subtree", "kho_remove_subtree",
    "kho_populate", "kho_memory_init_early", "kho_memory_init", "is_kho_boot", "kho_is_enabled",
    "kho_restore_folio", "kho_restore_pages", "kho_retrieve_subtree",
    "kho_radix_encode_key", "kho_encode_radix_key", "kho_radix_decode_key", "kho_decode_radix_key",
    "kho_scratch_overlap", "kho_alloc_preserve", "kho_unpreserve_free", "kho_restore_free",
    "kho_preserve_vmalloc", "kho_unpreserve_vmalloc", "kho_restore_vmalloc",
)

_GNU_NOISE = re.compile(r"\b(__extension__|__inline__|__inline|__restrict__|__restrict)\b")
_TYPEOF = re.compile(r"\b(?:__typeof__|typeof)\s*\((?:[^()]|\([^()]*\))*\)")
_IDENT = re.compile(r"\b[A-Za-z_]\w*\b")
_LINE_MARKER = re.compile(r'^# (\d+) "([^"]*)"')


@dataclass
class Item:
    text: str  # preprocessed text, without line markers
    file: str
    line: int
    end: int = 0
    defines: set[str] = field(default_factory=set)
    refs: set[str] = field(default_factory=set)
    parse_error: str = ""


@dataclass
class Extraction:
    unit: str  # the emitted translation unit (kernel file, globals table, driver include)
    api: str  # "page" or "key"
    features: dict[str, str]  # -D defines for the driver
    kept: list[tuple[str, int, int]]  # the KHO file's items the driver reaches: (names, first line, last line)
    dropped: list[tuple[str, str]]  # (item, reason)
    globals: list[str]
    compatible: str  # KHO_FDT_COMPATIBLE as the code defines it


CONTRACT_HEADER = "kc_contract.h"


def stage(root: Path, dest: Path) -> None:
    """Lay out the tree files, the forwarding headers and the generated
    contract header (``generated_dir``) under ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    for pattern in COMPILED_FILES + OPTIONAL_COMPILED_FILES:
        matches = sorted(root.glob(pattern))
        if not matches and pattern in OPTIONAL_COMPILED_FILES:
            continue
        if not matches:
            raise KhoConformError(f"kernel tree {root} lacks {pattern}; is it a 7.1+ tree with KHO?")
        for src in matches:
            out = dest / src.relative_to(root)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out)
    forward = '#include "all.h"\n'
    for name in FORWARDED:
        out = dest / "include" / name
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(forward)
    for name in RELATIVE_FORWARDED:
        out = dest / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(forward)
    generated_dir(dest).mkdir()
    (generated_dir(dest) / CONTRACT_HEADER).write_text(c_header())


def generated_dir(staged: Path) -> Path:
    return staged / "generated"


def include_flags(staged: Path) -> list[str]:
    """Include paths of the kernel unit: the staged tree, the shims, the
    runtime's interface and the contract."""
    return ["-nostdinc", f"-I{staged / 'include'}", f"-I{SHIMS / 'kc'}", f"-I{RUNTIME_DIR}", f"-I{generated_dir(staged)}"]


def preprocess(staged: Path, page_shift: int, cc: str) -> str:
    cmd = [cc, "-E", "-std=gnu11", *include_flags(staged), f"-DKC_PAGE_SHIFT={page_shift}", str(staged / KHO_C)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:300])
        raise KhoConformError(f"preprocessing {KHO_C} failed: {first}; the shims lack something this tree includes")
    return proc.stdout


def lines_of(text: str, path: str) -> dict[int, str]:
    """The lines of a preprocessed unit that come from the file ``path``, by
    their line number in that file (the preprocessor's line markers)."""
    out: dict[int, str] = {}
    file, line = "", 0
    for raw in text.splitlines():
        m = _LINE_MARKER.match(raw)
        if m:
            line, file = int(m.group(1)), m.group(2)
            continue
        if file.endswith(path) and not raw.startswith("#"):
            out[line] = raw
        line += 1
    return out


def split_items(text: str) -> list[Item]:
    """Split a preprocessed unit into top-level declarations and definitions."""
    items: list[Item] = []
    buf: list[str] = []
    depth = 0
    file, line = "", 0
    start: tuple[str, int] | None = None
    is_body = False
    prev_sig = ""  # last significant character outside strings at depth 0
    for raw in text.splitlines():
        m = _LINE_MARKER.match(raw)
        if m:
            line, file = int(m.group(1)), m.group(2)
            continue
        if raw.startswith("#"):
            line += 1
            continue
        i, n = 0, len(raw)
        while i < n:
            ch = raw[i]
            if ch in "\"'":
                j = i + 1
                while j < n and raw[j] != ch:
                    j += 2 if raw[j] == "\\" else 1
                buf.append(raw[i : j + 1])
                i = j + 1
                continue
            if start is None and not ch.isspace():
                start = (file, line)
            buf.append(ch)
            if ch in "({[":
                if ch == "{" and depth == 0:
                    is_body = prev_sig == ")"
                depth += 1
            elif ch in ")}]":
                depth -= 1
                if ch == "}" and depth == 0 and is_body:
                    items.append(Item("".join(buf).strip(), *start, end=line))
                    buf, start, is_body = [], None, False
                    prev_sig = ""
                    i += 1
                    continue
            elif ch == ";" and depth == 0:
                items.append(Item("".join(buf).strip(), *start, end=line))
                buf, start = [], None
            if depth == 0 and not ch.isspace():
                prev_sig = ch
            i += 1
        buf.append("\n")
        line += 1
    return [it for it in items if it.text not in ("", ";")]


def blank(text: str) -> str:
    """``text`` as spaces, its line breaks kept."""
    return re.sub(r"[^\n]", " ", text)


def strip_gnu(text: str) -> str:
    """Blank out GNU syntax pycparser does not know; only for analysis, the
    emitted unit keeps the original text. Lines and columns stay where they
    were, so coordinates in the parsed tree are those of ``text``."""
    out, i = [], 0
    pattern = re.compile(r"\b(__attribute__|__asm__|__asm)\s*\(")
    while True:
        m = pattern.search(text, i)
        if not m:
            out.append(text[i:])
            break
        out.append(text[i : m.start()])
        depth, j = 0, m.end() - 1
        while j < len(text):
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            j += 1
            if depth == 0:
                break
        out.append(blank(text[m.start() : j]))
        i = j
    text = _GNU_NOISE.sub(lambda m: blank(m[0]), "".join(out))
    # typeof only names a type here: any type parses the same
    return _TYPEOF.sub(lambda m: "int" + blank(m[0][3:]), text)


def lift_statement_exprs(text: str) -> tuple[str, set[str]]:
    """GNU statement expressions ``({ ... })`` (the KHOSER_* macros) replaced
    by ``(0)`` for pycparser, which has none, padded so that coordinates stay
    the text's; the identifiers inside count as references."""
    out, names, i = [], set(), 0
    while (start := text.find("({", i)) >= 0:
        depth, j = 0, start
        while j < len(text):
            depth += {"(": 1, "{": 1, ")": -1, "}": -1}.get(text[j], 0)
            j += 1
            if depth == 0:
                break
        out.append(text[i:start] + "(0" + blank(text[start + 2 : j - 1]) + ")")
        names |= set(_IDENT.findall(text[start:j]))
        i = j
    out.append(text[i:])
    return "".join(out), names


class _Refs(c_ast.NodeVisitor):
    def __init__(self) -> None:
        self.names: set[str] = set()

    def visit_ID(self, node: c_ast.ID) -> None:
        self.names.add(node.name)

    def visit_IdentifierType(self, node: c_ast.IdentifierType) -> None:
        self.names.update(node.names)

    def generic_visit(self, node: c_ast.Node) -> None:
        if isinstance(node, (c_ast.Struct, c_ast.Union, c_ast.Enum)) and node.name:
            self.names.add(node.name)
        if isinstance(node, c_ast.Enumerator):
            self.names.add(node.name)
        for _, child in node.children():
            self.visit(child)


def _defined_names(node: c_ast.Node) -> set[str]:
    names: set[str] = set()
    decl = node.decl if isinstance(node, c_ast.FuncDef) else node
    if getattr(decl, "name", None):
        names.add(decl.name)
    typ = getattr(decl, "type", None)
    while isinstance(typ, (c_ast.TypeDecl, c_ast.PtrDecl, c_ast.ArrayDecl)):
        typ = typ.type
    if isinstance(typ, (c_ast.Struct, c_ast.Union, c_ast.Enum)) and typ.name:
        is_definition = getattr(typ, "decls", None) is not None or getattr(typ, "values", None) is not None
        if is_definition:
            names.add(typ.name)
    if isinstance(typ, c_ast.Enum) and typ.values:
        names.update(e.name for e in typ.values.enumerators)
    return names


_TYPEDEF_FN = re.compile(r"\(\s*\*\s*(\w+)\s*\)")
_LAST_IDENT = re.compile(r"(\w+)\s*(\[[^\]]*\]\s*)*$")


def typedef_names(item_text: str) -> set[str]:
    body = item_text.rstrip(";").strip()
    if not body.startswith("typedef"):
        return set()
    m = _TYPEDEF_FN.search(body)
    if m:
        return {m.group(1)}
    # "typedef A x, y;" and "typedef struct {...} x;"
    tail = body.rsplit("}", 1)[-1]
    return {_LAST_IDENT.search(part.strip()).group(1) for part in tail.split(",") if _LAST_IDENT.search(part.strip())}


def analyse(items: list[Item]) -> None:
    """Fill each item's defined and referenced names (pycparser), in order, so
    that typedef names declared earlier are known when later items parse."""
    parser = c_parser.CParser()
    typedefs: list[str] = []
    for item in items:
        text, lifted = lift_statement_exprs(strip_gnu(item.text))
        prelude = "".join(f"typedef int {t};\n" for t in typedefs)
        try:
            ast = parser.parse(prelude + text, filename=item.file)
        except (ParseError, AssertionError) as e:
            item.parse_error = str(e).split("\n")[0]
            item.defines = typedef_names(item.text) or _guess_defined(item.text)
        else:
            for node in ast.ext[len(typedefs):]:
                item.defines |= _defined_names(node)
                refs = _Refs()
                refs.visit(node)
                item.refs |= refs.names | lifted
        typedefs.extend(sorted(typedef_names(item.text) - set(typedefs)))


_FUNC_NAME = re.compile(r"(\w+)\s*\(")


def _guess_defined(text: str) -> set[str]:
    head = text.split("{", 1)[0]
    m = _FUNC_NAME.search(head.split("=")[0])
    return {m.group(1)} if m else set()


def closure(items: list[Item], roots: set[str], main_file: str) -> tuple[list[Item], list[tuple[str, str]]]:
    """Keep every header item and the main file's items the roots reach."""
    by_name: dict[str, list[Item]] = {}
    for it in items:
        if it.file.endswith(main_file):
            for name in it.defines:
                by_name.setdefault(name, []).append(it)
    keep: set[int] = set()
    todo = [r for r in roots if r in by_name]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for it in by_name.get(name, []):
            if it.parse_error:
                raise KhoConformError(
                    f"{it.file}:{it.line}: '{name}' is needed but its definition does not parse "
                    f"({it.parse_error}); add the missing shim"
                )
            if id(it) not in keep:
                keep.add(id(it))
                todo.extend(n for n in it.refs if n in by_name)
    kept, dropped = [], []
    for it in items:
        # Items that define nothing are the file's static_asserts: ABI checks.
        checks = not it.defines and not it.parse_error
        if not it.file.endswith(main_file) or id(it) in keep or checks:
            kept.append(it)
        else:
            name = ",".join(sorted(it.defines)) or it.text[:40]
            dropped.append((f"{name} ({it.file}:{it.line})", it.parse_error or "not reached"))
    return kept, dropped


def _file_globals(items: list[Item], main_file: str) -> list[str]:
    """Variables defined at file scope in the main file: reset per program."""
    names = []
    for it in items:
        if not it.file.endswith(main_file) or it.parse_error:
            continue
        head = it.text.split("=", 1)[0]
        if it.text.lstrip().startswith(("extern", "typedef")) or "(" in head.split("{", 1)[0]:
            continue
        if re.match(r"^\s*(static\s+)?(const\s+)?(struct|union|enum)\s+\w+\s*\{", it.text) and not re.search(r"\}\s*\w", it.text):
            continue
        names.extend(sorted(n for n in it.defines if re.search(rf"\b{n}\b\s*(\[[^\]]*\])?\s*(=|;|__attribute__)", head + ";")))
    return names


def _compat(root: Path) -> str:
    text = (root / ABI_HEADER).read_text()
    code = re.search(r'#define\s+KHO_FDT_COMPATIBLE\s+"([^"]+)"', text)
    if not code:
        raise KhoConformError("the tree's KHO ABI header defines no KHO_FDT_COMPATIBLE; not a 7.1+ tree")
    return code.group(1)


def extract(root: Path, work: Path, page_shift: int, cc: str) -> Extraction:
    staged = work / "stage"
    stage(root, staged)
    items = split_items(preprocess(staged, page_shift, cc))
    analyse(items)
    main_defs = {n for it in items if it.file.endswith(KHO_C) for n in it.defines}
    if "kho_radix_add_key" in main_defs:
        api = "key"
    elif "kho_radix_add_page" in main_defs:
        api = "page"
    else:
        raise KhoConformError(f"{KHO_C} defines no KHO radix tree (kernels before 7.1); use a 7.1, 7.2 or 7.3 tree")
    roots = {n for n in ENTRY_POINTS if n in main_defs}
    kept, dropped = closure(items, roots, KHO_C)
    encode = "kho_encode_radix_key" if "kho_encode_radix_key" in main_defs else "kho_radix_encode_key"
    decode = "kho_decode_radix_key" if "kho_decode_radix_key" in main_defs else "kho_radix_decode_key"
    features = {"KC_KEY_API": "1" if api == "key" else "0", "KC_ENCODE_KEY": encode, "KC_DECODE_KEY": decode,
                "KC_HAS_MEMORY_INIT_EARLY": "1" if "kho_memory_init_early" in main_defs else "0",
                # public since 7.3; before, only a debug-build helper of the internal header
                "KC_HAS_SCRATCH_OVERLAP": "1" if "kho_scratch_overlap" in main_defs else "0"}
    glob = _file_globals(kept, KHO_C)
    code_compat = _compat(root)
    unit = _blank_unreached(staged / KHO_C, items, kept)
    trailer = ["", "/* ---- generated by conformance/native/extract.py ---- */"]
    trailer += [f"#define {k} {v}" for k, v in features.items()]
    trailer.append("static struct { void *addr; unsigned long size; } kc_globals[] = {")
    trailer += [f"\t{{ (void *)&{g}, sizeof({g}) }}," for g in glob]
    trailer += ["};", '#include "kc_driver.c"', ""]
    return Extraction(
        unit=unit + "\n".join(trailer), api=api, features=features,
        kept=[(",".join(sorted(it.defines)), it.line, it.end) for it in kept if it.file.endswith(KHO_C)],
        dropped=dropped, globals=glob, compatible=code_compat,
    )


def _blank_unreached(path: Path, items: list[Item], kept: list[Item]) -> str:
    """The kernel file itself, with the lines of unreached items emptied, so
    line numbers (and sanitizer reports) still point into the kernel's file."""
    lines = path.read_text().split("\n")
    kept_ids = {id(it) for it in kept}
    main = [it for it in items if it.file.endswith(KHO_C)]
    keep = {ln for it in main if id(it) in kept_ids for ln in range(it.line, it.end + 1)}
    for it in main:
        if id(it) not in kept_ids:
            for ln in range(it.line, it.end + 1):
                if ln not in keep and 0 < ln <= len(lines):
                    lines[ln - 1] = ""
    return "\n".join(lines)
