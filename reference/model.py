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
  old-kernel ops after kexec get -EOPNOTSUPP.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from .arena import Arena
from .fdt import Fdt, kho_add_subtree, kho_remove_subtree, kho_root_fdt
from .geometry import Geometry, geometry
from .image import PageStore, page_reader, scratch_entries
from .keys import decode, in_domain, page_chunks, pfn_key, range_in_domain
from .outcome import EINVAL, ENOENT, ENOMEM, EOPNOTSUPP, ERANGE, Image, NextBoot, OpResult, Outcome, TreeNode
from .profiles import Profile
from .program import ARENA_BASE_PHYS, NEW_KERNEL_OPS, RESTORE_PAGE_LIMIT, RESTORE_SKIPPED, WARN_CAP, Header, Op, Program, Step
from .tree import RadixTree, TreeError, leaf_bits, traverse

OK = OpResult()
UNSUPPORTED = OpResult(-EOPNOTSUPP)
NULL = -1  # restore ops: the kernel returned NULL

WARN_DEL_ABSENT = "radix-del-absent"
WARN_BAD_MAGIC = "restore-bad-magic"

METADATA_NAME = "kexec-metadata"
RELEASE = b"kho-conform"
# struct { u32 version; char previous_release[65]; u32 kexec_count; } __packed
METADATA = struct.pack("<I65sI", 1, RELEASE, 1)

MEMORY_MAP_PROP = "preserved-memory-map"
SUBTREE_DATA_PROP = "preserved-data"
SUBTREE_SIZE_PROP = "blob-size"
GIB_SHIFT = 30  # extend-scratch granularity


# ---- old kernel ------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The old kernel's handover state, at kexec or at the end."""

    root_phys: int = 0
    tree: tuple[TreeNode, ...] = ()
    node_pages: PageStore | dict[int, bytes] = field(default_factory=dict)
    fdt: bytes = b""
    image: Image | None = None


class OldKernel:
    def __init__(self, header: Header, profile: Profile) -> None:
        self.header = header
        self.profile = profile
        self.geo: Geometry = geometry(header.page_shift)
        self.arena = Arena(header)
        self.enabled = False
        self.tree: RadixTree | None = None
        self.fdt: Fdt | None = None
        self.fdt_phys = 0
        self.pokes: list[Step] = []
        # New-kernel ops run here see a kernel that received no handover.
        self.no_handover = NextKernel(header, accepted=False, magic={}, fdt=None, booted=False)

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
        fdt = kho_root_fdt(self.geo.page_size, self.profile.compatible, root)
        self.arena.set_bytes(fdt_phys, fdt.buf)
        meta = self.arena.alloc()
        if meta is None:
            return OpResult(-ENOMEM)
        self.arena.set_content(meta, METADATA)
        rc = tree.add(pfn_key(meta >> P, 0, P)) or kho_add_subtree(
            fdt, self.geo.page_size, METADATA_NAME, meta, len(METADATA)
        )
        if rc:
            return OpResult(rc)
        self.tree, self.fdt, self.fdt_phys, self.enabled = tree, fdt, fdt_phys, True
        return OK

    def apply(self, step: Step) -> OpResult:
        if step.op in NEW_KERNEL_OPS:
            return self.no_handover.apply(step)
        if not self.enabled or step.op == Op.KEXEC:
            return UNSUPPORTED
        return self._apply(step)

    def _apply(self, step: Step) -> OpResult:
        assert self.tree is not None and self.fdt is not None
        op, a, b, P = step.op, step.a, step.b, self.header.page_shift
        if op in (Op.PRESERVE_FOLIO, Op.RADIX_ADD):
            if not in_domain(a, b, P):  # Model policy: the kernel does not validate
                return OpResult(-EINVAL)
            return OpResult(self.tree.add(pfn_key(a, b, P)))
        if op in (Op.UNPRESERVE_FOLIO, Op.RADIX_DEL):
            if not in_domain(a, b, P):
                return OpResult(-EINVAL)
            return self._delete([pfn_key(a, b, P)])
        if op == Op.PRESERVE_PAGES:
            if not range_in_domain(a, b, P):
                return OpResult(-EINVAL)
            return OpResult(self._preserve_pages(a, b))
        if op == Op.UNPRESERVE_PAGES:
            if not range_in_domain(a, b, P):
                return OpResult(-EINVAL)
            return self._delete([pfn_key(pfn, order, P) for pfn, order in page_chunks(a, b, self.header)])
        if op in (Op.RADIX_ADD_KEY, Op.RADIX_DEL_KEY):
            if not self.profile.key_api:
                return UNSUPPORTED
            if a.bit_length() > self.geo.key_width:
                return OpResult(-ERANGE) if op == Op.RADIX_ADD_KEY else OK
            return OpResult(self.tree.add(a)) if op == Op.RADIX_ADD_KEY else self._delete([a])
        if op == Op.ADD_SUBTREE:
            return OpResult(kho_add_subtree(self.fdt, self.geo.page_size, step.name, a, b))
        if op == Op.REMOVE_SUBTREE:
            kho_remove_subtree(self.fdt, self.geo.page_size, a)
            return OK
        if op in (Op.POKE_ARENA, Op.POKE_FDT):
            self.pokes.append(step)  # they corrupt the image at handover
            return OK
        raise AssertionError(f"unhandled op {op!r}")

    def corrupt_image(self) -> None:
        """Apply the pokes: they stand for corruption of the handover image in
        transit, so the old kernel itself never runs on corrupted state."""
        for step in self.pokes:
            if step.op == Op.POKE_ARENA:
                self.arena.poke(step.a, step.b, step.c)
            elif step.a < self.geo.page_size:
                self.fdt.buf[step.a] = step.b & 0xFF

    def _delete(self, keys: list[int]) -> OpResult:
        assert self.tree is not None
        absent = sum(not self.tree.delete(k) for k in keys)
        return OpResult(warnings=(WARN_DEL_ABSENT,) * min(absent, WARN_CAP)) if absent else OK

    def _preserve_pages(self, pfn: int, nr_pages: int) -> int:
        """Add every block; on failure remove the keys this call set (keys
        that were already present stay) and return the error."""
        assert self.tree is not None
        P = self.header.page_shift
        added: list[int] = []
        for start, order in page_chunks(pfn, nr_pages, self.header):
            key = pfn_key(start, order, P)
            present = self.tree.contains(key)
            rc = self.tree.add(key)
            if rc:
                for k in added:
                    self.tree.delete(k)
                return rc
            if not present:
                added.append(key)
        return 0

    def snapshot(self) -> Snapshot:
        if not self.enabled:
            return Snapshot()
        assert self.tree is not None and self.fdt is not None
        visits = list(self.tree.nodes())  # pre-order, ascending slots: sorted by path
        tree = tuple(
            TreeNode(v.path, v.level, v.phys, tuple(sorted(v.words)) if v.level else tuple(leaf_bits(v.words)))
            for v in visits
        )
        pages = PageStore({v.phys: dict(v.words) for v in visits}, self.geo.page_size)
        fdt = bytes(self.fdt.buf[: self.fdt.totalsize()])
        scratch = self.arena.page_bytes(ARENA_BASE_PHYS)[: 16 * len(self.header.scratch)]
        image = Image(self.header.page_shift, self.fdt_phys, fdt, ARENA_BASE_PHYS, scratch, pages)
        return Snapshot(self.tree.root, tree, pages, fdt, image)


# ---- next kernel -------------------------------------------------------------


class NextKernel:
    """A kernel after boot: the restore side of KHO."""

    def __init__(self, header: Header, accepted: bool, magic: dict[int, int], fdt: Fdt | None, booted: bool = True) -> None:
        self.header = header
        self.accepted = accepted
        self.booted = booted  # False: restore ops issued where no next kernel runs
        self.magic = magic  # pfn -> order of head pages still carrying the KHO magic
        self.fdt = fdt
        self.warned = False

    def apply(self, step: Step) -> OpResult:
        if not self.booted and step.op in NEW_KERNEL_OPS:
            # Restore ops where no next kernel runs: nothing to restore from.
            return OpResult(-ENOENT) if step.op == Op.RETRIEVE_SUBTREE else OpResult(NULL)
        if step.op == Op.RESTORE_FOLIO:
            return self._restore_folio(step.a)
        if step.op == Op.RESTORE_PAGES:
            return self._restore_pages(step.a, step.b)
        if step.op == Op.RETRIEVE_SUBTREE:
            return self._retrieve(step.name)
        return UNSUPPORTED  # old-kernel ops and a second kexec: no KHO state here

    def _bad_head(self, pfn: int, restored: int = 0) -> OpResult:
        """NULL; the magic check on a RAM page warns once per kernel, whether
        or not the handover was accepted (a restore after a refused handover
        is the caller's mistake, and worth a warning)."""
        if self.booted and self.header.is_ram(pfn) and not self.warned:
            self.warned = True
            return OpResult(NULL, 0, restored, warnings=(WARN_BAD_MAGIC,))
        return OpResult(NULL, 0, restored)

    def _restore_folio(self, phys: int) -> OpResult:
        pfn = phys >> self.header.page_shift
        if not self.accepted or not self.header.is_ram(pfn) or pfn not in self.magic:
            return self._bad_head(pfn)
        nr = 1 << self.magic[pfn]
        if nr > RESTORE_PAGE_LIMIT:
            return OpResult(RESTORE_SKIPPED)
        del self.magic[pfn]
        return OpResult(0, pfn, nr)

    def _restore_pages(self, phys: int, nr_pages: int) -> OpResult:
        """Model policy: expect exactly the blocks preserve_pages makes for
        this range under this machine's NUMA layout; blocks restored before a
        mismatch stay restored."""
        pfn = phys >> self.header.page_shift
        # The driver does not run restores that would initialise more than
        # RESTORE_PAGE_LIMIT struct pages: a long range, or a huge block
        # heading any page of it (the kernel restores by the stored order).
        if nr_pages > RESTORE_PAGE_LIMIT or any(
            pfn <= p < pfn + nr_pages and (1 << o) > RESTORE_PAGE_LIMIT for p, o in self.magic.items()
        ):
            return OpResult(RESTORE_SKIPPED)
        restored = 0  # pages handed to the managed count before a failure
        for start, order in page_chunks(pfn, nr_pages, self.header):
            if not self.accepted or not self.header.is_ram(start) or start not in self.magic:
                return self._bad_head(start, restored)
            if self.magic[start] != order:
                return OpResult(NULL, 0, restored)
            del self.magic[start]
            restored += 1 << order
        return OpResult(0, pfn, nr_pages)

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


def _u64(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


def handover(image: Image, header: Header, profile: Profile) -> tuple[NextBoot, dict[int, int], Fdt | None]:
    """Boot of the next kernel on ``image``: validate it, walk the preserved
    map, and record what memblock would be told. Any image, never raises:
    a bad one gives ``accepted=False`` and a reason (and nothing else)."""

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
    try:
        visits = list(traverse(root, geo, page_reader(image), strict=True))
    except TreeError as e:
        return reject(str(e))
    keys = [v.base | bit for v in visits if v.level == 0 for bit in leaf_bits(v.words)]
    if keys and keys[-1].bit_length() > geo.key_width:  # keys ascend: the last is the widest
        return reject("tree key wider than the key width")
    if keys and keys[0] < 2:  # no order bit inside the key: no (phys, order) it could name
        return reject(f"tree key {keys[0]} encodes no page")

    P = header.page_shift
    walk = tuple(decode(k, P) for k in keys)
    blocks = tuple((phys, 1 << (order + P)) for phys, order in walk)
    magic: dict[int, int] = {}
    phantom: list[int] = []
    for phys, order in walk:
        pfn = phys >> P
        if header.is_ram(pfn):
            magic[pfn] = order
        else:
            phantom.append(pfn)

    scratch_marks = scratch_entries(image.scratch)
    node_pages = tuple(v.phys for v in visits)
    if profile.key_api:
        busy = list(blocks) + [(p, geo.page_size) for p in node_pages]
        scratch_marks += _free_gib_blocks(busy, _end_of_dram(header))
    next_boot = NextBoot(
        accepted=True,
        walk=walk,
        walk_nodes=node_pages if profile.key_api else (),
        reserved=((image.scratch_phys, len(image.scratch)), *blocks),
        noinit=blocks,
        scratch_marks=tuple(scratch_marks),
        phantom=tuple(phantom),
    )
    return next_boot, magic, fdt


def _end_of_dram(header: Header) -> int:
    P = header.page_shift
    ends = [end << P for _, end in header.ram]
    ends.append(header.arena_range()[1] << P)
    ends += [addr + size for addr, size in header.scratch]
    return max(ends)


def _free_gib_blocks(busy: list[tuple[int, int]], end_of_dram: int) -> list[tuple[int, int]]:
    """Extend scratch: the gaps between the 1 GiB blocks touched by busy
    (phys, size) ranges, then the rest up to the end of DRAM. Worked on merged
    block ranges, so a huge range costs no more than a small one."""
    spans = sorted((p >> GIB_SHIFT, (p + size - 1) >> GIB_SHIFT) for p, size in busy)
    marks = []
    prev_end = 0
    for first, last in spans:
        start = first << GIB_SHIFT
        if start > prev_end:
            marks.append((prev_end, start - prev_end))
        prev_end = max(prev_end, (last + 1) << GIB_SHIFT)
    if prev_end < end_of_dram:
        marks.append((prev_end, end_of_dram - prev_end))
    return marks


# ---- programs ------------------------------------------------------------------


def restore(image: Image, steps: tuple[Step, ...] | list[Step], header: Header, profile: Profile) -> tuple[NextBoot, list[OpResult]]:
    """Boot a next kernel on ``image`` (from the model or from the C code) and
    run ``steps`` on it. The returned ``magic`` is the state at handover."""
    next_boot, magic, fdt = handover(image, header, profile)
    at_handover = tuple(sorted(magic.items()))
    kernel = NextKernel(header, next_boot.accepted, dict(magic), fdt)
    results = [kernel.apply(s) for s in steps]
    return replace(next_boot, magic=at_handover), results


def run(program: Program, profile: Profile) -> Outcome:
    header = program.header
    header.validate()
    old = OldKernel(header, profile)
    boot = old.boot()
    kexec = program.kexec_index()
    before = program.steps if kexec is None else program.steps[:kexec]
    ops = [old.apply(s) for s in before]
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
            next_boot, results = restore(snap.image, after, header, profile)
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
