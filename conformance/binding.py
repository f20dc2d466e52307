"""Binding: the built harness library, driven from Python with one FFI call
per program, its records turned into the same ``Outcome`` the model gives.
"""

from __future__ import annotations

import functools
import re
import os
import struct
import subprocess
import sys
from pathlib import Path

from cffi import FFI

from reference.arena import words_from_bytes
from reference.geometry import geometry
from reference.outcome import Image, NextKernel, OpResult, Outcome, TreeNode
from reference.tree import leaf_bits, traverse
from reference.program import ARENA_BASE_PHYS, NOT_RUN, Header, Op, Program, Step, pack

from .build import Build
from .errors import KhoConformError

_ffi = FFI()
_ffi.cdef(
    """
    struct kc_rec { unsigned int kind, op; unsigned long long a, b, c; };
    int kc_run(const void *program, unsigned long len, const void *image, unsigned long image_len);
    const struct kc_rec *kc_records(unsigned long *n);
    const char *kc_text_buffer(unsigned long *n);
    const unsigned char *kc_snapshot_pages(unsigned long *n);
    int kc_page_shift(void);
    void kc_abi_constants(unsigned long long *out);
    unsigned long long kc_encode_key(unsigned long long phys, unsigned int order);
    unsigned long long kc_decode_key(unsigned long long key, unsigned int *order);
    """
)

# enum kc_rec_kind in kc_runtime.h
REC_OP, REC_WARN, REC_LOG, REC_MEMBLOCK, REC_WALK, REC_WALK_NODE, REC_MAGIC, REC_PHANTOM, REC_EVENT, REC_STATE, REC_BOOT = range(1, 12)
MB_RESERVE, MB_NOINIT, MB_ADD, MB_SCRATCH, MB_FREE = range(1, 6)
OP_BOOT = 0xFFFFFFFF
FDT_TOTALSIZE = struct.Struct(">I")
REC = struct.Struct("<IIQQQ")  # struct kc_rec


def _signed(x: int) -> int:
    return x - (1 << 64) if x >> 63 else x


@functools.lru_cache(maxsize=4096)
def symbolize(location: str) -> str:
    """'lib.so+0x1234' -> 'function file:line', for event records."""
    m = re.search(r"(\S+\.so)\+(0x[0-9a-f]+)", location)
    if not m:
        return location
    try:
        out = subprocess.run(["addr2line", "-f", "-i", "-e", m.group(1), m.group(2)], capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired):
        return location
    if len(out) >= 2 and out[0] != "??":
        return location.replace(m.group(0), f"{out[0]} {out[1].rsplit('/', 1)[-1]}")
    return location


def sanitizer_preload(flavor: str) -> str | None:
    """The runtime a sanitizer flavor needs preloaded into the Python process."""
    if flavor == "plain":
        return None
    if flavor == "fuzz":
        import atheris

        return str(Path(atheris.path()) / "asan_with_fuzzer.so")
    for cc in ("clang-16", "clang"):
        try:
            out = subprocess.run([cc, "-print-file-name=libclang_rt.asan-x86_64.so"], capture_output=True, text=True).stdout.strip()
        except FileNotFoundError:
            continue
        if out and Path(out).exists():
            return out
    raise KhoConformError("the asan flavor needs clang's ASan runtime: apt-get install clang-16 libclang-rt-16-dev")


SANITIZER_ENV = {
    "ASAN_OPTIONS": "halt_on_error=0:allow_user_segv_handler=1:handle_segv=0:handle_sigill=0:detect_leaks=0",
}


def ensure_process_for(flavor: str) -> None:
    """Re-exec this process with the sanitizer runtime preloaded, if needed:
    an ASan-built library can only load into a process started with it."""
    lib = sanitizer_preload(flavor)
    if lib is None or lib in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ, LD_PRELOAD=lib, **SANITIZER_ENV)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


class Harness:
    """The kernel's KHO code, built for one source, page shift and flavor."""

    def __init__(self, build: Build) -> None:
        if build.flavor != "plain" and not os.environ.get("LD_PRELOAD"):
            raise KhoConformError(f"the {build.flavor} flavor must run in a process started with its sanitizer runtime preloaded; use the kho-conform CLI")
        self.build = build
        self.lib = _load(str(build.library))
        self.page_shift = self.lib.kc_page_shift()
        self.page_size = 1 << self.page_shift

    def run(self, program: Program) -> Outcome:
        if program.header.page_shift != self.page_shift:
            raise KhoConformError(f"program is for page shift {program.header.page_shift}, library for {self.page_shift}")
        blob = pack(program)
        if self.lib.kc_run(blob, len(blob), _ffi.NULL, 0):
            raise KhoConformError("the harness refused the program header")
        return self._outcome(program.header, len(program.steps), foreign=False)

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
        program = Program(header, (Step(Op.KEXEC), *steps))
        blob = pack(program)
        img = self._pack_image(image)
        if self.lib.kc_run(blob, len(blob), img, len(img)):
            raise KhoConformError("the harness refused the program header")
        return self._outcome(header, len(program.steps), foreign=True)

    def _pack_image(self, image: Image) -> bytes:
        pages = dict(image.pages)
        scratch_page = image.scratch.ljust(self.page_size, b"\0")[: self.page_size]
        pages.setdefault(image.scratch_phys, scratch_page)
        pages[image.fdt_phys] = image.fdt.ljust(self.page_size, b"\0")[: self.page_size]
        out = [struct.pack("<4Q", image.fdt_phys, image.scratch_phys, len(image.scratch), len(pages))]
        for phys, data in sorted(pages.items()):
            out.append(struct.pack("<Q", phys & (2**64 - 1)) + data.ljust(self.page_size, b"\0")[: self.page_size])
        return b"".join(out)

    def _outcome(self, header: Header, nsteps: int, foreign: bool) -> Outcome:
        n = _ffi.new("unsigned long *")
        recs = self.lib.kc_records(n)
        # Read the C array in place, one record at a time: a program of 10^6
        # ops leaves millions of records, which must not become a list.
        records = struct.iter_unpack(REC.format, _ffi.buffer(recs, n[0] * REC.size)) if n[0] else ()
        tn = _ffi.new("unsigned long *")
        tbuf = self.lib.kc_text_buffer(tn)
        text = bytes(_ffi.buffer(tbuf, tn[0])) if tn[0] else b""

        def string(off: int) -> str:
            return text[off : text.index(b"\0", off)].decode(errors="replace")

        boot_rc, boot_warn = 0, []
        ops: list[list] = [[NOT_RUN, 0, 0, []] for _ in range(nsteps)]
        events, event_ops, log = [], [], []
        state = None
        kexec_at = 0 if foreign else None
        nxt = {"walk": [], "walk_nodes": [], "reserved": [], "noinit": [], "scratch_marks": [], "magic": [], "phantom": []}
        for kind, op, a, b, c in records:
            if kind == REC_BOOT:
                boot_rc = _signed(a)
            elif kind == REC_OP:
                ops[op][:3] = [_signed(a), b, c]
            elif kind == REC_WARN:
                (boot_warn if op == OP_BOOT else ops[op][3]).append(string(a))
            elif kind == REC_LOG:
                log.append(string(a))
            elif kind == REC_EVENT:
                events.append(symbolize(string(a)))
                event_ops.append(None if op == OP_BOOT else op)
            elif kind == REC_STATE:
                state = (a, b)
                if kexec_at is None and op != OP_BOOT and op < nsteps:
                    kexec_at = op
            elif kind == REC_MEMBLOCK and kexec_at is not None:
                key = {MB_RESERVE: "reserved", MB_NOINIT: "noinit", MB_SCRATCH: "scratch_marks"}.get(c)
                if key:
                    nxt[key].append((a, b))
            elif kind == REC_WALK:
                nxt["walk"].append((a, b))
            elif kind == REC_WALK_NODE:
                nxt["walk_nodes"].append(a)
            elif kind == REC_MAGIC:
                nxt["magic"].append((a, b))
            elif kind == REC_PHANTOM:
                nxt["phantom"].append(a)
        results = tuple(OpResult(rc, v, v2, tuple(w)) for rc, v, v2, w in ops)
        next_kernel = None
        if kexec_at is not None and results[kexec_at].rc != -95:
            accepted = results[kexec_at].rc == 0
            next_kernel = NextKernel(
                accepted=accepted, reason="" if accepted else "; ".join(log[-3:]),
                **{k: tuple(v) for k, v in nxt.items()},
            )
        fields = {}
        if state is not None and not foreign:
            fields = self._old_state(header, *state)
        return Outcome(
            boot=OpResult(boot_rc, 0, 0, tuple(boot_warn)), ops=results, next=next_kernel,
            events=tuple(events), event_ops=tuple(event_ops), log=tuple(log), **fields,
        )

    def _old_state(self, header: Header, root_phys: int, fdt_phys: int) -> dict:
        n = _ffi.new("unsigned long *")
        buf = self.lib.kc_snapshot_pages(n)
        raw = bytes(_ffi.buffer(buf, n[0] * self.page_size)) if n[0] else b""
        ps = self.page_size

        def page(phys: int) -> bytes | None:
            index, off = divmod(phys - ARENA_BASE_PHYS, ps)
            if off or not 0 <= index < n[0]:
                return None
            return raw[index * ps : (index + 1) * ps]

        fdt_page = page(fdt_phys) or b""
        total = FDT_TOTALSIZE.unpack_from(fdt_page, 4)[0] if len(fdt_page) >= 8 else 0
        fdt = fdt_page[: min(total, ps)]
        tree, node_pages = _canonical_tree(root_phys, page, self.page_shift)
        scratch = (page(ARENA_BASE_PHYS) or b"")[: 16 * len(header.scratch)]
        image = Image(self.page_shift, fdt_phys, fdt, ARENA_BASE_PHYS, scratch, node_pages)
        return {"root_phys": root_phys, "tree": tree, "node_pages": node_pages, "fdt": fdt, "image": image}


def _canonical_tree(root: int, page, page_shift: int) -> tuple[tuple[TreeNode, ...], dict[int, bytes]]:
    """The C tree in canonical form, read with the same ABI traversal the
    model uses (reference.tree), so both sides are named the same way."""
    ps = 1 << page_shift
    cache: dict[int, dict[int, int] | None] = {}

    def words(phys: int):
        if phys not in cache:
            data = page(phys)
            cache[phys] = None if data is None else words_from_bytes(data, ps)
        return cache[phys]

    nodes, raw = [], {}
    for v in traverse(root, geometry(page_shift), words, strict=False):
        nodes.append(TreeNode(v.path, v.level, v.phys, tuple(sorted(v.words)) if v.level else tuple(leaf_bits(v.words))))
        raw[v.phys] = page(v.phys)
    return tuple(nodes), raw


@functools.lru_cache(maxsize=None)
def _load(path: str):
    try:
        return _ffi.dlopen(path)
    except OSError as e:
        raise KhoConformError(f"cannot load {path}: {e}; rebuild with `kho-conform build`") from None
