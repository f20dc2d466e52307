"""The wire contract between Python and the C driver and runtime, defined once.

Everything both sides of the FFI must agree on is declared here, and the C
side is generated from it (``c_header()`` -> ``kc_contract.h``, included by
the driver, the runtime and the shims):

- the packed program: ``struct kc_header`` then ``struct kc_step[]``
  (the op kinds and limits of the op language, ``reference.program``);
- what a run leaves: each op's ``struct kc_answer``, the streams of
  frequent records (``Stream``), the other records (``struct kc_rec`` and
  its kinds, ``Rec``), the memblock call kinds (``Memblock``);
- the foreign handover image: ``struct kc_image`` then, per page,
  ``u64 phys`` and the page's bytes;
- the error codes and result conventions of ``reference.outcome``.

A struct is a list of (name, C type, count) fields; its ``struct`` format and
its C declaration are both derived from that list.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from enum import IntEnum
from operator import attrgetter

from reference.geometry import MAX_PAGE_ORDER
from reference.image import MemoryPages
from reference.outcome import ERRNO, PAIRS_FIELDS, Image
from reference.program import (
    ALLOC_SLOTS_OFFSET,
    AREA_ALLOC,
    AREA_HUGE,
    AREA_MAPPED,
    ARENA_BASE_PHYS,
    BOUNDS,
    FILLER_BLOB_BASE,
    FILLER_PAD,
    FILLER_PREFIX,
    MAX_ARENA_PAGES,
    MAX_NAME,
    MAX_NUMA_RANGES,
    MAX_RAM_PFN,
    MAX_RAM_RANGES,
    MAX_SCRATCH,
    NOT_RUN,
    OPERANDS,
    SLOTS,
    U64,
    VMALLOC_BYTES,
    VMALLOC_DESCRIPTOR_BYTES,
    VMALLOC_SLOTS_OFFSET,
    WARN_CAP,
    Op,
    Program,
    ProgramError,
    is_vm_area,
)


class Rec(IntEnum):
    """Record kinds: what a run reports besides its answers and streams, in
    order (``struct kc_rec``)."""

    WARN = 2  # a = text offset of "func:line: cond"
    LOG = 3  # a = text offset
    MEMBLOCK = 4  # a = base, b = size, c = Memblock kind (one without a Stream)
    EVENT = 9  # a = text offset: fault, timeout, sanitizer report, out-of-arena access
    STATE = 10  # a = root phys, b = fdt phys, c = arena high-water mark (pages)
    BOOT = 11  # a = rc of the old kernel's KHO init
    SANITIZER = 12  # a = text offset of "kind\tfile\tline\tcolumn\tdetail", b = 1 if it ended the op (ASan), c = code address
    VMAP = 13  # a = first pfn, b = count: a run of pages a restored vmalloc area maps, in order


class Stream(IntEnum):
    """What a run reports by the million, kept by the runtime apart from the
    records, each as one array of u64 words that Python takes with one copy
    (``kc_stream``): the next kernel's pair lists, named as NextBoot's
    fields (``PAIRS_FIELDS``), the nodes its walk visited and the struct
    pages outside RAM its memory init asked for. Each op's
    answer is kept apart too, in its own slot (``kc_answers``)."""

    WALK = 0  # phys, order: a leaf the next kernel's walk found
    RESERVED = 1  # base, size: memblock_reserve
    NOINIT = 2  # base, size: memblock_reserved_mark_noinit
    SCRATCH_MARKS = 3  # base, size: memblock_mark_kho_scratch
    MAGIC = 4  # pfn, order: a walked head page that carries KHO's magic
    WALK_NODE = 5  # phys: a node the walk visited
    PHANTOM = 6  # pfn: a struct page asked for outside RAM during memory init


PAIR_STREAMS = {name: Stream[name.upper()] for name in PAIRS_FIELDS}
class Memblock(IntEnum):
    """memblock calls the runtime records (``Rec.MEMBLOCK``)."""

    RESERVE = 1
    NOINIT = 2
    ADD = 3
    SCRATCH = 4
    FREE = 5


OP_BOOT = 0xFFFFFFFF  # a record's op index outside any op: boot, or the end state
# CPU time (ms) one op of kernel code may take before it counts as running
# away, per build flavor. Sanitizer builds run the same code about four times
# slower. Fuzzing trades the budget for executions: an op the model does not
# foresee as slow (reference.outcome.SLOW_WORK) takes under 0.13 s even in the
# fuzz flavor, and a foreseen timeout then costs 0.5 s instead of 4.
CPU_BUDGET_MS = {"plain": 1000, "coverage": 1000, "asan": 4000, "fuzz": 500}

_CTYPES = {"u32": ("kc_u32", "I"), "u64": ("kc_u64", "Q"), "range": ("struct kc_range", "QQ"), "char": ("char", "s")}
Field = tuple[str, str, int]  # name, type, count (0: a scalar)

HEADER_FIELDS: tuple[Field, ...] = (
    ("page_shift", "u32", 0), ("n_ram", "u32", 0), ("n_numa", "u32", 0), ("n_scratch", "u32", 0),
    ("fail_alloc", "u64", 0), ("arena_pages", "u64", 0),
    ("ram", "range", MAX_RAM_RANGES),  # start_pfn, end_pfn
    ("numa", "range", MAX_NUMA_RANGES),  # start_pfn, nid
    ("scratch", "range", MAX_SCRATCH),  # phys, size
)
STEP_FIELDS: tuple[Field, ...] = (
    # is_vm_area: preserve_vmalloc's operands describe a vmalloc area
    # (reference.program.is_vm_area, decided here once for both sides)
    ("op", "u32", 0), ("is_vm_area", "u32", 0),
    ("a", "u64", 0), ("b", "u64", 0), ("c", "u64", 0), ("d", "u64", 0), ("e", "u64", 0),
    ("name", "char", MAX_NAME + 1),
)
REC_FIELDS: tuple[Field, ...] = (("kind", "u32", 0), ("op", "u32", 0), ("a", "u64", 0), ("b", "u64", 0), ("c", "u64", 0))
# An op's answer: rc (a long; NOT_RUN: the op left none), value, value2.
ANSWER_FIELDS: tuple[Field, ...] = (("rc", "u64", 0), ("value", "u64", 0), ("value2", "u64", 0))
IMAGE_FIELDS: tuple[Field, ...] = (
    ("fdt_phys", "u64", 0), ("scratch_phys", "u64", 0), ("scratch_len", "u64", 0), ("npages", "u64", 0),
    ("arena_hwm", "u64", 0),  # arena pages [0, arena_hwm) stay the old kernel's
)


def _format(fields: Iterable[Field]) -> str:
    out = "<"
    for _, ctype, count in fields:
        code = _CTYPES[ctype][1]
        out += f"{count}s" if ctype == "char" else code * max(count, 1)
    return out


HEADER = struct.Struct(_format(HEADER_FIELDS))
STEP = struct.Struct(_format(STEP_FIELDS))
REC = struct.Struct(_format(REC_FIELDS))
ANSWER = struct.Struct(_format(ANSWER_FIELDS))
IMAGE = struct.Struct(_format(IMAGE_FIELDS))
PAGE_PHYS = struct.Struct("<Q")  # before each page of an image


def _pairs(items: tuple[tuple[int, int], ...], n: int) -> list[int]:
    flat = [x for pair in items for x in pair]
    return flat + [0] * (2 * n - len(flat))


_BOUNDED = frozenset(op for op, names in OPERANDS.items() if set(names) & BOUNDS.keys())  # ops with a bounded operand
_CHECKED = _BOUNDED | {Op.PRESERVE_VMALLOC}  # ops whose operands are looked at before packing
_STEP_FIELDS = attrgetter("op", "a", "b", "c", "d", "e", "name")


def pack_program(p: Program) -> bytearray:
    """The binary form the driver's ``kc_run`` reads."""
    h = p.header
    # One buffer, filled a step at a time: a program of 10^6 steps is 107 MiB.
    out = bytearray(HEADER.size + STEP.size * len(p.steps))
    HEADER.pack_into(out, 0, h.page_shift, len(h.ram), len(h.numa), len(h.scratch), h.fail_alloc, h.arena_pages,
                     *_pairs(h.ram, MAX_RAM_RANGES), *_pairs(h.numa, MAX_NUMA_RANGES), *_pairs(h.scratch, MAX_SCRATCH))
    pack_step, off, size = STEP.pack_into, HEADER.size, STEP.size
    names = {"": b""}
    for s in p.steps:
        op, a, b, c, d, e, name = _STEP_FIELDS(s)
        area = False
        if op in _CHECKED:
            if op in _BOUNDED:
                for operand, value in s.operands().items():
                    if operand in BOUNDS and not 0 <= int(value) < BOUNDS[operand]:
                        raise ProgramError(f"{s.text()}: {operand} must be below {BOUNDS[operand]}")
            area = op == Op.PRESERVE_VMALLOC and is_vm_area(h, b, c, d, e)
        encoded = names.get(name)
        if encoded is None:
            encoded = names[name] = name.encode()
        try:
            pack_step(out, off, op, area, a, b, c, d, e, encoded)
        except struct.error:  # an operand outside u64 (only these fail): packed as the u64 it wraps to
            pack_step(out, off, op, area, a & U64, b & U64, c & U64, d & U64, e & U64, encoded)
        off += size
    return out


def pack_image(image: Image, page_size: int) -> bytearray:
    """A handover image made elsewhere, as the driver lays it into its arena:
    every page of the old kernel's memory it holds (tree pages, the rest of
    the arena, the scratch descriptors' page, the FDT page)."""
    return pack_memory(image.fdt_phys, image.scratch_phys, len(image.scratch), image.arena_hwm, MemoryPages(image),
                       page_size)


def pack_memory(fdt_phys: int, scratch_phys: int, scratch_len: int, arena_hwm: int,
                pages: Mapping[int, bytes | bytearray | memoryview], page_size: int) -> bytearray:
    """``pack_image`` of an image given as its pages, each as it lies in
    memory (the scratch descriptors and the FDT in their pages)."""
    # One buffer, filled a page at a time: an image of 10^6 keys is 128 MiB.
    out = bytearray(IMAGE.size + len(pages) * (PAGE_PHYS.size + page_size))  # zeros: short pages padded
    IMAGE.pack_into(out, 0, fdt_phys, scratch_phys, scratch_len, len(pages), arena_hwm)
    off = IMAGE.size
    for phys in sorted(pages):
        PAGE_PHYS.pack_into(out, off, phys & U64)
        data = pages[phys][:page_size]
        out[off + PAGE_PHYS.size : off + PAGE_PHYS.size + len(data)] = data
        off += PAGE_PHYS.size + page_size
    return out


def _c_struct(name: str, fields: tuple[Field, ...], size: int) -> str:
    lines = [f"struct {name} {{"]
    lines += [f"\t{_CTYPES[ctype][0]} {fname}{f'[{count}]' if count else ''};" for fname, ctype, count in fields]
    lines += ["} __attribute__((packed));", f'_Static_assert(sizeof(struct {name}) == {size}, "{name} layout");']
    return "\n".join(lines)


def _c_enum(name: str, prefix: str, members: Iterable[tuple[str, int]]) -> str:
    body = "\n".join(f"\t{prefix}{m} = {v}," for m, v in members)
    return f"enum {name} {{\n{body}\n}};"


def c_header() -> str:
    """``kc_contract.h``: the C side of this module, for every C file of the
    native stage. No <stdint.h>: the driver is built -nostdinc inside the
    kernel unit."""
    errnos = "\n".join(f"#ifndef {n}\n#define {n} {v}\n#endif" for n, v in sorted(ERRNO.items(), key=lambda kv: kv[1]))
    budgets = "".join(f"#define KC_BUDGET_MS_{flavor.upper()} {ms}\n" for flavor, ms in CPU_BUDGET_MS.items())
    return f"""/* Generated from conformance/native/contract.py: do not edit. */
#ifndef KC_CONTRACT_H
#define KC_CONTRACT_H
#define KC_ARENA_BASE_PHYS {ARENA_BASE_PHYS:#x}ULL
#define KC_MAX_RAM_PFN {MAX_RAM_PFN:#x}ULL
#define KC_MAX_ARENA_PAGES {MAX_ARENA_PAGES}
#define KC_MAX_RAM_RANGES {MAX_RAM_RANGES}
#define KC_MAX_NUMA_RANGES {MAX_NUMA_RANGES}
#define KC_MAX_SCRATCH {MAX_SCRATCH}
#define KC_MAX_NAME {MAX_NAME}
#define KC_NOT_RUN ({NOT_RUN})
#define KC_WARN_CAP {WARN_CAP}
#define KC_OP_BOOT {OP_BOOT:#x}u
{budgets}#define KC_FILLER_PREFIX "{FILLER_PREFIX}"
#define KC_FILLER_PAD '{FILLER_PAD}'
#define KC_FILLER_BLOB_BASE {FILLER_BLOB_BASE:#x}ULL
#define KC_MAX_PAGE_ORDER {MAX_PAGE_ORDER}
#define KC_SLOTS {SLOTS}
#define KC_ALLOC_SLOTS_OFFSET {ALLOC_SLOTS_OFFSET}
#define KC_VMALLOC_SLOTS_OFFSET {VMALLOC_SLOTS_OFFSET}
#define KC_VMALLOC_DESCRIPTOR_BYTES {VMALLOC_DESCRIPTOR_BYTES}
#define KC_AREA_ALLOC {AREA_ALLOC}
#define KC_AREA_HUGE {AREA_HUGE}
#define KC_AREA_MAPPED {AREA_MAPPED}
#define KC_VMALLOC_BYTES {VMALLOC_BYTES:#x}ULL
{errnos}
{_c_enum("kc_op", "KC_", ((k.name, int(k)) for k in Op))}
{_c_enum("kc_rec_kind", "KC_REC_", ((k.name, int(k)) for k in Rec))}
{_c_enum("kc_memblock_kind", "KC_MB_", ((k.name, int(k)) for k in Memblock))}
{_c_enum("kc_stream", "KC_STREAM_", ((k.name, int(k)) for k in Stream))}
#define KC_NSTREAMS {len(Stream)}
typedef unsigned int kc_u32;
typedef unsigned long long kc_u64;
struct kc_range {{ kc_u64 a, b; }};
{_c_struct("kc_header", HEADER_FIELDS, HEADER.size)}
{_c_struct("kc_step", STEP_FIELDS, STEP.size)}
{_c_struct("kc_rec", REC_FIELDS, REC.size)}
{_c_struct("kc_answer", ANSWER_FIELDS, ANSWER.size)}
{_c_struct("kc_image", IMAGE_FIELDS, IMAGE.size)}
#endif
"""


def cdef() -> str:
    """The cffi declarations of the driver's entry points (kept beside the
    layouts they read and write)."""
    return """
    int kc_run(const void *program, unsigned long len, const void *image, unsigned long image_len);
    const void *kc_records(unsigned long *n);
    const unsigned long long *kc_stream(unsigned int stream, unsigned long *n);
    const void *kc_answers(unsigned long *n);
    const char *kc_text_buffer(unsigned long *n);
    const unsigned char *kc_snapshot_pages(unsigned long *n);
    int kc_page_shift(void);
    void kc_abi_constants(unsigned long long *out);
    unsigned long long kc_encode_key(unsigned long long phys, unsigned int order);
    unsigned long long kc_decode_key(unsigned long long key, unsigned int *order);
    """
