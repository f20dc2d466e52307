"""The reference model: run a program on a model old kernel, hand over, and
run the rest on a model next kernel.

Written from the KHO ABI documentation and the project's behaviour contract.
Where the kernel leaves something unchecked, the model takes the safe
behaviour and says so ("Model policy"); the divergences that follow are
triaged as known findings, not copied.

Model policies, in one place:
- (pfn, order) outside the key domain, and page ranges ending past the last
  pfn a key holds: -EINVAL, no change;
- page ranges split at every NUMA boundary inside a block, and never into a
  block of order 64 - PAGE_SHIFT (keys.page_chunks);
- the next kernel refuses a tree holding keys wider than the key width, and an
  image of another page size;
- a refused handover reports only ``accepted`` and ``reason``;
- ``NextBoot.magic`` is the state at handover, before any restore;
- new-kernel ops in a kernel without an accepted handover (before kexec, after
  a failed or refused one) find no magic and no subtrees; a second kexec and
  old-kernel ops after kexec get -EOPNOTSUPP;
- the next kernel boots without ``kho=on``: kho_is_enabled() is false there;
- kho_preserve_vmalloc refuses (-EINVAL) an area whose first block is at
  physical address 0, which the chunk's zero-terminated list cannot hold;
- kho_restore_vmalloc acts on a chunk only once its page is known to be
  preserved; reading the old kernel's memory outside the arena is a fault
  (the arena is all the memory the harness has: both sides fault).
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from itertools import repeat
from typing import ClassVar

from . import quirks, shortcuts
from .arena import Arena, Words, set_word
from .collector import collector_paused
from .fdt import Fdt, kho_add_subtree, kho_remove_subtree, kho_root_fdt
from .geometry import MAX_PAGE_ORDER, Geometry, geometry
from .image import PageFault, PageStore, memory_reader, page_reader, scratch_entries
from .keys import (
    NUMA_ENDPOINTS,
    NUMA_INSIDE,
    NUMA_NONE,
    RunawayLoop,
    decode,
    in_domain,
    kernel_decode,
    kernel_key,
    one_block,
    pfn_key,
    range_blocks,
    range_in_domain,
    x86_int_shift,
    x86_shl64,
)
from .outcome import (
    E2BIG,
    EINVAL,
    ENOENT,
    ENOMEM,
    EOPNOTSUPP,
    ERANGE,
    SLOW_FDT_VISITS,
    SLOW_WORK,
    Image,
    NextBoot,
    OpResult,
    Outcome,
    Pairs,
    TreeNode,
)
from .profiles import Profile
from .program import (
    AREA_MAPPED,
    ARENA_BASE_PHYS,
    NEW_KERNEL_OPS,
    NOT_RUN,
    QUERY_OPS,
    U64,
    VMALLOC_BYTES,
    WARN_CAP,
    Header,
    Op,
    Program,
    Step,
    filler_blob,
    filler_name,
    is_vm_area,
)
from .quirks import check as quirks_check
from .scratch import free_gib_blocks, kernel_extend_scratch
from .tree import RadixTree, TreeError, Visit, kernel_walk, leaf_bits, traverse
from .vmalloc import CHUNK_NEXT_WORD, Descriptor, alloc_slot_word, chunk_capacity, kho_flags

OK = OpResult()
UNSUPPORTED = OpResult(-EOPNOTSUPP)
NOT_RUN_RESULT = OpResult(NOT_RUN)
NULL = -1  # restore ops: the kernel returned NULL
# The quirks that change how the old kernel walks a page range: NUMA
# checks, and range_blocks' flags.
_NUMA_QUIRK = quirks.NUMA_ENDPOINT_CHECK
_WALK_QUIRKS = {"kernel": quirks.UNVALIDATED_DOMAIN, "int_shift": quirks.RANGE_INT_SHIFT}

WARN_DEL_ABSENT = "radix-del-absent"
WARN_BAD_MAGIC = "restore-bad-magic"
WARN_RESTORE_FREE_NULL = "restore-free-null"
WARN_KVMALLOC_TOO_BIG = "kvmalloc-too-big"  # the allocator refuses over INT_MAX bytes, and warns once
INT_MAX = (1 << 31) - 1

METADATA_NAME = "kexec-metadata"
RELEASE = b"kho-conform"
# struct { u32 version; char previous_release[65]; u32 kexec_count; } __packed
METADATA = struct.pack("<I65sI", 1, RELEASE, 1)

MEMORY_MAP_PROP = "preserved-memory-map"
SUBTREE_DATA_PROP = "preserved-data"
SUBTREE_SIZE_PROP = "blob-size"


class KernelStop(Exception):
    """The kernel's code ends the run (an event): what it did before is kept."""

    kind: ClassVar[str] = ""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        # Set on the way out of a next kernel that had booted: its boot, and
        # the results of the ops before the one that stopped.
        self.next_boot: NextBoot | None = None
        self.done: list[OpResult] | None = None


class KernelFault(KernelStop):
    """The kernel dereferences memory that is not there (under a quirk, or
    where it follows a caller's pointer outside the old kernel's memory)."""

    kind: ClassVar[str] = "fault"


class KernelRunaway(KernelStop):
    """Under a quirk, a kernel loop never ends."""

    kind: ClassVar[str] = "timeout"


def scratch_overlap(profile: Profile, areas: Iterable[tuple[int, int]], phys: int, size: int) -> OpResult:
    """kho_scratch_overlap(): whether [phys, phys + size) meets a scratch
    area, in 64-bit sums (the fields are u64). A kernel without it in its
    public API refuses the call."""
    if not profile.scratch_overlap:
        return UNSUPPORTED
    end = (phys + size) & U64
    return OpResult(0, int(any(phys < (a + n) & U64 and end > a for a, n in areas)))


# ---- old kernel ------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The old kernel's handover state, at kexec or at the end."""

    root_phys: int = 0
    tree: tuple[TreeNode, ...] = ()
    node_pages: PageStore | dict[int, bytes] = field(default_factory=dict)
    fdt: bytes = b""
    image: Image | None = None


# Every program boots alike: the boot's FDT edits are pure functions of
# their arguments (and of the FDT they edit), kept once made (shortcut).
@lru_cache(maxsize=64)
def _root_fdt_made(page_size: int, compatible: str, root: int) -> tuple[bytes, bool]:
    fdt = kho_root_fdt(page_size, compatible, root)
    return bytes(fdt.buf), fdt.out_of_bounds


@lru_cache(maxsize=64)
def _metadata_added(buf: bytes, out_of_bounds: bool, page_size: int, meta: int) -> tuple[int, bytes, bool]:
    fdt = Fdt(bytearray(buf))
    fdt.out_of_bounds = out_of_bounds
    rc = kho_add_subtree(fdt, page_size, METADATA_NAME, meta, len(METADATA))
    return rc, bytes(fdt.buf), fdt.out_of_bounds


def _root_fdt(page_size: int, compatible: str, root: int) -> Fdt:
    if not shortcuts.ENABLED:
        return kho_root_fdt(page_size, compatible, root)
    buf, out_of_bounds = _root_fdt_made(page_size, compatible, root)
    fdt = Fdt(bytearray(buf))
    fdt.out_of_bounds = out_of_bounds
    return fdt


def _add_metadata(fdt: Fdt, page_size: int, meta: int) -> int:
    """The metadata subtree added to the boot FDT, in place (its buffer is
    the arena page's)."""
    if not shortcuts.ENABLED:
        return kho_add_subtree(fdt, page_size, METADATA_NAME, meta, len(METADATA))
    rc, buf, fdt.out_of_bounds = _metadata_added(bytes(fdt.buf), fdt.out_of_bounds, page_size, meta)
    fdt.buf[:] = buf
    return rc


class OldKernel:
    def __init__(self, header: Header, profile: Profile, quirks: frozenset[str] = frozenset()) -> None:
        self.header = header
        self.profile = profile
        self.quirks = quirks
        self.geo: Geometry = geometry(header.page_shift)
        self.arena = Arena(header)
        self.enabled = False
        self.tree: RadixTree | None = None
        self.fdt: Fdt | None = None
        self.fdt_phys = 0
        self.pokes: list[Step] = []
        self.folio_orders: dict[int, int] = {}  # phys -> order of alloc_preserve's live folios
        # New-kernel ops run here see a kernel that received no handover.
        self.no_handover = NextKernel(header, profile, accepted=False, magic={}, fdt=None, booted=False, quirks=quirks)
        # How this kernel walks page ranges (its quirks are fixed): read once per op.
        self._numa = NUMA_ENDPOINTS if _NUMA_QUIRK in quirks else NUMA_INSIDE
        self._walk = {flag: q in quirks for flag, q in _WALK_QUIRKS.items()}

    def boot(self) -> OpResult:
        """KHO init. On failure KHO stays disabled; what was allocated no
        longer matters (nothing is handed over)."""
        P = self.header.page_shift
        root = self.arena.alloc()
        if root is None:
            return OpResult(-ENOMEM)
        tree = RadixTree(self.arena, self.geo, root)
        fdt_phys = self.arena.alloc()
        if fdt_phys is None:
            return OpResult(-ENOMEM)
        rc = tree.add(pfn_key(fdt_phys >> P, 0, P))
        if rc:
            return OpResult(rc)
        fdt = _root_fdt(self.geo.page_size, self.profile.compatible, root)
        self.arena.set_bytes(fdt_phys, fdt.buf)
        meta = self.arena.alloc()
        if meta is None:
            return OpResult(-ENOMEM)
        self.arena.set_content(meta, METADATA)
        rc = tree.add(pfn_key(meta >> P, 0, P)) or _add_metadata(fdt, self.geo.page_size, meta)
        if rc:
            return OpResult(rc)
        self.tree, self.fdt, self.fdt_phys, self.enabled = tree, fdt, fdt_phys, True
        return OK

    def apply(self, step: Step) -> OpResult:
        if step.op in QUERY_OPS:
            return self._query(step)
        if step.op in NEW_KERNEL_OPS:
            return self.no_handover.apply(step)
        if not self.enabled or step.op == Op.KEXEC:
            return UNSUPPORTED
        return self._apply(step)

    def _apply(self, step: Step) -> OpResult:
        assert self.tree is not None and self.fdt is not None
        op, a, b = step.op, step.a, step.b
        if op in (Op.PRESERVE_FOLIO, Op.RADIX_ADD):
            key = self._folio_key(a, b)
            if key is None:  # Model policy: the kernel does not validate
                return OpResult(-EINVAL)
            rc = self._add(key)
            return OK if rc == 0 else OpResult(rc)  # one OK for all: a program may have 10^6 of them
        if op in (Op.UNPRESERVE_FOLIO, Op.RADIX_DEL):
            key = self._folio_key(a, b)
            return OpResult(-EINVAL) if key is None else self._delete([key])
        if op == Op.PRESERVE_PAGES:
            return self._preserve_pages(a, b)
        if op == Op.UNPRESERVE_PAGES:
            return self._unpreserve_pages(a, b)
        if op in (Op.RADIX_ADD_KEY, Op.RADIX_DEL_KEY):
            if not self.profile.key_api:
                return UNSUPPORTED
            return OpResult(self._add(a)) if op == Op.RADIX_ADD_KEY else self._delete([a])
        if op == Op.ADD_SUBTREE:
            return OpResult(kho_add_subtree(self.fdt, self.geo.page_size, step.name, a, b))
        if op == Op.REMOVE_SUBTREE:
            kho_remove_subtree(self.fdt, self.geo.page_size, a)
            return OK
        if op == Op.FILL_FDT:
            nodes = len(self.fdt.subnodes(0))
            for i in range(b):
                index = (a + i) & U64
                rc = kho_add_subtree(self.fdt, self.geo.page_size, filler_name(index, step.c),
                                     filler_blob(index, self.header.page_shift), index)
                if rc:
                    break
            else:
                i, rc = b, 0
            visits = (i + 1) * nodes + i * (i + 1) // 2  # each add, the failing one too, walks the nodes there
            return OpResult(rc, i, may_time_out=visits > SLOW_FDT_VISITS)
        if op in (Op.POKE_ARENA, Op.POKE_FDT):
            self.pokes.append(step)  # they corrupt the image at handover
            return OK
        if op == Op.ALLOC_PRESERVE:
            return self._alloc_preserve(a, b)
        if op == Op.UNPRESERVE_FREE:
            return self._unpreserve_free(a)
        if op == Op.PRESERVE_VMALLOC:
            return self._preserve_vmalloc(step)
        if op == Op.UNPRESERVE_VMALLOC:
            warnings = self._unpreserve_vmalloc(Descriptor.read(self._handover_page(), a))
            Descriptor().write(self._handover_page(), a)  # the caller forgets it
            return OpResult(warnings=tuple(warnings[:WARN_CAP]))
        raise AssertionError(f"unhandled op {op!r}")

    def _query(self, step: Step) -> OpResult:
        if step.op == Op.IS_KHO_ENABLED:
            return OpResult(0, int(self.enabled))
        if step.op == Op.IS_KHO_BOOT:
            return OpResult(0, 0)  # a cold boot
        return scratch_overlap(self.profile, self.header.scratch, step.a, step.b)

    def _handover_page(self) -> Words:
        page = self.arena.words(ARENA_BASE_PHYS)
        assert page is not None  # page 0 is never allocated nor freed
        return page

    def _alloc_preserve(self, slot: int, size: int) -> OpResult:
        """kho_alloc_preserve(): a zeroed block of the smallest power-of-two
        pages holding ``size`` bytes (at most MAX_PAGE_ORDER), preserved as a
        folio; freed again if the preservation fails. The slot keeps the
        memory's phys, or 0 on failure."""
        P = self.header.page_shift
        if not size:
            rc, phys = -EINVAL, 0
        elif ((size - 1) >> P).bit_length() > MAX_PAGE_ORDER:
            rc, phys = -E2BIG, 0
        else:
            order = ((size - 1) >> P).bit_length()
            block = self.arena.alloc(order)
            if block is None:
                rc, phys = -ENOMEM, 0
            else:
                phys = block
                rc = self._apply(Step(Op.PRESERVE_FOLIO, phys >> P, order)).rc
                if rc:
                    self.arena.free(phys, order)
                    phys = 0
                else:
                    self.folio_orders[phys] = order
        set_word(self._handover_page(), alloc_slot_word(slot), phys)
        return OpResult(rc, phys)

    def _unpreserve_free(self, slot: int) -> OpResult:
        """kho_unpreserve_free() of the slot's memory (nothing for an empty
        slot): unpreserve the folio and free it. The caller forgets it."""
        page = self._handover_page()
        phys = page.get(alloc_slot_word(slot), 0)
        if not phys:
            return OK
        order = self.folio_orders.pop(phys)
        result = self._apply(Step(Op.UNPRESERVE_FOLIO, phys >> self.header.page_shift, order))
        self.arena.free(phys, order)
        set_word(page, alloc_slot_word(slot), 0)
        return result

    def _new_chunk(self, previous: int | None, warnings: list[str]) -> int | None:
        """A zeroed chunk page, itself preserved, linked after ``previous``;
        None when the page cannot be had or preserved."""
        phys = self.arena.alloc()
        if phys is None:
            return None
        r = self._preserve_pages(phys >> self.header.page_shift, 1)
        warnings += r.warnings
        if r.rc:
            self.arena.free(phys)
            return None
        if previous is not None:
            set_word(self._chunk(previous), CHUNK_NEXT_WORD, phys)
        return phys

    def _chunk(self, phys: int) -> Words:
        words = self.arena.words(phys)
        assert words is not None, f"chunk {phys:#x} is not an allocated page"
        return words

    def _preserve_vmalloc(self, step: Step) -> OpResult:
        """kho_preserve_vmalloc(): each block of 2^order pages preserved as a
        page range and listed in the chunks; the descriptor filled in at the
        end. On a failure everything is unpreserved again through the
        descriptor as it stands (the caller zeroed it), and the caller drops
        the descriptor."""
        slot, pfn, nr_pages, order, vm_flags = step.a, step.b, step.c, step.d, step.e
        page = self._handover_page()
        Descriptor().write(page, slot)  # the caller's fresh, zeroed descriptor
        if not is_vm_area(self.header, pfn, nr_pages, order, vm_flags):
            return OpResult(-EINVAL)  # find_vm_area() finds no area
        if vm_flags & AREA_MAPPED:
            return UNSUPPORTED
        if pfn == 0 and quirks.VMALLOC_PHYS_ZERO not in self.quirks:
            return OpResult(-EINVAL)  # Model policy: a block at phys 0 cannot be listed
        P = self.header.page_shift
        warnings: list[str] = []
        chunk = self._new_chunk(None, warnings)
        if chunk is None:
            return OpResult(-ENOMEM, warnings=tuple(warnings[:WARN_CAP]))  # nothing stored yet
        first = chunk
        Descriptor(first).write(page, slot)
        capacity, index, rc = chunk_capacity(self.geo.page_size), 0, 0
        start, end = pfn, pfn + nr_pages
        while start < end:  # the blocks up to the end of the area or of the chunk
            done, r = self._preserve_blocks(start, order, min(capacity - index, (end - start) >> order))
            warnings += r.warnings
            words = self._chunk(chunk)
            words.update(zip(range(1 + index, 1 + index + done),
                             range(start << P, (start + (done << order)) << P, 1 << (order + P))))
            if done and not start:
                del words[1 + index]  # phys 0 (quirk vmalloc-phys-zero): zero words are absent
            index, start = index + done, start + (done << order)
            if r.rc:
                rc = r.rc
                break
            if index == capacity:
                chunk = self._new_chunk(chunk, warnings)
                if chunk is None:
                    rc = -ENOMEM
                    break
                index = 0
        if not rc:
            Descriptor(first, nr_pages, kho_flags(vm_flags), order).write(page, slot)
            return OpResult(0, first, warnings=tuple(warnings[:WARN_CAP]))
        # Spec: undo exactly what this call preserved. Quirk
        # vmalloc-rollback-order: undo through the descriptor as stored so
        # far, whose order is still 0.
        stored = Descriptor.read(page, slot)
        undo = stored if quirks.VMALLOC_ROLLBACK_ORDER in self.quirks else replace(stored, order=order)
        warnings += self._unpreserve_vmalloc(undo)
        Descriptor().write(page, slot)  # the caller keeps no failed preservation
        return OpResult(rc, warnings=tuple(warnings[:WARN_CAP]))

    def _unpreserve_vmalloc(self, desc: Descriptor) -> list[str]:
        """kho_unpreserve_vmalloc(): every chunk page and every block it
        lists (2^desc.order pages each) unpreserved, the chunk pages freed.
        The warnings of the deletions."""
        P = self.header.page_shift
        warnings: list[str] = []
        chunk = desc.first
        while chunk:
            words = self._chunk(chunk)
            warnings += self._unpreserve_pages(chunk >> P, 1).warnings
            listed = list(map(words.get, range(1, 1 + chunk_capacity(self.geo.page_size)), repeat(0)))
            warnings += self._unpreserve_blocks(listed[:listed.index(0)] if 0 in listed else listed, desc.order)
            following = words.get(CHUNK_NEXT_WORD, 0)
            self.arena.free(chunk)
            chunk = following
        return warnings

    def _folio_key(self, pfn: int, order: int) -> int | None:
        """The key of a folio, or None where the model refuses it."""
        P = self.header.page_shift
        if in_domain(pfn, order, P):
            return pfn_key(pfn, order, P)
        return kernel_key(pfn, order, P) if quirks.UNVALIDATED_DOMAIN in self.quirks else None

    def _block_key(self, pfn: int, order: int) -> int:
        """A range block's key; blocks outside the key domain exist only
        under unvalidated-domain, which keys them as the kernel does."""
        P = self.header.page_shift
        return pfn_key(pfn, order, P) if in_domain(pfn, order, P) else kernel_key(pfn, order, P)

    def _add(self, key: int) -> int:
        """Add a key; the key API refuses keys wider than the key width."""
        assert self.tree is not None
        if self.profile.key_api and key.bit_length() > self.geo.key_width:
            return -ERANGE
        return self.tree.add(key)

    def _preserve_numa(self) -> str:
        return self._numa

    def _range_blocks(self, pfn: int, nr_pages: int, numa: str) -> Iterator[tuple[int, int]] | OpResult:
        """The blocks of a page range, walked as the kernel walks them (one at
        a time: under range-int-shift the walk may run away only after the
        blocks before it were added), or the op's result when there is
        nothing to walk: -EINVAL out of the key domain (model policy)."""
        P = self.header.page_shift
        q = self.quirks
        if quirks.UNVALIDATED_DOMAIN in q:
            end = (pfn + nr_pages) & U64  # a range that wraps is empty
        elif range_in_domain(pfn, nr_pages, P):
            end = pfn + nr_pages
        else:
            return OpResult(-EINVAL)

        def walk() -> Iterator[tuple[int, int]]:
            try:
                yield from range_blocks(pfn, end, self.header, numa, kernel=quirks.UNVALIDATED_DOMAIN in q,
                                        int_shift=quirks.RANGE_INT_SHIFT in q)
            except RunawayLoop as e:
                raise KernelRunaway(str(e)) from None

        return walk()

    def corrupt_image(self) -> None:
        """Apply the pokes: they stand for corruption of the handover image in
        transit, so the old kernel itself never runs on corrupted state."""
        assert self.fdt is not None
        for step in self.pokes:
            if step.op == Op.POKE_ARENA:
                self.arena.poke(step.a, step.b, step.c)
            elif step.a < self.geo.page_size:
                self.fdt.buf[step.a] = step.b & 0xFF

    def _delete(self, keys: list[int]) -> OpResult:
        """Clear keys; each whose path lacks a table warns (as the kernel's
        delete does). The key API ignores keys wider than the key width."""
        assert self.tree is not None
        if self.profile.key_api:
            keys = [k for k in keys if k.bit_length() <= self.geo.key_width]
        absent = sum(not self.tree.delete(k) for k in keys)
        return OpResult(warnings=(WARN_DEL_ABSENT,) * min(absent, WARN_CAP)) if absent else OK

    def _one_block(self, pfn: int, nr_pages: int, numa: str) -> int | None:
        """Shortcut: the order of a range the walk visits as one block, else
        None (walk it)."""
        if not shortcuts.ENABLED:
            return None
        return one_block(pfn, nr_pages, self.header, numa, **self._walk)

    def _run_key(self, pfn: int, order: int, count: int) -> int | None:
        """Shortcut: the first key of ``count`` blocks of 2^order pages from
        ``pfn`` when each is a one-block range keyed in the key domain (so
        their keys follow each other, none wider than the key width); else
        None (one block at a time)."""
        if count < 2 or not shortcuts.ENABLED:
            return None
        P, block, last = self.header.page_shift, 1 << order, pfn + ((count - 1) << order)
        numa = self._preserve_numa()
        # A page's one_block depends only on its bound (monotone): the last decides.
        starts = (last,) if order == 0 else range(pfn, last + 1, block)
        if not (in_domain(pfn, order, P) and in_domain(last, order, P)) or any(
                self._one_block(s, block, numa) != order for s in starts):
            return None
        return pfn_key(pfn, order, P)

    def _preserve_blocks(self, pfn: int, order: int, count: int) -> tuple[int, OpResult]:
        """``count`` blocks of 2^order pages from ``pfn`` preserved in turn as
        page ranges: (how many were, the result of the one that failed or OK)."""
        assert self.tree is not None
        key = self._run_key(pfn, order, count)
        if key is not None:
            done, rc = self.tree.add_run(key, count)
            return done, OpResult(rc) if rc else OK
        for i in range(count):
            r = self._preserve_pages(pfn + (i << order), 1 << order)
            if r.rc:
                return i, r
        return count, OK

    def _unpreserve_blocks(self, listed: list[int], order: int) -> list[str]:
        """The blocks of 2^order pages at the listed phys unpreserved in turn
        as page ranges: the warnings."""
        assert self.tree is not None
        P = self.header.page_shift
        key = self._run_key(listed[0] >> P, order, len(listed)) if listed else None
        step = 1 << (order + P)
        if key is not None and listed == list(range(listed[0], listed[0] + len(listed) * step, step)):
            return [WARN_DEL_ABSENT] * self.tree.delete_run(key, len(listed))
        warnings: list[str] = []
        for phys in listed:
            warnings += self._unpreserve_pages(phys >> P, 1 << order).warnings
        return warnings

    def _unpreserve_pages(self, pfn: int, nr_pages: int) -> OpResult:
        numa = self._preserve_numa()
        order = self._one_block(pfn, nr_pages, numa)
        if order is not None:
            return self._delete([self._block_key(pfn, order)])
        blocks = self._range_blocks(pfn, nr_pages, numa)
        return blocks if isinstance(blocks, OpResult) else self._delete([self._block_key(*k) for k in blocks])

    def _preserve_pages(self, pfn: int, nr_pages: int) -> OpResult:
        """Add every block; on failure remove the keys this call set (keys
        that were already present stay) and return the error. Quirk
        preserve-pages-rollback: remove every block of the range before the
        failing one, recomputed for the range that ends there."""
        assert self.tree is not None
        numa = self._preserve_numa()
        order = self._one_block(pfn, nr_pages, numa)
        if order is not None:  # one block: nothing of this call to roll back
            rc = self._add(self._block_key(pfn, order))
            return OpResult(rc) if rc else OK
        blocks = self._range_blocks(pfn, nr_pages, numa)
        if isinstance(blocks, OpResult):
            return blocks
        added: list[int] = []
        for start, order in blocks:
            key = self._block_key(start, order)
            present = self.tree.contains(key)
            rc = self._add(key)
            if rc and quirks.PRESERVE_PAGES_ROLLBACK in self.quirks:
                done = self._range_blocks(pfn, start - pfn, numa)
                undo = OK if isinstance(done, OpResult) else self._delete([self._block_key(*k) for k in done])
                return OpResult(rc, warnings=undo.warnings)
            if rc:
                for k in added:
                    self.tree.delete(k)
                return OpResult(rc)
            if not present:
                added.append(key)
        return OK

    def snapshot(self) -> Snapshot:
        if not self.enabled:
            return Snapshot()
        assert self.tree is not None and self.fdt is not None
        visits = self.tree.nodes()  # pre-order, ascending slots: sorted by path
        tree = tuple(
            TreeNode(v.path, v.level, v.phys, tuple(sorted(v.words)) if v.level else tuple(leaf_bits(v.words)))
            for v in visits
        )
        pages = PageStore({v.phys: dict(v.words) for v in visits}, self.geo.page_size)
        fdt = bytes(self.fdt.buf[: self.fdt.totalsize()])
        scratch = self.arena.page_bytes(ARENA_BASE_PHYS)[: 16 * len(self.header.scratch)]
        other = {p: w for p, w in self.arena.content().items() if p not in pages}
        image = Image(self.header.page_shift, self.fdt_phys, fdt, ARENA_BASE_PHYS, scratch, pages,
                      PageStore(other, self.geo.page_size), self.arena.hwm)
        return Snapshot(self.tree.root, tree, pages, fdt, image)


# ---- next kernel -------------------------------------------------------------


class NextKernel:
    """A kernel after boot: the restore side of KHO.

    Model policy: the next kernel boots without ``kho=on`` (it restores and
    does not hand over again): kho_is_enabled() is false there."""

    def __init__(self, header: Header, profile: Profile, accepted: bool, magic: dict[int, int], fdt: Fdt | None,
                 booted: bool = True, quirks: frozenset[str] = frozenset(), image: Image | None = None) -> None:
        self.header = header
        self.profile = profile
        self.quirks = quirks
        self.accepted = accepted
        self.booted = booted  # False: restore ops issued where no next kernel runs
        self.magic = magic  # pfn -> order of head pages still carrying the KHO magic
        self.fdt = fdt
        self.warned = False
        self.kvmalloc_warned = False
        self.image = image  # the old kernel's memory, as handed over
        self._memory: Callable[[int], Words] | None = None
        # The scratch areas this kernel knows of: the handed-over descriptors.
        self.scratch = scratch_entries(image.scratch) if image is not None and accepted else []

    def apply(self, step: Step) -> OpResult:
        op = step.op
        if op == Op.IS_KHO_ENABLED:
            return OpResult(0, 0)
        if op == Op.IS_KHO_BOOT:
            return OpResult(0, int(self.booted and self.accepted))
        if op == Op.SCRATCH_OVERLAP:
            return scratch_overlap(self.profile, self.scratch, step.a, step.b)
        if not self.booted and op in NEW_KERNEL_OPS:
            # Restore ops where no next kernel runs: nothing to restore from.
            return {Op.RETRIEVE_SUBTREE: OpResult(-ENOENT), Op.RESTORE_FREE: OK}.get(op, OpResult(NULL))
        if op == Op.RESTORE_FOLIO:
            return self._restore_folio(step.a)
        if op == Op.RESTORE_PAGES:
            return self._restore_pages(step.a, step.b)
        if op == Op.RETRIEVE_SUBTREE:
            return self._retrieve(step.name)
        if op == Op.RESTORE_FREE:
            return self._restore_free(step.a)
        if op == Op.RESTORE_VMALLOC:
            return self._restore_vmalloc(step.a)
        return UNSUPPORTED  # old-kernel ops and a second kexec: no KHO state here

    def _read(self, phys: int) -> Words:
        """The page-sized span of the old kernel's memory at ``phys``; a
        fault outside it."""
        if self._memory is None:
            assert self.image is not None, "a booted next kernel has the old kernel's memory"
            self._memory = memory_reader(self.image, self.header)
        try:
            return self._memory(phys)
        except PageFault as e:
            raise KernelFault(str(e)) from None

    def _bad_head(self, pfn: int, restored: int = 0) -> OpResult:
        """NULL; the magic check on a RAM page warns once per kernel, whether
        or not the handover was accepted (a restore after a refused handover
        is the caller's mistake, and worth a warning)."""
        if self.booted and self.header.is_ram(pfn) and not self.warned:
            self.warned = True
            return OpResult(NULL, 0, restored, warnings=(WARN_BAD_MAGIC,))
        return OpResult(NULL, 0, restored)

    def _pages(self, order: int) -> int:
        """Struct pages a restored block initialises and hands to the managed
        count: ``1 << order`` in unsigned long, in int under quirk
        range-int-shift. The same for every order a valid key holds; a key
        the next kernel trusts (next-kernel-trusts-tree) can decode to an
        order near 2^32, whose shift count C takes modulo 64 (in Python a
        number of 2^32 bits)."""
        return x86_int_shift(order) if quirks.RANGE_INT_SHIFT in self.quirks else x86_shl64(1, order)

    def _restore_folio(self, phys: int) -> OpResult:
        pfn = phys >> self.header.page_shift
        if not self.accepted or not self.header.is_ram(pfn) or pfn not in self.magic:
            return self._bad_head(pfn)
        pages = self._pages(self.magic.pop(pfn))
        return OpResult(0, pfn, pages, may_time_out=pages & U64 > SLOW_WORK)

    def _restore_pages(self, phys: int, nr_pages: int) -> OpResult:
        """Model policy: expect exactly the blocks preserve_pages makes for
        this range under this machine's NUMA layout; blocks restored before a
        mismatch stay restored. Quirks: the blocks recomputed without NUMA
        (restore-pages-numa-split); each head restored by its stored order
        and never compared with the block expected (restore-trusts-page-order)."""
        pfn = phys >> self.header.page_shift
        q = self.quirks
        numa = NUMA_NONE if quirks.RESTORE_PAGES_NUMA_SPLIT in q else NUMA_INSIDE
        trust = quirks.RESTORE_TRUSTS_PAGE_ORDER in q
        unvalidated = quirks.UNVALIDATED_DOMAIN in q  # the kernel's bounds: orders to 64, the end wraps
        end = (pfn + nr_pages) & U64 if unvalidated else pfn + nr_pages
        try:
            blocks = range_blocks(pfn, end, self.header, numa, kernel=unvalidated, int_shift=quirks.RANGE_INT_SHIFT in q)
            restored = 0  # pages handed to the managed count before a failure
            work = 0  # struct pages initialised
            for start, order in blocks:
                if not self.accepted or not self.header.is_ram(start) or start not in self.magic:
                    return replace(self._bad_head(start, restored), may_time_out=work > SLOW_WORK)
                if self.magic[start] != order and not trust:
                    return OpResult(NULL, 0, restored, may_time_out=work > SLOW_WORK)
                pages = self._pages(self.magic.pop(start))
                restored += pages
                work += pages & U64
        except RunawayLoop as e:
            raise KernelRunaway(str(e)) from None
        return OpResult(0, pfn, restored, may_time_out=work > SLOW_WORK)

    def _restorable_page(self, phys: int) -> bool:
        """Whether restore_pages(phys, 1) would succeed (nothing changes)."""
        pfn = phys >> self.header.page_shift
        order = self.magic.get(pfn)
        return (self.accepted and self.header.is_ram(pfn) and order is not None
                and (order == 0 or quirks.RESTORE_TRUSTS_PAGE_ORDER in self.quirks))

    def _restore_free(self, slot: int) -> OpResult:
        """kho_restore_free() of the alloc slot's memory (nothing for an
        empty slot): restore the folio and free it; a folio that does not
        restore warns."""
        phys = self._read(ARENA_BASE_PHYS).get(alloc_slot_word(slot), 0)
        if not phys:
            return OK
        r = self._restore_folio(phys)
        if r.rc:
            return OpResult(0, 0, 0, warnings=(*r.warnings, WARN_RESTORE_FREE_NULL))
        return OpResult(0, 0, r.value2, may_time_out=r.may_time_out)

    def _restore_vmalloc(self, slot: int) -> OpResult:
        """kho_restore_vmalloc() of the slot's descriptor: restore every
        chunk page and every block it lists (2^order pages each), until the
        blocks add up to total_pages exactly, then map them in a new area.
        ``value``: the area's pages; ``pages``: what is mapped, in order.
        Blocks and chunks restored before a failure stay restored.

        Model policy: a chunk page's content is acted on only if the page
        was preserved (it is restored after its blocks, as the ABI lists
        them). Quirk restore-vmalloc-trusts-descriptor: any chunk is read,
        and blocks are 1 << order in int."""
        P = self.header.page_shift
        desc = Descriptor.read(self._read(ARENA_BASE_PHYS), slot)
        total, order = desc.total_pages, desc.order
        trusting = quirks.RESTORE_VMALLOC_TRUSTS_DESCRIPTOR in self.quirks
        warnings: list[str] = []
        if total * 8 > INT_MAX:  # the pages array
            if not self.kvmalloc_warned:
                self.kvmalloc_warned = True
                warnings.append(WARN_KVMALLOC_TOO_BIG)
            return OpResult(NULL, warnings=tuple(warnings))
        block = x86_int_shift(order) & U64 if trusting else 1 << order
        restored = work = index = 0
        runs: list[tuple[int, int]] = []

        def failed() -> OpResult:
            return OpResult(NULL, 0, restored, warnings=tuple(warnings[:WARN_CAP]), may_time_out=work > SLOW_WORK)

        def restore(phys: int, n: int) -> bool:
            nonlocal restored, work
            r = self._restore_pages(phys, n)
            warnings.extend(r.warnings)
            restored += r.value2
            work += r.value2 & U64
            return not r.rc

        chunk = desc.first
        while chunk:
            if not trusting and not self._restorable_page(chunk):
                warnings.extend(self._restore_pages(chunk, 1).warnings)  # fails, as its restore would
                return failed()
            words = self._read(chunk)
            for i in range(chunk_capacity(1 << P)):
                phys = words.get(1 + i, 0)
                if not phys:
                    break
                if index + block > total or not restore(phys, block):
                    return failed()
                pfn = phys >> P
                if runs and sum(runs[-1]) == pfn:
                    runs[-1] = (runs[-1][0], runs[-1][1] + block)
                else:
                    runs.append((pfn, block))
                index += block
            if not restore(chunk, 1):
                return failed()
            chunk = words.get(CHUNK_NEXT_WORD, 0)  # the chunk page is freed
        work += total
        if index != total or not _vm_area_fits(total << P, P + order):
            return failed()
        return OpResult(0, total, restored, warnings=tuple(warnings[:WARN_CAP]), may_time_out=work > SLOW_WORK,
                        pages=tuple(runs))

    def _retrieve(self, name: str) -> OpResult:
        if not self.accepted or self.fdt is None:
            return OpResult(-ENOENT)
        node = self.fdt.subnode_offset(0, name)
        if node < 0:
            return OpResult(-ENOENT)
        data, data_len = self.fdt.getprop(node, SUBTREE_DATA_PROP)
        size, size_len = self.fdt.getprop(node, SUBTREE_SIZE_PROP)
        if data is None or data_len != 8 or size is None or size_len != 8:
            return OpResult(-EINVAL)
        return OpResult(0, _u64(data), _u64(size))


def _vm_area_fits(size: int, shift: int) -> bool:
    """Whether the next kernel's vmalloc space has an area of ``size`` bytes
    mapped with pages of 2^shift bytes (the size rounded up to them)."""
    if shift >= 64 or not size:
        return False
    aligned = (size + (1 << shift) - 1) & ~((1 << shift) - 1) & U64
    return 0 < aligned <= VMALLOC_BYTES


def _u64(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


def handover(image: Image, header: Header, profile: Profile,
             quirk_set: frozenset[str] = frozenset()) -> tuple[NextBoot, dict[int, int], Fdt | None]:
    """Boot of the next kernel on ``image``: validate it, walk the preserved
    map, and record what memblock would be told. Any image: a bad one gives
    ``accepted=False`` and a reason (and nothing else). Under quirks the
    walk may fault (KernelFault) or never end (KernelRunaway)."""

    def reject(reason: str) -> tuple[NextBoot, dict[int, int], None]:
        return NextBoot(accepted=False, reason=reason), {}, None

    geo = geometry(header.page_shift)
    if image.page_shift != header.page_shift:
        return reject(f"image page shift {image.page_shift} on a {header.page_shift} kernel")
    fdt = Fdt(bytearray(image.fdt))
    if fdt.check_header() != 0:
        return reject("FDT header invalid")
    if fdt.node_check_compatible(0, profile.compatible) != 0:
        return reject(f"root is not compatible with {profile.compatible!r}")
    value, length = fdt.getprop(0, MEMORY_MAP_PROP)
    if value is None:
        return reject(f"{MEMORY_MAP_PROP} missing")
    if length != 8:
        return reject(f"{MEMORY_MAP_PROP} has length {length}, not 8")
    root = _u64(value)
    if root == 0:
        return reject(f"{MEMORY_MAP_PROP} is 0")
    P = header.page_shift
    trusting = quirks.NEXT_KERNEL_TRUSTS_TREE in quirk_set
    visits: list[Visit] = []
    events: list[tuple[bool, int]] = []  # the kernel's own walk (trusting): (True, page) or (False, key)
    if trusting:
        try:
            events = list(kernel_walk(root, geo, memory_reader(image, header)))
        except PageFault as fault:  # one name per type: compiled, a name keeps its first type
            raise KernelFault(str(fault)) from None
        except RunawayLoop as loop:
            raise KernelRunaway(str(loop)) from None
        keys = [value for is_node, value in events if not is_node]
        node_pages = tuple(value for is_node, value in events if is_node)
    else:
        try:
            visits = traverse(root, geo, page_reader(image), strict=True)
        except TreeError as refused:  # a name of its own: compiled, "e" would keep the type it has above
            return reject(str(refused))
        # Straight from the visits: a list of the walk's events would hold a tuple per key.
        keys = [v.base | b for v in visits if not v.level for b in leaf_bits(v.words)]
        node_pages = tuple(v.phys for v in visits)
    if not trusting:
        if keys and keys[-1].bit_length() > geo.key_width:  # keys ascend: the last is the widest
            return reject("tree key wider than the key width")
        if keys and keys[0] < 2:  # no order bit inside the key: no (phys, order) it could name
            return reject(f"tree key {keys[0]} encodes no page")

    # One pass over the keys, the pairs into flat words (Pairs): a handover may hold 10^6 blocks.
    walk_words, block_words = array("Q"), array("Q")
    int_overflow = quirks.RESERVE_SIZE_INT_OVERFLOW in quirk_set
    magic: dict[int, int] = {}
    phantom: list[int] = []
    for k in keys:
        phys, order = kernel_decode(k, P) if trusting else decode(k, P)
        walk_words.extend((phys, order))
        block_words.extend((phys, x86_int_shift(order + P) & U64 if int_overflow else x86_shl64(1, order + P)))
        pfn = phys >> P
        if header.is_ram(pfn):
            magic[pfn] = order
        else:
            phantom.append(pfn)
    walk, blocks = Pairs.of_words(walk_words), Pairs.of_words(block_words)

    scratch_marks = scratch_entries(image.scratch)
    slow = False
    if profile.key_api:
        end_of_dram = _end_of_dram(header)
        if quirks.EXTEND_SCRATCH_PER_GIB in quirk_set:
            try:
                seen = events if trusting else _walk_events(visits)
                ext = kernel_extend_scratch(seen, P, header.arena_pages - image.arena_hwm, end_of_dram)
            except RunawayLoop as e:
                raise KernelRunaway(str(e)) from None
            scratch_marks += ext.marks
            slow = ext.work > SLOW_WORK
        else:
            busy = list(blocks) + [(p, geo.page_size) for p in node_pages]
            scratch_marks += free_gib_blocks(busy, end_of_dram)
    next_boot = NextBoot(
        accepted=True,
        walk=walk,
        walk_nodes=node_pages if profile.key_api else (),
        reserved=Pairs.of_words(array("Q", (image.scratch_phys, len(image.scratch))) + block_words),
        noinit=blocks,
        scratch_marks=Pairs(scratch_marks),
        phantom=tuple(phantom),
        may_time_out=slow,
    )
    return next_boot, magic, fdt


def _walk_events(visits: list[Visit]) -> Iterator[tuple[bool, int]]:
    """A traversal as the kernel's walk reports it: (True, page) for each
    page entered, then (False, key) for each key of a leaf."""
    for v in visits:
        yield True, v.phys
        if not v.level:
            for b in leaf_bits(v.words):
                yield False, v.base | b


def _end_of_dram(header: Header) -> int:
    P = header.page_shift
    ends = [end << P for _, end in header.ram]
    ends.append(header.arena_range()[1] << P)
    ends += [addr + size for addr, size in header.scratch]
    return max(ends)


# ---- programs ------------------------------------------------------------------


def restore(image: Image, steps: tuple[Step, ...] | list[Step], header: Header, profile: Profile,
            quirks: frozenset[str] = frozenset()) -> tuple[NextBoot, list[OpResult]]:
    """Boot a next kernel on ``image`` (from the model or from the C code) and
    run ``steps`` on it. The returned ``magic`` is the state at handover."""
    next_boot, magic, fdt = handover(image, header, profile, quirks)
    next_boot = replace(next_boot, magic=Pairs(sorted(magic.items())))
    kernel = NextKernel(header, profile, next_boot.accepted, dict(magic), fdt, quirks=quirks, image=image)
    results: list[OpResult] = []
    for step in steps:
        try:
            results.append(kernel.apply(step))
        except KernelStop as e:
            e.next_boot, e.done = next_boot, results
            raise
    return next_boot, results


def run(program: Program, profile: Profile, quirks: frozenset[str] = frozenset(), *,
        next_profile: Profile | None = None, next_quirks: frozenset[str] | None = None) -> Outcome:
    """The model's outcome of ``program``: the specification, or with
    ``quirks`` (reference.quirks) what a kernel with those known bugs does.
    A quirk's fault or runaway loop ends the program there, as the kernel's
    would (an event; the ops after it never run).

    The next kernel is of the same version unless ``next_profile`` and
    ``next_quirks`` describe another (a live update across versions): it
    accepts or refuses the old kernel's image by its own profile."""
    with collector_paused():
        return _run(program, profile, quirks, next_profile, next_quirks)


def _run(program: Program, profile: Profile, quirks: frozenset[str], next_profile: Profile | None,
         next_quirks: frozenset[str] | None) -> Outcome:
    header = program.header
    header.validate()
    old = OldKernel(header, profile, quirks_check(quirks))
    next_quirks = old.quirks if next_quirks is None else quirks_check(next_quirks)
    boot = old.boot()
    kexec = program.kexec_index()
    before = program.steps if kexec is None else program.steps[:kexec]
    ops: list[OpResult] = []

    def cut(at: int, event: str, snap: Snapshot = Snapshot()) -> Outcome:
        results = tuple(ops) + (NOT_RUN_RESULT,) * (len(program.steps) - len(ops))
        return Outcome(boot=boot, ops=results, root_phys=snap.root_phys, tree=snap.tree, node_pages=snap.node_pages,
                       fdt=snap.fdt, image=snap.image, events=(event,), event_ops=(at,))

    for step in before:
        try:
            ops.append(old.apply(step))
        except KernelStop as e:
            return cut(len(ops), f"{e.kind}: {e}")
    if kexec is not None and old.enabled:
        old.corrupt_image()
    snap = old.snapshot()
    next_boot = None
    if kexec is not None:
        after = program.steps[kexec + 1 :]
        if snap.image is None:
            # No handover: still the old kernel.
            ops.append(UNSUPPORTED)
            ops += [old.apply(s) for s in after]
        else:
            try:
                next_boot, results = restore(snap.image, after, header, next_profile or profile, next_quirks)
            except KernelStop as e:
                if e.next_boot is None:  # the boot itself
                    return cut(kexec, f"{e.kind}: {e}", snap)
                ops.append(OK if e.next_boot.accepted else OpResult(-EINVAL))
                ops += e.done or []
                return cut(len(ops), f"{e.kind}: {e}", snap)
            ops.append(OK if next_boot.accepted else OpResult(-EINVAL))
            ops += results
    return Outcome(
        boot=boot,
        ops=tuple(ops),
        root_phys=snap.root_phys,
        tree=snap.tree,
        node_pages=snap.node_pages,
        fdt=snap.fdt,
        image=snap.image,
        next=next_boot,
    )
