"""``kho-conform export kunit FINDING``: a saved finding as a KUnit test the
kernel can keep.

The test replays the finding's minimized program through the kernel's
exported API (kho_preserve_folio/pages, kho_unpreserve_*, the radix tree's
add/del/walk, kho_add_subtree/kho_remove_subtree) and expects what the
reference model computes: each call's return code, the keys of the
preservation tree (read with the exported walk) and the subtrees of the
outgoing FDT. It can only reproduce what one kernel shows: a finding whose
first divergence is in the next kernel (a kexec), in KHO's own
initialisation, a warning count or a sanitizer report is refused with one
line saying why.

How a kernel test sees the tree: the tree and FDT KHO hands over live in a
static (kho_out), so the test is built into kernel/liveupdate/kexec_handover.c
(included at its end, as the project's own driver is in userspace). For its
run it swaps an empty radix tree into kho_out and puts the kernel's back
afterwards, so the running kernel's preservations are neither seen nor
touched. The program's pfns name pages of a test machine; the test backs the
ones that preserve calls use with pages it allocates (one naturally aligned
block of at most 2^MAX_PAGE_ORDER pages, which keeps every alignment the
program relied on, and one folio per folio of higher order) and moves the
expected keys with them; radix ops elsewhere keep the program's numbers,
which the tree stores without touching any page.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import libfdt

from fuzz.findings import load_finding
from reference import model
from reference.geometry import geometry
from reference.keys import decode, encode, in_domain, range_in_domain
from reference.outcome import ENOMEM, Outcome
from reference.profiles import PROFILES
from reference.program import QUERY_OPS, Op, Program, ProgramError, Step, parse_program

from .errors import KhoConformError
from .source import KernelSource, fetch, list_cached

MAX_PAGE_ORDER = 10  # the largest block a kernel's page allocator hands out (its default MAX_PAGE_ORDER)
MAX_KEYS = 4096  # expected tree keys a generated test spells out
INT_OPS = {Op.PRESERVE_FOLIO, Op.PRESERVE_PAGES, Op.RADIX_ADD, Op.RADIX_ADD_KEY, Op.ADD_SUBTREE}
PAGE_OPS = {Op.PRESERVE_PAGES, Op.UNPRESERVE_PAGES}
FOLIO_OPS = {Op.PRESERVE_FOLIO, Op.UNPRESERVE_FOLIO}
RADIX_OPS = {Op.RADIX_ADD, Op.RADIX_DEL}
KEY_OPS = {Op.RADIX_ADD_KEY, Op.RADIX_DEL_KEY}
EXPORTED_OPS = INT_OPS | PAGE_OPS | FOLIO_OPS | RADIX_OPS | KEY_OPS | {Op.REMOVE_SUBTREE}
_ALLOCATES = "its memory comes from the running kernel's allocator, whose pages a test cannot choose"
NOT_EXPORTED_WHY = {
    Op.ALLOC_PRESERVE: _ALLOCATES, Op.UNPRESERVE_FREE: _ALLOCATES, Op.PRESERVE_VMALLOC: _ALLOCATES,
    Op.UNPRESERVE_VMALLOC: _ALLOCATES, Op.FILL_FDT: "the FDT a running kernel has is already filled its own way",
}
SUBTREE_PROPS = ("preserved-data", "blob-size")  # KHO_SUB_TREE_PROP_NAME, KHO_SUB_TREE_SIZE_PROP_NAME


@dataclass(frozen=True)
class Region:
    """Pages of the program the test backs with an allocation of its own."""

    first: int  # the program's first pfn of it
    order: int
    folio: bool  # one folio of that order (else a block of order-0 pages)

    def holds(self, pfn: int, pages: int) -> bool:
        return self.first <= pfn and pfn + pages <= self.first + (1 << self.order)


@dataclass
class KunitExport:
    name: str  # the suite, and the file's stem
    text: str  # the C file
    page_shift: int
    signature: str


def _refuse(finding: Path, why: str) -> KhoConformError:
    return KhoConformError(f"cannot export {finding} as a KUnit test: {why}")


def _extent(step: Step) -> tuple[int, int] | None:
    """The pfns [start, start + n) a preserve/unpreserve or radix op names."""
    if step.op in PAGE_OPS:
        return step.a, max(step.b, 1)
    if step.op in FOLIO_OPS | RADIX_OPS:
        return step.a, 1 << min(step.b, 63)
    return None


def _regions(steps: list[Step], finding: Path) -> list[Region]:
    """One block for the pages and order-0 folios, one folio per folio of higher order."""
    single = [(s.a, max(s.b, 1)) for s in steps if s.op in PAGE_OPS] + [(s.a, 1) for s in steps if s.op in FOLIO_OPS and s.b == 0]
    folios = sorted({(s.a, s.b) for s in steps if s.op in FOLIO_OPS and s.b > 0})
    regions = []
    if single:
        lo, hi = min(a for a, _ in single), max(a + n for a, n in single)
        order = max(0, ((lo ^ (hi - 1)).bit_length()))  # the smallest aligned block holding [lo, hi)
        if order > MAX_PAGE_ORDER:
            raise _refuse(finding, f"its pages span a block of 2^{order} pages; a test can allocate at most "
                                   f"2^{MAX_PAGE_ORDER} contiguous pages")
        regions.append(Region(lo & ~((1 << order) - 1), order, folio=False))
    for pfn, order in folios:
        if pfn & ((1 << order) - 1) or order > MAX_PAGE_ORDER:
            raise _refuse(finding, f"its folio at pfn {pfn:#x} of order {order} is not one a kernel can allocate "
                                   f"(naturally aligned, order <= {MAX_PAGE_ORDER})")
        clash = [(a, n) for a, n in single if a < pfn + (1 << order) and pfn < a + n]
        clash += [(a, 1 << o) for a, o in folios if (a, o) != (pfn, order) and a < pfn + (1 << order) and pfn < a + (1 << o)]
        if clash:
            raise _refuse(finding, f"its folio at pfn {pfn:#x} of order {order} shares pages with other preserve calls; "
                                   "in a running kernel a folio is an allocation of its own")
        regions.append(Region(pfn, order, folio=True))
    return regions


def _region_of(regions: list[Region], pfn: int, pages: int, finding: Path, what: str) -> int | None:
    """The index of the region holding [pfn, pfn + pages), None if it overlaps none."""
    for i, r in enumerate(regions):
        if r.holds(pfn, pages):
            return i
        if pfn < r.first + (1 << r.order) and r.first < pfn + pages:
            raise _refuse(finding, f"{what} reaches over the edge of pages the test must allocate")
    return None


def _keys(outcome: Outcome, page_shift: int) -> list[int]:
    """The keys of the old kernel's tree, ascending."""
    geo = geometry(page_shift)
    keys = []
    for node in outcome.tree:
        if node.level == 0:
            base = sum(slot << geo.shift(geo.root_level - i) for i, slot in enumerate(node.path))
            keys += [base | bit for bit in node.entries]
    return sorted(keys)


def _subtrees(fdt_bytes: bytes) -> dict[str, tuple[int, int]]:
    """Subtree name -> (preserved-data, blob-size) of a KHO FDT (read with libfdt)."""
    out: dict[str, tuple[int, int]] = {}
    if not fdt_bytes:
        return out
    fdt = libfdt.Fdt(bytes(fdt_bytes))
    quiet = (libfdt.NOTFOUND,)
    node = fdt.first_subnode(0, quiet)
    while node >= 0:
        values = [fdt.getprop(node, prop, quiet) for prop in SUBTREE_PROPS]
        if all(isinstance(v, (bytes, bytearray)) and len(v) == 8 for v in values):
            out[fdt.get_name(node)] = tuple(int.from_bytes(v, "little") for v in values)
        node = fdt.next_subnode(node, quiet)
    return out


def _c_string(s: str) -> str:
    out = []
    for b in s.encode():
        ch = chr(b)
        out.append(f"\\{ch}" if ch in '"\\' else ch if 32 <= b < 127 and ch != "?" else f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def export_kunit(finding: Path, tool_version: str) -> KunitExport:
    """The KUnit test of the finding saved in the directory ``finding``."""
    finding = Path(finding)
    try:
        meta = load_finding(finding)
        program = parse_program((Path(meta["path"]) / "program.txt").read_text())
    except (OSError, ValueError, KeyError, ProgramError) as e:
        raise KhoConformError(f"{finding}: not a saved finding ({e}); pass a corpus/crashes/<signature>/ directory") from None
    first, signature = meta.get("first") or {}, meta["signature"]
    check, field, op_index = first.get("check", ""), first.get("field", ""), first.get("op_index")
    kexec = program.kexec_index()
    if check == "next" or check.startswith("handover") or (op_index is not None and kexec is not None and op_index > kexec):
        raise _refuse(finding, f"it needs a kexec: its first divergence ({check}: {field}) is in what the next kernel "
                               "makes of the handover, and a KUnit test runs inside one kernel")
    if check == "boot":
        raise _refuse(finding, "its first divergence is in KHO's own initialisation (kho_init), which runs before any test")
    if check == "events":
        raise _refuse(finding, f"its first divergence is a fault or sanitizer report ({first.get('actual', '')[:60]}), "
                               "which a KUnit test has no value to expect for")
    if check == "ops" and field == "warnings":
        raise _refuse(finding, "its first divergence is the number of warnings an op prints; a KUnit test cannot count WARN splats")
    header = program.header
    if header.fail_alloc:
        raise _refuse(finding, f"it fails the {header.fail_alloc}th page allocation (fail_alloc), which a test in a running "
                               "kernel cannot arrange")
    if header.scratch:
        raise _refuse(finding, "it sets scratch areas; a running kernel has its own")
    profile = PROFILES[meta.get("profile", "")] if meta.get("profile") in PROFILES else None
    if profile is None:
        raise _refuse(finding, f"its model profile {meta.get('profile')!r} is unknown to this kho-conform")
    ps = header.page_shift
    # Pokes only corrupt the image at kexec; queries change nothing.
    steps = [s for s in program.steps[: kexec if kexec is not None else len(program.steps)]
             if s.op not in (Op.POKE_ARENA, Op.POKE_FDT) and s.op not in QUERY_OPS]
    unexported = next((s for s in steps if s.op not in EXPORTED_OPS), None)
    if unexported is not None:
        raise _refuse(finding, f"op {unexported.text()} is not exported: {NOT_EXPORTED_WHY.get(unexported.op, 'not yet')}")
    truncated = Program(header, tuple(steps))
    regions = _regions(steps, finding)
    outside = next((s for s in steps if (s.op in FOLIO_OPS and not in_domain(s.a, s.b, ps))
                    or (s.op in PAGE_OPS and not range_in_domain(s.a, s.b, ps))), None)
    if outside is not None:
        raise _refuse(finding, f"op {outside.text()} names pages outside the key domain; the pages a test allocates "
                               "and preserves are inside it")
    if profile.key_api:
        odd = next((s for s in steps if s.op in RADIX_OPS and not in_domain(s.a, s.b, ps)), None)
        if odd is not None:
            raise _refuse(finding, f"op {odd.text()} names no key (outside the key domain); the kernel's own encoding "
                                   "of it is internal to kexec_handover.c")
    used = [(s.a, s.b) for s in steps if s.op in PAGE_OPS] + [(s.a, 1 << s.b) for s in steps if s.op in FOLIO_OPS]
    nodes = {header.nid_of(a) for a, n in used} | {header.nid_of(a + max(n, 1) - 1) for a, n in used}
    if len(nodes) > 1 or any(a < start < a + n for a, n in used for start, _ in header.numa):
        raise _refuse(finding, "its pages cross the NUMA boundaries of its layout, which a test cannot choose")

    expected = model.run(truncated, profile)
    booted = model.run(Program(header, ()), profile)
    if any(r.rc == -ENOMEM for r in expected.ops):
        raise _refuse(finding, f"the model runs out of tree pages (-ENOMEM with arena_pages {header.arena_pages}); "
                               "a running kernel's test cannot arrange that")
    boot_keys = set(_keys(booted, ps))
    boot_pfns = {decode(k, ps)[0] >> ps for k in boot_keys}
    for s in steps:
        ext = _extent(s) or ((decode(s.a, ps)[0] >> ps, 1) if s.op in KEY_OPS else None)
        if ext and any(ext[0] <= p < ext[0] + ext[1] for p in boot_pfns):
            raise _refuse(finding, f"op {s.text()} touches the pages KHO preserved for itself at boot (its FDT and "
                                   "metadata), which a kernel test cannot name")
    keys = [k for k in _keys(expected, ps) if k not in boot_keys]
    if len(keys) > MAX_KEYS:
        raise _refuse(finding, f"the model's tree holds {len(keys)} keys; at most {MAX_KEYS} are spelled out")
    name = f"kho_conform_{signature}"
    gen = _Generator(name, finding, meta, program, steps, expected, regions, keys, booted, profile.key_api, tool_version)
    return KunitExport(name, gen.text(), ps, signature)


class _Generator:
    def __init__(self, name: str, finding: Path, meta: dict, program: Program, steps: list[Step], expected: Outcome,
                 regions: list[Region], keys: list[int], booted: Outcome, key_api: bool, tool_version: str) -> None:
        self.p = name
        self.finding, self.meta, self.program, self.steps = finding, meta, program, steps
        self.expected, self.regions, self.keys, self.key_api = expected, regions, keys, key_api
        self.ps = program.header.page_shift
        self.tool_version = tool_version
        self.blobs = list(dict.fromkeys(s.a for s in steps if s.op in (Op.ADD_SUBTREE, Op.REMOVE_SUBTREE)))
        boot_names = set(_subtrees(booted.fdt))
        self.names = [n for n in dict.fromkeys(s.name for s in steps if s.op == Op.ADD_SUBTREE) if n not in boot_names]
        self.subtrees = _subtrees(expected.fdt)

    # -- pieces --------------------------------------------------------------

    def _pfn(self, pfn: int, pages: int, what: str) -> str:
        """C expression of the test's pfn standing for the program's ``pfn``."""
        r = _region_of(self.regions, pfn, pages, self.finding, what)
        if r is None:
            return f"{pfn:#x}UL"
        return f"{self.p}_base[{r}] + {pfn - self.regions[r].first:#x}"

    def _folio(self, step: Step) -> str:
        r = _region_of(self.regions, step.a, 1 << step.b, self.finding, step.text())
        if r is not None and self.regions[r].folio:
            return f"folio{r}"
        return f"page_folio(pfn_to_page({self._pfn(step.a, 1, step.text())}))"

    def _call(self, step: Step) -> str:
        op, a, b = step.op, step.a, step.b
        tree = "&kho_out.radix_tree"
        if op in FOLIO_OPS:
            return f"{'kho_preserve_folio' if op == Op.PRESERVE_FOLIO else 'kho_unpreserve_folio'}({self._folio(step)})"
        if op in PAGE_OPS:
            fn = "kho_preserve_pages" if op == Op.PRESERVE_PAGES else "kho_unpreserve_pages"
            return f"{fn}(pfn_to_page({self._pfn(a, max(b, 1), step.text())}), {b:#x}UL)"
        if op in RADIX_OPS:
            pfn = self._pfn(a, 1 << min(b, 63), step.text())
            if self.key_api:
                fn = "kho_radix_add_key" if op == Op.RADIX_ADD else "kho_radix_del_key"
                key = f"{encode(a << self.ps, b, self.ps) & ((1 << 64) - 1):#x}UL" if pfn.endswith("UL") else \
                    f"{self.p}_key(PFN_PHYS({pfn}), {b})"
                return f"{fn}({tree}, {key})"
            return f"{'kho_radix_add_page' if op == Op.RADIX_ADD else 'kho_radix_del_page'}({tree}, {pfn}, {b})"
        if op in KEY_OPS:
            return f"{'kho_radix_add_key' if op == Op.RADIX_ADD_KEY else 'kho_radix_del_key'}({tree}, {a:#x}UL)"
        if op == Op.ADD_SUBTREE:
            return f"kho_add_subtree({_c_string(step.name)}, blob{self.blobs.index(a)}, {b:#x}UL)"
        if op == Op.REMOVE_SUBTREE:
            return f"kho_remove_subtree(blob{self.blobs.index(a)})"
        raise AssertionError(op)

    def _expected_keys(self) -> list[str]:
        rows = []
        for key in self.keys:
            phys, order = decode(key, self.ps)
            r = _region_of(self.regions, phys >> self.ps, 1 << min(order, 63), self.finding, f"key {key:#x}")
            rel = phys - (self.regions[r].first << self.ps) if r is not None else phys
            rows.append(f"\t{{ {-1 if r is None else r}, {rel:#x}ULL, {order}, {key:#x}UL }},")
        return rows

    # -- the file ------------------------------------------------------------

    def text(self) -> str:
        p, ps, meta = self.p, self.ps, self.meta
        first = meta.get("first") or {}
        source = meta.get("source") or {}
        where = f"op {first['op_index']} ({first.get('op', '')})" if first.get("op_index") is not None else "the end state"
        nkeys = len(self.keys)
        lines = [
            "// SPDX-License-Identifier: GPL-2.0",
            "/*",
            f" * KUnit reproducer of kho-conform finding {meta['signature']}.",
            " *",
            f" * Generated by kho-conform {self.tool_version} from the finding's minimized",
            f" * program (below), run on {source.get('version', '?')} ({source.get('provider', '?')}),",
            f" * PAGE_SHIFT {ps}. First divergence: [{first.get('check', '?')}] at {where}:",
            f" * {first.get('field', '')}: model {str(first.get('expected', ''))[:80]}",
            f" * != kernel {str(first.get('actual', ''))[:80]}",
            " * The expected values are the reference model's (profile "
            f"{meta.get('profile', '?')}).",
            " *",
            " * It reads KHO's outgoing state (kho_out, static), so it is built into",
            " * kernel/liveupdate/kexec_handover.c: #include it at the end of that file",
            " * (e.g. under a CONFIG_KEXEC_HANDOVER_KUNIT_TEST option) and boot with",
            " * kho=on. For its run it swaps an empty radix tree into kho_out and puts",
            " * the kernel's back afterwards; the pages the program preserves are backed",
            " * by pages it allocates, keeping their alignment; radix ops elsewhere use",
            " * the program's numbers. Subtree names must be free in the running kernel.",
            " *",
            " * Program:",
            *[f" *\t{line}" for line in self.program.text().rstrip().splitlines()],
            " */",
            "#include <kunit/test.h>",
            "#include <linux/gfp.h>",
            "#include <linux/kexec_handover.h>",
            "#include <linux/kho_radix_tree.h>",
            "#include <linux/libfdt.h>",
            "#include <linux/mm.h>",
            "#include <linux/unaligned.h>",
            "",
            f"#define {p.upper()}_KEYS {nkeys}UL",
            "",
            "/* The tree the model expects: region -1 means the program's own number, else",
            " * phys is an offset into that region of pages the test allocates. */",
            f"struct {p}_key {{",
            "\tint region;",
            "\tu64 phys;",
            "\tunsigned int order;",
            "\tunsigned long key;",
            "};",
            "",
            f"static const struct {p}_key {p}_tree[] = {{",
            *self._expected_keys(),
            "\t{ -2 } /* end: keeps the table non-empty */",
            "};",
            "",
            f"static unsigned long {p}_base[{max(len(self.regions), 1)}];",
            "",
            "/* What the walk found: the first entries, and how many there were. */",
            f"static struct {p}_walk {{",
            "\tunsigned long n;",
            f"\tphys_addr_t phys[{p.upper()}_KEYS + 64];",
            f"\tunsigned int order[{p.upper()}_KEYS + 64];",
            f"\tunsigned long key[{p.upper()}_KEYS + 64];",
            f"}} {p}_walk;",
            "",
        ]
        lines += self._walk_functions()
        lines += self._test_function()
        lines += [
            f"static struct kunit_case {p}_cases[] = {{",
            f"\tKUNIT_CASE({p}_program),",
            "\t{}",
            "};",
            "",
            f"static struct kunit_suite {p}_suite = {{",
            f'\t.name = "{p}",',
            f"\t.test_cases = {p}_cases,",
            "};",
            f"kunit_test_suite({p}_suite);",
            "",
        ]
        return "\n".join(lines)

    def _walk_functions(self) -> list[str]:
        p = self.p
        record = [
            "\tif (w->n < ARRAY_SIZE(w->key)) {",
            "\t\tw->phys[w->n] = phys;",
            "\t\tw->order[w->n] = order;",
            "\t\tw->key[w->n] = key;",
            "\t}",
            "\tw->n++;",
            "\treturn 0;",
            "}",
            "",
        ]
        if self.key_api:
            return [
                "/* A key of (phys, order), as the KHO ABI documentation defines it. */",
                f"static unsigned long {p}_key(phys_addr_t phys, unsigned int order)",
                "{",
                "\treturn (1UL << (64 - PAGE_SHIFT - order)) | (phys >> (PAGE_SHIFT + order));",
                "}",
                "",
                f"static int {p}_leaf(unsigned long key, void *data)",
                "{",
                f"\tstruct {p}_walk *w = &{p}_walk;",
                "\tphys_addr_t phys = 0;",
                "\tunsigned int order = 0;",
                "",
                *record,
            ]
        return [
            f"static int {p}_page(phys_addr_t phys, unsigned int order)",
            "{",
            f"\tstruct {p}_walk *w = &{p}_walk;",
            "\tunsigned long key = 0;",
            "",
            *record,
            f"static void {p}_free(struct kho_radix_node *node, unsigned int level)",
            "{",
            "\tunsigned long i;",
            "",
            "\tfor (i = 0; level && i < ARRAY_SIZE(node->table); i++)",
            "\t\tif (node->table[i])",
            f"\t\t\t{p}_free(phys_to_virt(node->table[i]), level - 1);",
            "\tfree_page((unsigned long)node);",
            "}",
            "",
        ]

    def _test_function(self) -> list[str]:
        p, ps = self.p, self.ps
        decl = [f"\tstruct {p}_walk *w = &{p}_walk;", "\tstruct kho_radix_node *saved;", "\tunsigned long i, j, seen;",
                "\tbool ok = true;"]
        decl += ["\tint rc;"] if any(s.op in INT_OPS for s in self.steps) else []
        decl.append("\tstruct kho_radix_tree mine = { };" if self.key_api else "\tstruct kho_radix_node *root;")
        alloc = []
        for i, r in enumerate(self.regions):
            last = r.first + (1 << r.order) - 1
            if r.folio:
                decl.append(f"\tstruct folio *folio{i};")
                alloc += [f"\t/* the program's folio {r.first:#x} of order {r.order} */",
                          f"\tfolio{i} = folio_alloc(GFP_KERNEL, {r.order});",
                          f"\tok = ok && folio{i};",
                          f"\tif (folio{i})", f"\t\t{p}_base[{i}] = folio_pfn(folio{i});"]
            else:
                decl.append(f"\tstruct page *block{i};")
                alloc += [f"\t/* the program's pfns {r.first:#x}..{last:#x} */",
                          f"\tblock{i} = alloc_pages(GFP_KERNEL | __GFP_ZERO, {r.order});",
                          f"\tok = ok && block{i};",
                          f"\tif (block{i})", f"\t\t{p}_base[{i}] = page_to_pfn(block{i});"]
        for i, phys in enumerate(self.blobs):
            decl.append(f"\tvoid *blob{i};")
            alloc += [f"\t/* the blob the program places at {phys:#x} */",
                      f"\tblob{i} = (void *)get_zeroed_page(GFP_KERNEL);", f"\tok = ok && blob{i};"]
        if self.key_api:
            alloc += ["\tok = ok && !kho_radix_init_tree(&mine, NULL);"]
        else:
            alloc += ["\troot = (struct kho_radix_node *)get_zeroed_page(GFP_KERNEL);", "\tok = ok && root;"]
        root = "mine.root" if self.key_api else "root"
        body = [
            f"static void {p}_program(struct kunit *test)",
            "{",
            *decl,
            "",
            f"\tif (PAGE_SHIFT != {ps})",
            f'\t\tkunit_skip(test, "generated for PAGE_SHIFT {ps}");',
            "\tif (!kho_is_enabled())",
            '\t\tkunit_skip(test, "KHO is disabled (boot with kho=on)");',
            "",
            *alloc,
            '\tKUNIT_EXPECT_TRUE_MSG(test, ok, "the test could not allocate its pages");',
            "\tif (!ok)",
            "\t\tgoto out;",
            "",
            "\t/* run on an empty tree of the test's own */",
            "\tmutex_lock(&kho_out.radix_tree.lock);",
            "\tsaved = kho_out.radix_tree.root;",
            f"\tkho_out.radix_tree.root = {root};",
            "\tmutex_unlock(&kho_out.radix_tree.lock);",
            "",
        ]
        index = {id(s): i for i, s in enumerate(self.program.steps)}
        for step, result in zip(self.steps, self.expected.ops):
            n = index[id(step)]
            body.append(f"\t/* op {n}: {step.text()} */")
            if step.op in INT_OPS:
                body += [f"\trc = {self._call(step)};",
                         f'\tKUNIT_EXPECT_EQ_MSG(test, rc, {result.rc}, "op {n}: {_c_text(step.text())}");']
            else:
                body.append(f"\t{self._call(step)};")
        walk = (f"\tkho_radix_walk_tree(&kho_out.radix_tree, &(const struct kho_radix_walk_cb){{ .leaf = {p}_leaf }}, NULL);"
                if self.key_api else f"\tkho_radix_walk_tree(&kho_out.radix_tree, {p}_page);")
        if self.key_api:
            want = ["\t\tunsigned long key = k->region < 0 ? k->key :",
                    f"\t\t\t{p}_key(PFN_PHYS({p}_base[k->region]) + k->phys, k->order);", "",
                    "\t\tfor (j = 0; j < seen; j++)", "\t\t\tif (w->key[j] == key)", "\t\t\t\tbreak;",
                    '\t\tKUNIT_EXPECT_TRUE_MSG(test, j < seen, "the tree lacks key 0x%lx", key);']
        else:
            want = [f"\t\tphys_addr_t phys = k->region < 0 ? k->phys : PFN_PHYS({p}_base[k->region]) + k->phys;", "",
                    "\t\tfor (j = 0; j < seen; j++)", "\t\t\tif (w->phys[j] == phys && w->order[j] == k->order)",
                    "\t\t\t\tbreak;",
                    '\t\tKUNIT_EXPECT_TRUE_MSG(test, j < seen, "the tree lacks phys 0x%llx order %u",',
                    "\t\t\t\t      (unsigned long long)phys, k->order);"]
        body += [
            "",
            "\t/* the tree holds exactly the keys the model's does */",
            "\tw->n = 0;",
            walk,
            f'\tKUNIT_EXPECT_EQ_MSG(test, w->n, {p.upper()}_KEYS, "keys in the preservation tree");',
            "\tseen = min(w->n, ARRAY_SIZE(w->key));",
            f"\tfor (i = 0; i < {p.upper()}_KEYS; i++) {{",
            f"\t\tconst struct {p}_key *k = &{p}_tree[i];",
            *want,
            "\t}",
        ]
        body += self._fdt_checks()
        body += [
            "",
            "\tmutex_lock(&kho_out.radix_tree.lock);",
            f"\t{'mine.root' if self.key_api else 'root'} = kho_out.radix_tree.root;",
            "\tkho_out.radix_tree.root = saved;",
            "\tmutex_unlock(&kho_out.radix_tree.lock);",
            "out:",
        ]
        for i, _ in enumerate(self.blobs):
            body += [f"\tif (blob{i}) {{", f"\t\tkho_remove_subtree(blob{i});", f"\t\tfree_page((unsigned long)blob{i});", "\t}"]
        if self.key_api:
            body.append("\tkho_radix_destroy_tree(&mine);")
        else:
            body += ["\tif (root)", f"\t\t{p}_free(root, KHO_TREE_MAX_DEPTH - 1);"]
        for i, r in enumerate(self.regions):
            body += ([f"\tif (folio{i})", f"\t\tfolio_put(folio{i});"] if r.folio else
                     [f"\tif (block{i})", f"\t\t__free_pages(block{i}, {r.order});"])
        return body + ["}", ""]

    def _fdt_checks(self) -> list[str]:
        out = []
        for name in self.names:
            c_name = _c_string(name)
            msg = _c_text(name)
            find = f"fdt_subnode_offset(kho_out.fdt, 0, {c_name})"
            if name not in self.subtrees:
                out += ["", f"\t/* subtree {msg} of the outgoing FDT */",
                        f'\tKUNIT_EXPECT_LT_MSG(test, {find}, 0, "subtree {msg} must be gone");']
                continue
            out += ["", f"\t/* subtree {msg} of the outgoing FDT */", "\t{", f"\t\tint off = {find};",
                    "\t\tconst void *prop;", "\t\tint len;", ""]
            phys, size = self.subtrees[name]
            blob = self.blobs.index(phys) if phys in self.blobs else None
            want = f"virt_to_phys(blob{blob})" if blob is not None else f"{phys:#x}ULL"
            out += [f'\t\tKUNIT_EXPECT_GE_MSG(test, off, 0, "subtree {msg} must be there");', "\t\tif (off >= 0) {"]
            for prop, value in ((SUBTREE_PROPS[0], want), (SUBTREE_PROPS[1], f"{size:#x}ULL")):
                macro = "KHO_SUB_TREE_PROP_NAME" if prop == SUBTREE_PROPS[0] else "KHO_SUB_TREE_SIZE_PROP_NAME"
                out += [f"\t\t\tprop = fdt_getprop(kho_out.fdt, off, {macro}, &len);",
                        f"\t\t\tKUNIT_EXPECT_TRUE_MSG(test, prop && len == sizeof(u64) && get_unaligned((const u64 *)prop) == {value},",
                        f'\t\t\t\t\t      "subtree {msg}: {prop}");']
            out += ["\t\t}", "\t}"]
        return out


def _c_text(s: str) -> str:
    """``s`` for the inside of a C string literal that is also a printf format."""
    return _c_string(s)[1:-1].replace("%", "%%")


def finding_source(finding: Path) -> KernelSource:
    """The kernel source a finding was saved from: the cached source with its
    digest, else (a Debian release) fetched again."""
    meta = load_finding(finding)
    identity = meta.get("source") or {}
    for source in list_cached():
        if source.digest() == identity.get("digest"):
            return source
    if str(identity.get("provider", "")).startswith("debian:") and not identity.get("patches"):
        return fetch(identity.get("version", ""))
    raise KhoConformError(f"{finding}: its kernel source ({identity.get('provider', '?')}) is no longer in the cache; "
                          "pass --kernel, --kernel-tree or --patch to run the test on a kernel")
