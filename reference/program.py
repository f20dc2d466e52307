"""The op language: one definition shared by the model, the native driver, the
fuzzers and the corpus.

A program is a header (page shift, RAM layout, NUMA layout, scratch areas,
fault injection, arena size) and a list of ops. Ops before ``kexec`` run in the
old kernel, ops after it in the next kernel.

Two forms, both lossless: ``Program`` objects (this module) and the text
form, one op per line, which traces print and people write. (The packed form
the kernel's C code reads is the native stage's: conformance/native/contract.py.)

Physical memory model shared by both implementations: the old kernel allocates
tree nodes, the FDT page and its other pages from an *arena* of
``arena_pages`` pages starting at ``ARENA_BASE_PHYS``. Arena page 0 is the
*handover page*: the scratch descriptor array, then what the program's
caller keeps across kexec of the memory it preserved through the API (the
pointers ``alloc_preserve`` returned and the ``struct kho_vmalloc``
descriptors, one per slot). Allocations start at arena page 1: a single page
is the lowest free one, a block of 2^k pages the lowest free naturally
aligned one. The arena is always RAM, in addition to the ``ram`` ranges of
the header.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from enum import IntEnum

from .geometry import PAGE_SHIFTS, geometry

ARENA_BASE_PHYS = 0x4000_0000  # 1 GiB: aligned for every supported page size
MAX_RAM_RANGES = 8
MAX_NUMA_RANGES = 8
MAX_SCRATCH = 4
MAX_NAME = 63  # subtree names; the packed record keeps a NUL after them
# RAM (and so the kernel's memmap) must lie below this pfn; ops may still name
# any pfn: outside RAM a pfn is only a number.
MAX_RAM_PFN = 1 << 28
MAX_ARENA_PAGES = 1 << 18
# The handover page (arena page 0): byte offsets of the caller's slots.
SLOTS = 16  # of each kind; ops name a slot 0..SLOTS-1
ALLOC_SLOTS_OFFSET = 256  # u64 phys of alloc_preserve's memory, 0 for none
VMALLOC_SLOTS_OFFSET = 512  # struct kho_vmalloc, VMALLOC_DESCRIPTOR_BYTES each
VMALLOC_DESCRIPTOR_BYTES = 16
# preserve_vmalloc's area: vm_flags bits, standing for the kernel's VM_*
# flags of the area (the vmalloc allocator's, not KHO's).
AREA_ALLOC = 1  # VM_ALLOC: made by vmalloc()
AREA_HUGE = 2  # VM_ALLOW_HUGE_VMAP: may be mapped with huge pages (order > 0)
AREA_MAPPED = 4  # VM_MAP: made by vmap(), which KHO does not preserve
AREA_FLAGS = AREA_ALLOC | AREA_HUGE | AREA_MAPPED
# The pages array of an area is built page by page: the op language's limit.
MAX_VMALLOC_PAGES = 1 << 16
# The next kernel's vmalloc address space, where restored areas are placed
# (x86-64 with 4-level paging: 32 TiB).
VMALLOC_BYTES = 1 << 45
# The op never ran: an earlier op faulted or exhausted its CPU budget.
NOT_RUN = -1001
# Warnings kept per op, by both implementations: a runaway loop can warn
# millions of times, and the count past this tells nothing more.
WARN_CAP = 64


class Op(IntEnum):
    """Op kinds. Operand meaning per kind is in ``OPERANDS``."""

    PRESERVE_FOLIO = 1
    UNPRESERVE_FOLIO = 2
    PRESERVE_PAGES = 3
    UNPRESERVE_PAGES = 4
    RADIX_ADD = 5  # direct radix API, by (pfn, order)
    RADIX_DEL = 6
    RADIX_ADD_KEY = 7  # direct radix API, by raw key (key-API kernels only)
    RADIX_DEL_KEY = 8
    ADD_SUBTREE = 9
    REMOVE_SUBTREE = 10
    # Corruption of the handover image in transit: applied at kexec, in op
    # order, so the old kernel never runs on a corrupted state.
    POKE_ARENA = 11  # write a u64 into an arena page
    POKE_FDT = 12  # write a byte of the FDT page
    KEXEC = 13
    RESTORE_FOLIO = 14
    RESTORE_PAGES = 15
    RETRIEVE_SUBTREE = 16
    # add_subtree repeated: ``count`` subtrees named ``filler_name(first + i,
    # name_len)`` with blob ``filler_blob(first + i)`` and size first + i,
    # stopping at the first that fails: fills the FDT page in one op.
    FILL_FDT = 17
    # The rest of the public API (include/linux/kexec_handover.h). Queries
    # run in either kernel; ``slot`` names a record on the handover page.
    IS_KHO_ENABLED = 18
    IS_KHO_BOOT = 19
    SCRATCH_OVERLAP = 20  # kho_scratch_overlap: 7.3 on; refused (-EOPNOTSUPP) before
    ALLOC_PRESERVE = 21  # kho_alloc_preserve(size); the memory's phys kept in alloc slot
    UNPRESERVE_FREE = 22  # kho_unpreserve_free of the alloc slot's memory; the slot is emptied
    RESTORE_FREE = 23  # kho_restore_free of the alloc slot's memory, in the next kernel
    # kho_preserve_vmalloc of the area of nr_pages pages from pfn, mapped in
    # blocks of 2^order pages, with vm_flags (AREA_*), into vmalloc slot.
    # A (pfn, nr_pages, order, vm_flags) no vmalloc area can have is a
    # pointer to no area (is_vm_area).
    PRESERVE_VMALLOC = 24
    UNPRESERVE_VMALLOC = 25  # the descriptor in the slot; the slot is emptied
    RESTORE_VMALLOC = 26  # kho_restore_vmalloc of the slot's descriptor


# text-form name -> (kind, operand names). "name" is the subtree name string.
OPERANDS: dict[Op, tuple[str, ...]] = {
    Op.PRESERVE_FOLIO: ("pfn", "order"),
    Op.UNPRESERVE_FOLIO: ("pfn", "order"),
    Op.PRESERVE_PAGES: ("pfn", "nr_pages"),
    Op.UNPRESERVE_PAGES: ("pfn", "nr_pages"),
    Op.RADIX_ADD: ("pfn", "order"),
    Op.RADIX_DEL: ("pfn", "order"),
    Op.RADIX_ADD_KEY: ("key",),
    Op.RADIX_DEL_KEY: ("key",),
    Op.ADD_SUBTREE: ("name", "phys", "size"),
    Op.REMOVE_SUBTREE: ("phys",),
    Op.POKE_ARENA: ("arena_page", "word", "value"),
    Op.POKE_FDT: ("offset", "value"),
    Op.KEXEC: (),
    Op.RESTORE_FOLIO: ("phys",),
    Op.RESTORE_PAGES: ("phys", "nr_pages"),
    Op.RETRIEVE_SUBTREE: ("name",),
    Op.FILL_FDT: ("first", "count", "name_len"),
    Op.IS_KHO_ENABLED: (),
    Op.IS_KHO_BOOT: (),
    Op.SCRATCH_OVERLAP: ("phys", "size"),
    Op.ALLOC_PRESERVE: ("slot", "size"),
    Op.UNPRESERVE_FREE: ("slot",),
    Op.RESTORE_FREE: ("slot",),
    Op.PRESERVE_VMALLOC: ("slot", "pfn", "nr_pages", "order", "vm_flags"),
    Op.UNPRESERVE_VMALLOC: ("slot",),
    Op.RESTORE_VMALLOC: ("slot",),
}
# Operands with a bounded range (the parser refuses others, the decoder
# folds into it).
BOUNDS = {"slot": SLOTS, "vm_flags": AREA_FLAGS + 1}

OLD_KERNEL_OPS = frozenset(
    {
        Op.PRESERVE_FOLIO, Op.UNPRESERVE_FOLIO, Op.PRESERVE_PAGES, Op.UNPRESERVE_PAGES,
        Op.RADIX_ADD, Op.RADIX_DEL, Op.RADIX_ADD_KEY, Op.RADIX_DEL_KEY,
        Op.ADD_SUBTREE, Op.REMOVE_SUBTREE, Op.POKE_ARENA, Op.POKE_FDT, Op.FILL_FDT,
        Op.ALLOC_PRESERVE, Op.UNPRESERVE_FREE, Op.PRESERVE_VMALLOC, Op.UNPRESERVE_VMALLOC,
    }
)
NEW_KERNEL_OPS = frozenset({Op.RESTORE_FOLIO, Op.RESTORE_PAGES, Op.RETRIEVE_SUBTREE, Op.RESTORE_FREE, Op.RESTORE_VMALLOC})
QUERY_OPS = frozenset({Op.IS_KHO_ENABLED, Op.IS_KHO_BOOT, Op.SCRATCH_OVERLAP})  # either kernel

U64 = (1 << 64) - 1

# fill_fdt's subtrees: "fill<index>" padded with '-' to name_len (at most MAX_NAME).
FILLER_PREFIX = "fill"
FILLER_PAD = "-"
FILLER_BLOB_BASE = 0x7000_0000_0000  # blob address of filler 0; filler i's is i pages above


def filler_name(index: int, name_len: int) -> str:
    return f"{FILLER_PREFIX}{index}".ljust(min(name_len, MAX_NAME), FILLER_PAD)


def filler_blob(index: int, page_shift: int) -> int:
    return (FILLER_BLOB_BASE + (index << page_shift)) & U64


@dataclass(frozen=True, slots=True)  # slots: a program may hold 10^6 steps
class Step:
    """One op. Integer operands are u64 (``a`` to ``e`` in operand order,
    skipping ``name``); ``name`` is the subtree name, or ''."""

    op: Op
    a: int = 0
    b: int = 0
    c: int = 0
    d: int = 0
    e: int = 0
    name: str = ""

    def operands(self) -> dict[str, int | str]:
        values = iter((self.a, self.b, self.c, self.d, self.e))
        return {n: (self.name if n == "name" else next(values)) for n in OPERANDS[self.op]}

    def text(self) -> str:
        parts = [self.op.name.lower()]
        for n, v in self.operands().items():
            if n == "name":
                parts.append(_quote(str(v)))
            elif n in ("order", "word", "slot", "name_len", "vm_flags"):
                parts.append(str(v))
            else:
                parts.append(hex(int(v)))
        return " ".join(parts)


@dataclass(frozen=True)
class Header:
    page_shift: int = 12
    ram: tuple[tuple[int, int], ...] = ((0, 1 << 20),)  # [start_pfn, end_pfn)
    numa: tuple[tuple[int, int], ...] = ((0, 0),)  # (start_pfn, nid), sorted by pfn
    scratch: tuple[tuple[int, int], ...] = ()  # (phys, size) of old-kernel scratch areas
    fail_alloc: int = 0  # 1-based index of the page allocation that fails; 0: none
    arena_pages: int = 256

    def nid_of(self, pfn: int) -> int:
        nid = 0
        for start, n in self.numa:
            if start <= pfn:
                nid = n
            else:
                break
        return nid

    def arena_range(self) -> tuple[int, int]:
        """[first, end) pfn of the arena."""
        first = ARENA_BASE_PHYS >> self.page_shift
        return first, first + self.arena_pages

    def is_ram(self, pfn: int) -> bool:
        first = ARENA_BASE_PHYS >> self.page_shift
        if first <= pfn < first + self.arena_pages:
            return True
        for start, end in self.ram:  # a loop: this module is not compiled, and the model asks per page
            if start <= pfn < end:
                return True
        return False

    def all_ram(self, pfn: int, n: int) -> bool:
        """Every pfn of [pfn, pfn + n) is RAM (the ranges may abut)."""
        end = pfn + n
        for s, e in sorted((self.arena_range(), *self.ram)):
            if s > pfn:
                break
            pfn = max(pfn, e)
        return pfn >= end

    def validate(self) -> None:
        """Raise ProgramError if the header is outside what the native runtime models."""
        if self.page_shift not in PAGE_SHIFTS:
            raise ProgramError(f"page_shift {self.page_shift}: use one of {', '.join(map(str, PAGE_SHIFTS))}")
        if not 2 <= self.arena_pages <= MAX_ARENA_PAGES:
            raise ProgramError(f"arena_pages {self.arena_pages}: use 2..{MAX_ARENA_PAGES}")
        if len(self.ram) > MAX_RAM_RANGES or len(self.numa) > MAX_NUMA_RANGES:
            raise ProgramError(f"at most {MAX_RAM_RANGES} ram and {MAX_NUMA_RANGES} numa ranges")
        if len(self.scratch) > MAX_SCRATCH:
            raise ProgramError(f"at most {MAX_SCRATCH} scratch areas")
        for s, e in self.ram:
            if not 0 <= s <= e <= MAX_RAM_PFN:
                raise ProgramError(f"ram range {s:#x}..{e:#x} must lie in [0, {MAX_RAM_PFN:#x}]")
        starts = [s for s, _ in self.numa]
        if starts != sorted(starts):
            raise ProgramError("numa ranges must be sorted by start pfn")
        lo, hi = self.arena_range()
        if hi > MAX_RAM_PFN:
            raise ProgramError("arena does not fit below MAX_RAM_PFN at this page shift")


def is_vm_area(header: Header, pfn: int, nr_pages: int, order: int, vm_flags: int) -> bool:
    """Whether a vmalloc area can have these pages (else preserve_vmalloc
    is handed a pointer to no area): 1..MAX_VMALLOC_PAGES pages of RAM from
    pfn, mapped in naturally aligned blocks of 2^order pages; an order above
    0 needs AREA_HUGE and is at most a PMD's (vmalloc maps no larger page)."""
    if not 1 <= nr_pages <= MAX_VMALLOC_PAGES or order > geometry(header.page_shift).huge_vmap_order:
        return False
    if order and not vm_flags & AREA_HUGE:
        return False
    block = 1 << order
    return not nr_pages % block and not pfn % block and header.all_ram(pfn, nr_pages)


@dataclass(frozen=True)
class Program:
    header: Header = field(default_factory=Header)
    steps: tuple[Step, ...] = ()

    def text(self) -> str:
        return format_program(self)

    def kexec_index(self) -> int | None:
        for i, s in enumerate(self.steps):
            if s.op == Op.KEXEC:
                return i
        return None


class ProgramError(ValueError):
    """A program that cannot be parsed or is outside the modelled domain."""


def _quote(s: str) -> str:
    return shlex.quote(s) if s else "''"


def format_program(p: Program) -> str:
    h = p.header
    lines = [f"page_shift {h.page_shift}", f"arena_pages {h.arena_pages}"]
    lines += [f"ram {s:#x} {e:#x}" for s, e in h.ram]
    lines += [f"numa {s:#x} {n}" for s, n in h.numa]
    lines += [f"scratch {a:#x} {z:#x}" for a, z in h.scratch]
    if h.fail_alloc:
        lines.append(f"fail_alloc {h.fail_alloc}")
    lines.append("---")
    lines += [s.text() for s in p.steps]
    return "\n".join(lines) + "\n"


_CONTINUATION = re.compile(r"\\\r?\n[ \t]*")


def parse_program(text: str) -> Program:
    """Parse the text form. Header lines come before ``---``; a header line
    that is absent keeps its default, except that any ``ram``/``numa`` line
    replaces the default list. A line ending in a backslash continues on
    the next, whose indentation is dropped (long ops folded in a mail)."""
    text = _CONTINUATION.sub("", text)
    head: dict = {}
    lists: dict[str, list] = {"ram": [], "numa": [], "scratch": []}
    steps: list[Step] = []
    in_ops = False
    names = {k.name.lower(): k for k in Op}
    for lineno, raw in enumerate(text.splitlines(), 1):
        try:
            words = shlex.split(raw, comments=True)
        except ValueError as unquoted:  # one name per type: compiled, a name keeps its first type
            raise ProgramError(f"line {lineno}: {unquoted}") from None
        if not words:
            continue
        if words == ["---"]:
            in_ops = True
            continue
        key, args = words[0].lower(), words[1:]
        try:
            if key in names:
                in_ops = True
                steps.append(_parse_step(names[key], args))
            elif in_ops:
                raise ProgramError(f"unknown op {key!r}")
            elif key in lists:
                lists[key].append(tuple(int(x, 0) for x in args[:2]))
            elif key in ("page_shift", "fail_alloc", "arena_pages"):
                head[key] = int(args[0], 0)
            else:
                raise ProgramError(f"unknown header line {key!r}")
        except (IndexError, ValueError) as bad:
            raise ProgramError(f"line {lineno}: {raw.strip()!r}: {bad}") from None
    for k, v in lists.items():
        if v:
            head[k] = tuple(v)
    header = Header(**head)
    header.validate()
    return Program(header, tuple(steps))


def _parse_step(op: Op, args: list[str]) -> Step:
    want = OPERANDS[op]
    if len(args) != len(want):
        raise ProgramError(f"{op.name.lower()} takes {len(want)} operands: {' '.join(want)}")
    name = ""
    ints: list[int] = []
    for n, v in zip(want, args):
        if n == "name":
            name = v
        else:
            x = int(v, 0)
            if not 0 <= x <= U64:
                raise ProgramError(f"{n} {v} is not a u64")
            if x >= BOUNDS.get(n, U64 + 1):
                raise ProgramError(f"{n} {v}: use 0..{BOUNDS[n] - 1}")
            ints.append(x)
    if len(name.encode()) > MAX_NAME:
        raise ProgramError(f"subtree name longer than {MAX_NAME} bytes")
    a, b, c, d, e = (*ints, 0, 0, 0, 0, 0)[:5]
    return Step(op, a, b, c, d, e, name)
