"""The FFI binding: a built library of the kernel's KHO code, driven from
Python with one call per program, its records turned into the same
``Outcome`` the model gives.
"""

from __future__ import annotations

import functools
import os
import re
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from cffi import FFI

from reference import shortcuts
from reference.arena import words_from_bytes, words_to_bytes
from reference.collector import collector_paused
from reference.fdt import Fdt
from reference.geometry import geometry
from reference.image import PageStore
from reference.outcome import Image, NextBoot, OpResult, Outcome, Pairs, SanitizerReport, TreeNode
from reference.program import ARENA_BASE_PHYS, NOT_RUN, Header, Op, Program, Step
from reference.tree import leaf_bits, traverse

from ..errors import KhoConformError
from ..source.tree_files import KHO_C
from .build import SANITIZED_FLAVORS, Build, line_hash
from .contract import ANSWER, OP_BOOT, PAIR_STREAMS, REC, Rec, Stream, cdef, pack_image, pack_memory, pack_program
from .extract import C_DIR
from .sanitizer import symbolize

_ffi = FFI()
_ffi.cdef(cdef())
_KHO_FRAME = re.compile(r"kexec_handover\.c:(\d+)")


def _signed(x: int) -> int:
    return x - (1 << 64) if x >> 63 else x


class NativeKernel:
    """The kernel's KHO code, built for one source, page shift and flavor."""

    def __init__(self, build: Build) -> None:
        if build.flavor in SANITIZED_FLAVORS and not os.environ.get("LD_PRELOAD"):
            raise KhoConformError(f"the {build.flavor} flavor must run in a process started with its sanitizer runtime preloaded; use the kho-conform CLI")
        self.build = build
        self.lib = _load(str(build.library))
        self.page_shift = self.lib.kc_page_shift()
        self.page_size = 1 << self.page_shift

    def run(self, program: Program, next_kernel: NativeKernel | None = None) -> Outcome:
        """The kernel's outcome of ``program``; after kexec, ``next_kernel``'s
        (default: this build's)."""
        return self.run_parts(program, next_kernel)[0]

    def run_parts(self, program: Program, next_kernel: NativeKernel | None = None, *,
                  like: Outcome | None = None) -> tuple[Outcome, Outcome | None]:
        """The kernel's outcome of ``program``, and the next kernel's run
        within it, as ``restore`` returned it (None: no handover). ``like``:
        the model's outcome of the same program, whose tree is taken for the
        kernel's when the pages it was read from are the same (``_same_tree``).

        Two calls of the kernel's code: the old kernel's ends at kexec,
        which leaves the handover image; the next kernel boots from that
        image as from any other (``restore``). So the next kernel knows only
        what crossed kexec, be it this build's or another version's."""
        with collector_paused():
            return self._run_parts(program, next_kernel, like)

    def _run_parts(self, program: Program, next_kernel: NativeKernel | None,
                   like: Outcome | None) -> tuple[Outcome, Outcome | None]:
        old, memory = self._run_old(program, like)
        k = program.kexec_index()
        if k is None or old.image is None or old.ops[k].rc != NOT_RUN:
            return old, None  # no kexec, the old kernel was cut short before it, or KHO is disabled (it ran on)
        image = old.image
        if shortcuts.ENABLED:  # its pages as they lie in memory, not rebuilt from the image's words
            packed = pack_memory(image.fdt_phys, image.scratch_phys, len(image.scratch), image.arena_hwm, memory,
                                 self.page_size)
        else:
            packed = pack_image(image, self.page_size)
        new = (next_kernel or self).restore_packed(packed, program.header, program.steps[k + 1 :])
        return replace(
            old, ops=old.ops[:k] + new.ops, next=new.next,
            events=old.events + new.events, event_ops=old.event_ops + tuple(k + (at or 0) for at in new.event_ops),
            reports=old.reports + tuple(replace(r, op=k + (r.op or 0)) for r in new.reports),
            log=old.log + new.log,
        ), new

    def _run_old(self, program: Program, like: Outcome | None = None) -> tuple[Outcome, dict[int, memoryview | bytes]]:
        """The old kernel's run: up to and including its kexec, which records
        the image and ends the run (the ops after it are NOT_RUN); and the
        pages its image holds, read in place (valid until the next run)."""
        if program.header.page_shift != self.page_shift:
            raise KhoConformError(f"program is for page shift {program.header.page_shift}, library for {self.page_shift}")
        blob = pack_program(program)
        if self.lib.kc_run(_ffi.from_buffer(blob), len(blob), _ffi.NULL, 0):
            raise KhoConformError("the driver refused the program header")
        return self._outcome(program.header, foreign=False, like=like)

    def abi_constants(self) -> dict[str, int]:
        """Depth, table and bitmap sizes and key width as the tree's code defines them."""
        out = _ffi.new("unsigned long long[6]")
        self.lib.kc_abi_constants(out)
        names = ("depth", "table_log2", "bitmap_log2", "key_width", "node_bytes", "leaf_bytes")
        return dict(zip(names, out))

    def encode_key(self, phys: int, order: int) -> int:
        return self.lib.kc_encode_key(phys, order)

    def decode_key(self, key: int) -> tuple[int, int]:
        order = _ffi.new("unsigned int *")
        phys = self.lib.kc_decode_key(key, order)
        return phys, order[0]

    def restore(self, image: Image, header: Header, steps: tuple[Step, ...]) -> Outcome:
        """Boot the next kernel from an image made elsewhere, then run the
        (next-kernel) steps. The outcome's ops[0] is the kexec."""
        return self.restore_packed(pack_image(image, self.page_size), header, steps)

    def restore_packed(self, img: bytes | bytearray, header: Header, steps: tuple[Step, ...]) -> Outcome:
        """``restore`` of an image already packed (``contract.pack_image``)."""
        program = Program(header, (Step(Op.KEXEC), *steps))
        blob = pack_program(program)
        if self.lib.kc_run(_ffi.from_buffer(blob), len(blob), _ffi.from_buffer(img), len(img)):
            raise KhoConformError("the driver refused the program header")
        return self._outcome(header, foreign=True)[0]

    def _outcome(self, header: Header, foreign: bool,
                 like: Outcome | None = None) -> tuple[Outcome, dict[int, memoryview | bytes]]:
        n = _ffi.new("unsigned long *")
        recs = self.lib.kc_records(n)
        records = struct.iter_unpack(REC.format, _ffi.buffer(recs, n[0] * REC.size)) if n[0] else ()
        tn = _ffi.new("unsigned long *")
        tbuf = self.lib.kc_text_buffer(tn)
        text = bytes(_ffi.buffer(tbuf, tn[0])) if tn[0] else b""

        def string(off: int) -> str:
            return text[off : text.index(b"\0", off)].decode(errors="replace")

        boot_rc, boot_warn = 0, []
        warns: dict[int, list[str]] = {}
        vmaps: dict[int, list[tuple[int, int]]] = {}
        events, event_ops, log, reports = [], [], [], []
        state = None
        for kind, op, a, b, c in records:  # the rare kinds: the frequent ones are in streams
            if kind == Rec.BOOT:
                boot_rc = _signed(a)
            elif kind == Rec.WARN:
                (boot_warn if op == OP_BOOT else warns.setdefault(op, [])).append(string(a))
            elif kind == Rec.LOG:
                log.append(string(a))
            elif kind == Rec.EVENT:
                events.append(symbolize(string(a)))
                event_ops.append(None if op == OP_BOOT else op)
            elif kind == Rec.SANITIZER:
                reports.append(self._report(string(a), None if op == OP_BOOT else op, ended=bool(b), code=c))
            elif kind == Rec.STATE:
                state = (a, b, c)
            elif kind == Rec.VMAP:
                vmaps.setdefault(op, []).append((a, b))
        results = _op_results(self._answers(), warns, vmaps)
        next_boot = None
        if foreign:  # only a run from an image boots a next kernel; ops[0] is its kexec
            accepted = results[0].rc == 0
            next_boot = NextBoot(
                accepted=accepted, reason="" if accepted else "; ".join(log[-3:]),
                walk_nodes=tuple(self._stream(Stream.WALK_NODE)), phantom=tuple(self._stream(Stream.PHANTOM)),
                # the old kernel's own memblock marks are not the handover's: only a next kernel's are read
                **{name: Pairs.of_words(self._stream(stream)) for name, stream in PAIR_STREAMS.items()},
            )
        fields: dict = {}
        memory: dict[int, memoryview | bytes] = {}
        if state is not None and not foreign:
            fields, memory = self._old_state(header, *state, like=like)
        return Outcome(
            boot=OpResult(boot_rc, 0, 0, tuple(boot_warn)), ops=results, next=next_boot,
            events=tuple(events), event_ops=tuple(event_ops), log=tuple(log), reports=tuple(reports), **fields,
        ), memory

    def _stream(self, stream: Stream) -> array:
        """A stream's words, copied out of the library in one step."""
        n = _ffi.new("unsigned long *")
        words = self.lib.kc_stream(stream, n)
        out = array("Q")
        if n[0]:
            out.frombytes(_ffi.buffer(words, n[0] * out.itemsize))
        return out

    def _answers(self) -> Iterator[tuple[int, int, int]]:
        """Each op's (rc, value, value2), read in place (valid until the next run)."""
        n = _ffi.new("unsigned long *")
        answers = self.lib.kc_answers(n)
        if not n[0]:
            return iter(())
        raw = memoryview(_ffi.buffer(answers, n[0] * ANSWER.size))
        signed, unsigned = raw.cast("q"), raw.cast("Q")
        return zip(signed[0::3], unsigned[1::3], unsigned[2::3])

    def _report(self, text: str, op: int | None, ended: bool, code: int) -> SanitizerReport:
        """A Rec.SANITIZER record: "kind\tfile\tline\tcolumn\tdetail". ASan
        gives no site of its own: its first frame in the KHO file is the site.
        Outside the KHO file (the project's shims) the site is the function
        the code address is in and the hash of that file's line."""
        kind, file, line, _, detail = (text.split("\t", 4) + [""] * 5)[:5]
        line_no = int(line) if line.isdigit() else 0
        if kind.startswith("asan"):
            frames = [symbolize(f) for f in detail.split("|") if f]
            detail = " | ".join(frames)
            for frame in frames:
                if m := _KHO_FRAME.search(frame):
                    file, line_no = KHO_C, int(m[1])
                    break
        if file.endswith(KHO_C):
            function, line_hash = self.build.site(line_no)
            return SanitizerReport(op, kind, function, KHO_C, line_no, detail, line_hash, ended)
        where = symbolize(f"{self.build.library}+{code:#x}") if code else ""
        function = where.split(" ", 1)[0] if where and not where.startswith(str(self.build.library)) else "?"
        return SanitizerReport(op, kind, function, file.rsplit("/", 1)[-1], line_no, detail, _own_line_hash(file, line_no), ended)

    def _old_state(self, header: Header, root_phys: int, fdt_phys: int, arena_hwm: int,
                   like: Outcome | None = None) -> tuple[dict, dict[int, memoryview | bytes]]:
        """The old kernel's state, and the pages its image holds as they lie
        in memory (what ``pack_image`` of that image lays out)."""
        n = _ffi.new("unsigned long *")
        buf = self.lib.kc_snapshot_pages(n)
        raw = memoryview(_ffi.buffer(buf, n[0] * self.page_size)) if n[0] else memoryview(b"")  # read in place
        ps = self.page_size

        def page(phys: int) -> bytes | None:
            index, off = divmod(phys - ARENA_BASE_PHYS, ps)
            if off or not 0 <= index < n[0]:
                return None
            return bytes(raw[index * ps : (index + 1) * ps])

        fdt_page = page(fdt_phys) or b""
        total = Fdt(fdt_page).totalsize() if len(fdt_page) >= 8 else 0
        fdt = fdt_page[: min(total, ps)]
        if shortcuts.ENABLED and like is not None and _same_tree(root_phys, page, like):
            tree, node_pages = like.tree, like.node_pages
        else:
            tree, node_pages = _canonical_tree(root_phys, page, self.page_shift)
        scratch = (page(ARENA_BASE_PHYS) or b"")[: 16 * len(header.scratch)]
        zero = bytes(ps)
        # tobytes: a memoryview compares element by element, 40 times slower than bytes
        written = {ARENA_BASE_PHYS + i * ps: raw[i * ps : (i + 1) * ps] for i in range(n[0])
                   if raw[i * ps : (i + 1) * ps].tobytes() != zero}
        other = PageStore({p: words_from_bytes(v, ps) for p, v in written.items() if p not in node_pages}, ps)
        image = Image(self.page_shift, fdt_phys, fdt, ARENA_BASE_PHYS, scratch, node_pages, other, arena_hwm)
        # Every page the image holds: the written ones, then the tree's, the
        # scratch and FDT pages even when zero (b"": not in the arena, as zeros).
        memory: dict[int, memoryview | bytes] = dict(written)
        for p in (*node_pages, ARENA_BASE_PHYS, fdt_phys):
            if p not in memory:
                memory[p] = page(p) or b""
        return {"root_phys": root_phys, "tree": tree, "node_pages": node_pages, "fdt": fdt, "image": image}, memory


class _SharedResults(dict):
    """Plain answers' OpResults, one (immutable) object per distinct answer."""

    def __missing__(self, answer: tuple[int, int, int]) -> OpResult:
        result = self[answer] = OpResult(*answer)
        return result


def _op_results(answers: Iterable[tuple[int, int, int]], warns: dict[int, list[str]],
                vmaps: dict[int, list[tuple[int, int]]]) -> tuple[OpResult, ...]:
    """One OpResult per op's answer (rc NOT_RUN: the op left none); equal
    plain answers share one object."""
    shared = _SharedResults()
    out = [shared[answer] for answer in answers]
    for i in warns.keys() | vmaps.keys():
        if i < len(out):
            r = out[i]
            out[i] = OpResult(r.rc, r.value, r.value2, tuple(warns.get(i, ())), tuple(vmaps.get(i, ())))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _own_line_hash(path: str, line: int) -> str:
    """The line-text hash of a line of the project's own C (the shims), or
    ''. Read from this checkout's copy of the file, not from the path the
    build was compiled at: a build in the cache may come from another
    checkout, since gone or changed, and its files had this checkout's
    content (the project's C is part of the build's key)."""
    own = _own_c_file(path)
    try:
        lines = own.read_text().split("\n") if own else []
    except OSError:
        return ""
    return line_hash(lines[line - 1]) if 0 < line <= len(lines) else ""


def _own_c_file(path: str) -> Path | None:
    """This checkout's file for a compile-time path of the project's C: the
    longest tail of it that names a file under C_DIR."""
    parts = Path(path).relative_to(Path(path).anchor).parts
    for i in range(len(parts)):
        if (candidate := C_DIR.joinpath(*parts[i:])).is_file():
            return candidate
    return None


def _same_tree(root: int, page: Callable[[int], bytes | None], like: Outcome) -> bool:
    """Whether the kernel's tree, read from its memory (``page``), is
    ``like``'s (the model's, read by the same traversal from the model's
    memory) without reading it: a shortcut.

    The traversal starts at the root and reads one page for each entry of
    each table it visits; what it does next depends only on what it read. The
    model's traversal read the root and the entries of its tables: a page it
    visited (one of ``like``'s node pages) or one it found missing. So if
    the roots are the same and the kernel's memory holds, at each of those,
    the same page (the same bytes as the model's words) or none, the
    kernel's traversal reads what the model's read, step for step, and ends
    with the same tree and node pages."""
    pages = like.node_pages
    if root != like.root_phys or not isinstance(pages, PageStore):
        return False
    ps = pages.page_size
    read = {root} | {child for node in like.tree if node.level for child in (pages.words(node.phys) or {}).values()}
    for phys in read:
        words = pages.words(phys)
        data = page(phys)
        if words is None or data is None:
            if words is not None or data is not None:
                return False
        elif (0 in words.values() or (words and not 0 <= min(words) <= max(words) < ps // 8)
              or words_to_bytes(words, ps) != data):  # canonical words only: equal bytes then mean equal words
            return False
    return True


def _canonical_tree(root: int, page, page_shift: int) -> tuple[tuple[TreeNode, ...], PageStore]:
    """The C tree in canonical form, read with the same ABI traversal the
    model uses (reference.tree), so both sides are named the same way; its
    pages as words, like the model's."""
    ps = 1 << page_shift
    cache: dict[int, dict[int, int] | None] = {}

    def words(phys: int):
        if phys not in cache:
            data = page(phys)
            cache[phys] = None if data is None else words_from_bytes(data, ps)
        return cache[phys]

    nodes, pages = [], {}
    for v in traverse(root, geometry(page_shift), words, strict=False):
        nodes.append(TreeNode(v.path, v.level, v.phys, tuple(sorted(v.words)) if v.level else tuple(leaf_bits(v.words))))
        pages[v.phys] = v.words
    return tuple(nodes), PageStore(pages, ps)


@functools.lru_cache(maxsize=None)
def _load(path: str):
    try:
        return _ffi.dlopen(path)
    except OSError as e:
        raise KhoConformError(f"cannot load {path}: {e}; rebuild with `kho-conform build`") from None
