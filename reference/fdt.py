"""Pure-Python model of the libfdt calls the kernel's KHO code makes on its
one-page FDT, reproducing libfdt's observable byte layout.

Written from the device-tree specification and from observing libfdt through
pylibfdt (tests/test_fdt.py compares every call byte for byte); no libfdt
source is copied. Why a model at all: the conformance model must predict the
exact FDT page the kernel hands over, including the return codes of the
failure paths (a full page, duplicate names, a corrupted page), so the
sequence of block moves, splices and header updates is reproduced step by
step rather than re-serialising a tree.

Memory model: an ``Fdt`` owns one ``bytearray`` (the page). libfdt trusts the
header, so a corrupted header can make the C code reach past the page; here
bytes outside the buffer read as zero, writes there are dropped and copies of
negative length do nothing, where C would read or write neighbouring memory or
crash. Within the page the model follows libfdt's C integer semantics (32-bit
unsigned header arithmetic, signed ``int`` offsets and sizes).

Observed layout facts this model relies on (each checked by the tests):
- fdt_create zeroes the buffer and starts the reservation map at 48 (the
  40-byte header rounded up to a 16-byte entry); fdt_pack moves it to 40;
- sequential-write strings grow downwards from the end of the buffer and are
  copied (not moved: the old copy stays) behind the structure by fdt_finish;
- a new subnode becomes the first child, a new property the *first* property
  of its node; property names are reused by first byte-match in the strings
  block, so a suffix of a longer name is reused too; deletions remove bytes and
  leave stale bytes between the new end of the data and the old one; strings
  are never garbage-collected.
"""

from __future__ import annotations

import struct

from . import shortcuts

FDT_MAGIC = 0xD00DFEED
FDT_SW_MAGIC = 0x2FF20112  # ~FDT_MAGIC: an unfinished sequential-write tree
FDT_BEGIN_NODE, FDT_END_NODE, FDT_PROP, FDT_NOP, FDT_END = 1, 2, 3, 4, 9
(FDT_ERR_NOTFOUND, FDT_ERR_EXISTS, FDT_ERR_NOSPACE, FDT_ERR_BADOFFSET, FDT_ERR_BADPATH,
 FDT_ERR_BADPHANDLE, FDT_ERR_BADSTATE, FDT_ERR_TRUNCATED, FDT_ERR_BADMAGIC,
 FDT_ERR_BADVERSION, FDT_ERR_BADSTRUCTURE, FDT_ERR_BADLAYOUT, FDT_ERR_INTERNAL,
 FDT_ERR_BADNCELLS, FDT_ERR_BADVALUE, FDT_ERR_BADOVERLAY, FDT_ERR_NOPHANDLES,
 FDT_ERR_BADFLAGS, FDT_ERR_ALIGNMENT) = range(1, 20)
EEXIST, ENOMEM = 17, 12

# Header field byte offsets (all big-endian u32).
(MAGIC, TOTALSIZE, OFF_DT_STRUCT, OFF_DT_STRINGS, OFF_MEM_RSVMAP, VERSION,
 LAST_COMP_VERSION, BOOT_CPUID_PHYS, SIZE_DT_STRINGS, SIZE_DT_STRUCT) = range(0, 40, 4)
HEADER_SIZE = 40  # version 17 header, also its 8-byte-aligned size
RSV_ENTRY = 16  # one memory-reservation entry: u64 address, u64 size
SW_HEADER_SIZE = 48  # fdt_create rounds the header up to a reservation entry
INT_MAX = 0x7FFFFFFF
_BE32, _HEADER = struct.Struct(">I"), struct.Struct(">10I")
_PROP_HEAD = struct.Struct(">III")  # tag, value length, name offset
U32 = 0xFFFFFFFF

PROP_COMPATIBLE = "compatible"
PROP_MEMORY_MAP = "preserved-memory-map"
PROP_DATA = "preserved-data"
PROP_SIZE = "blob-size"


def _align4(x: int) -> int:
    return (x + 3) & ~3


def _be32_at(block: bytes, i: int) -> int:
    """The big-endian u32 at ``block[i]`` (in bounds). ``bytes``, not
    ``bytearray``: compiled, indexing bytes is ten times faster than
    ``struct`` or indexing a bytearray."""
    return (block[i] << 24) | (block[i + 1] << 16) | (block[i + 2] << 8) | block[i + 3]


def _children(block: bytes, parent: int) -> list[tuple[bytes, int]] | None:
    """The names and offsets of the children of the node at ``parent`` in a
    v16+ structure block, walked tag by tag as libfdt walks, to the parent's
    end (or the block's FDT_END); None at a tag, length or name libfdt would
    reject on the way."""
    limit = len(block)
    out: list[tuple[bytes, int]] = []
    off, depth = parent, -1  # the parent's own tag brings depth to 0
    while off + 4 <= limit:
        tag = _be32_at(block, off)
        off += 4
        if tag == FDT_BEGIN_NODE:
            nul = block.find(0, off)
            if nul < 0:
                return None
            depth += 1
            if depth == 1:
                out.append((block[off:nul], off - 4))
            off = _align4(nul + 1)
        elif tag == FDT_PROP:
            if off + 4 > limit or depth < 0:
                return None
            n = _be32_at(block, off)
            if (n + off) & U32 >= INT_MAX or (n + off) & U32 < off or off + 8 + n > limit:
                return None
            off = _align4(off + 8 + n)
        elif tag == FDT_END_NODE:
            if depth < 0:
                return None
            depth -= 1
            if depth < 0:
                return out
        elif tag != FDT_NOP or depth < 0:
            return out if tag == FDT_END and depth >= 0 else None
    return None


def _s32(x: int) -> int:
    """C conversion of an unsigned 32-bit quantity to ``int``."""
    return ((x & U32) ^ 0x80000000) - 0x80000000


def _cstr(s: str | bytes) -> bytes:
    """What C sees of a name: its bytes up to the first NUL (strlen)."""
    b = s.encode() if isinstance(s, str) else bytes(s)
    return b.split(b"\0", 1)[0]


def _header_size(version: int) -> int:
    """Header length by version: v1 28 bytes, v2 adds boot_cpuid_phys, v3
    size_dt_strings, v17 size_dt_struct."""
    return 28 if version <= 1 else 32 if version == 2 else 36 if version <= 16 else 40


class Fdt:
    """A flattened device tree in a mutable buffer, with libfdt's calls as
    methods: same arguments after ``fdt``, same return values (0 or an offset,
    negative ``-FDT_ERR_*`` on error). Readers never raise on any content."""

    def __init__(self, buf: bytearray | bytes) -> None:
        self.buf = buf if isinstance(buf, bytearray) else bytearray(buf)
        # Set once libfdt would have read or written outside the buffer, or
        # copied a negative length: C then touches other memory (or crashes)
        # and the model stops predicting the C bytes exactly.
        self.out_of_bounds = False
        # (struct limit, struct offset, version, probe result) during a read-only scan
        self._frozen: tuple[int, int, int, int] | None = None
        # The root's children as _subnode_scan last read them, with the
        # structure block (and its offset) they were read from: a shortcut.
        self._root_children: tuple[int, bytes, list[tuple[bytes, int]]] | None = None

    # -- memory ----------------------------------------------------------
    def _span(self, off: int, n: int) -> tuple[int, int]:
        """The part of [off, off+n) inside the buffer; flags the rest."""
        lo, hi = max(off, 0), min(off + n, len(self.buf))
        if n > 0 and (lo != off or hi != off + n):
            self.out_of_bounds = True
        return lo, hi

    def _read(self, off: int, n: int) -> bytes:
        """``n`` bytes at ``off``; outside the buffer reads as zero."""
        lo, hi = self._span(off, n)
        if lo >= hi:
            return bytes(max(n, 0))
        return bytes(lo - off) + bytes(self.buf[lo:hi]) + bytes(off + n - hi)

    def _write(self, off: int, data: bytes) -> None:
        lo, hi = self._span(off, len(data))
        if lo < hi:
            self.buf[lo:hi] = data[lo - off:hi - off]

    def _memmove(self, dst: int, src: int, n: int) -> None:
        if n < 0:
            self.out_of_bounds = True  # C: a copy of (size_t)n bytes
        lo, hi = self._span(dst, n)
        if lo < hi:
            self.buf[lo:hi] = self._read(src + lo - dst, hi - lo)

    def _u32(self, off: int) -> int:
        if 0 <= off <= len(self.buf) - 4:
            return _BE32.unpack_from(self.buf, off)[0]
        return int.from_bytes(self._read(off, 4), "big")

    def _header(self) -> tuple[int, ...]:
        """All ten header fields, in on-disk order."""
        if len(self.buf) >= HEADER_SIZE:
            return _HEADER.unpack_from(self.buf)
        return _HEADER.unpack(self._read(0, HEADER_SIZE))

    def _w32(self, off: int, v: int) -> None:
        self._write(off, (v & U32).to_bytes(4, "big"))

    def _find0(self, lo: int, hi: int) -> int:
        """First NUL in [lo, hi) (zeros beyond the buffer count), else -1."""
        n = len(self.buf)
        if lo >= hi:
            return -1
        i = self.buf.find(0, lo, min(hi, n)) if lo < n else -1
        if i < 0 and max(lo, n) < hi:
            self.out_of_bounds = True
            return max(lo, n)
        return i

    def totalsize(self) -> int:
        return self._u32(TOTALSIZE)

    # -- header checks ---------------------------------------------------
    def check_header(self) -> int:
        """fdt_check_header: magic, version window, and every block inside
        totalsize. (libfdt also rejects a buffer not 8-byte aligned; a page
        always is.)"""
        h = self._header()
        if h[0] != FDT_MAGIC:
            return -FDT_ERR_BADMAGIC
        ver, comp, total = h[5], h[6], h[1]
        if ver < 2 or comp > 17 or ver < comp:
            return -FDT_ERR_BADVERSION
        hs = _header_size(ver)
        if not hs <= total <= INT_MAX:
            return -FDT_ERR_TRUNCATED
        # The devicetree specification: the memory reservation block at an
        # 8-byte aligned offset, the structure block 4-byte aligned. (The
        # kernel's libfdt checks this; older libfdt, as in pylibfdt, does not.)
        if h[4] % 8 or h[2] % 4:
            return -FDT_ERR_ALIGNMENT

        def within(base: int, size: int = 0) -> bool:
            return hs <= base <= total and hs <= base + size <= total

        if not within(h[4]) or not within(h[2], h[9] if ver >= 17 else 0):
            return -FDT_ERR_TRUNCATED
        return 0 if within(h[3], h[8]) else -FDT_ERR_TRUNCATED

    def _ro_probe(self) -> int:
        """Light check done by read-only calls: totalsize, or an error."""
        magic = self._u32(MAGIC)
        if magic == FDT_MAGIC:
            if self._u32(VERSION) < 2 or self._u32(LAST_COMP_VERSION) > 17:
                return -FDT_ERR_BADVERSION
        elif magic == FDT_SW_MAGIC:
            if self._u32(SIZE_DT_STRUCT) == 0:
                return -FDT_ERR_BADSTATE
        else:
            return -FDT_ERR_BADMAGIC
        total = self.totalsize()
        return total if total < INT_MAX else -FDT_ERR_TRUNCATED

    def _misordered(self, rsv_size: int, struct_size: int) -> bool:
        """Whether the blocks are not laid out header, reservation map,
        structure, strings (gaps allowed), in 32-bit unsigned arithmetic."""
        rsv, st, strs = self._u32(OFF_MEM_RSVMAP), self._u32(OFF_DT_STRUCT), self._u32(OFF_DT_STRINGS)
        return (rsv < HEADER_SIZE or st < (rsv + rsv_size) & U32
                or strs < (st + struct_size) & U32
                or self.totalsize() < (strs + self._u32(SIZE_DT_STRINGS)) & U32)

    def _rw_probe(self) -> int:
        """Check done by read-write calls: a finished v17 tree with blocks in
        order (reservation map, structure, strings)."""
        err = self._ro_probe()
        if err < 0:
            return err
        if self._u32(VERSION) < 17:
            return -FDT_ERR_BADVERSION
        if self._misordered(RSV_ENTRY, self._u32(SIZE_DT_STRUCT)):
            return -FDT_ERR_BADLAYOUT
        self._w32(VERSION, 17)  # a newer version is lowered to 17
        return 0

    def _num_mem_rsv(self) -> int:
        """Reservation entries before the zero-size terminator. With
        totalsize below one entry libfdt has no bound and scans on."""
        rsv, total = self._u32(OFF_MEM_RSVMAP), self.totalsize()
        i = 0
        while True:
            pos = rsv + i * RSV_ENTRY
            if pos > U32 or (total >= RSV_ENTRY and pos > total - RSV_ENTRY):
                return -FDT_ERR_TRUNCATED
            if not any(self._read(pos + 8, 8)):
                return i
            i += 1

    # -- structure walking -----------------------------------------------
    def _struct_limit(self) -> int:
        """Structure-block offsets below this are readable: inside totalsize
        and (v17+) inside size_dt_struct."""
        if self._frozen:
            return self._frozen[0]
        h = self._header()
        return min(h[1] - h[2], h[9]) if h[5] >= 17 else h[1] - h[2]

    def _scan_start(self) -> int:
        """Begin a read-only scan: the header cannot change until
        ``_scan_end``, so the fields every tag read needs are read once
        (a scan of n nodes re-read them n times). Returns the probe result."""
        probe = self._ro_probe()
        self._frozen = (self._struct_limit(), self._u32(OFF_DT_STRUCT), self._u32(VERSION), probe)
        return probe

    def _scan_end(self) -> None:
        self._frozen = None

    def _next_tag(self, off: int) -> tuple[int, int]:
        """(tag, next offset). A malformed tag reads as FDT_END with a negative
        next offset: -TRUNCATED if the tag itself is out of range, else
        -BADSTRUCTURE."""
        limit = self._struct_limit()
        base = self._frozen[1] if self._frozen else self._u32(OFF_DT_STRUCT)
        if off < 0 or off + 4 > limit:
            return FDT_END, -FDT_ERR_TRUNCATED
        tag = self._u32(base + off)
        off += 4
        if tag == FDT_BEGIN_NODE:
            nul = self._find0(base + off, base + limit)
            if nul < 0:
                return FDT_END, -FDT_ERR_BADSTRUCTURE
            off = nul - base + 1
        elif tag == FDT_PROP:
            if off + 4 > limit:
                return FDT_END, -FDT_ERR_BADSTRUCTURE
            n = self._u32(base + off)
            if (n + off) & U32 >= INT_MAX or (n + off) & U32 < off:
                return FDT_END, -FDT_ERR_BADSTRUCTURE
            off += 8 + n
            if (self._frozen[2] if self._frozen else self._u32(VERSION)) < 16 and n >= 8 and (off - n) % 8:
                off += 4  # pre-v16 trees 8-align values of 8 bytes or more
        elif tag not in (FDT_END, FDT_END_NODE, FDT_NOP):
            return FDT_END, -FDT_ERR_BADSTRUCTURE
        if off > limit:
            return FDT_END, -FDT_ERR_BADSTRUCTURE
        return tag, _align4(off)

    def _check_tag(self, off: int, want: int) -> int:
        """Offset after the tag at ``off`` if it is a ``want`` tag."""
        if off < 0 or off % 4:
            return -FDT_ERR_BADOFFSET
        tag, nxt = self._next_tag(off)
        return nxt if tag == want else -FDT_ERR_BADOFFSET

    def _next_node(self, off: int, depth: int) -> tuple[int, int]:
        """fdt_next_node: (next node offset or error, its depth)."""
        nxt = 0
        if off >= 0:
            nxt = self._check_tag(off, FDT_BEGIN_NODE)
            if nxt < 0:
                return nxt, depth
        while True:
            off = nxt
            tag, nxt = self._next_tag(off)
            if tag == FDT_BEGIN_NODE:
                return off, depth + 1
            if tag == FDT_END_NODE:
                depth -= 1
                if depth < 0:
                    return nxt, depth
            elif tag == FDT_END:
                return (-FDT_ERR_NOTFOUND if nxt >= 0 else nxt), depth

    def _node_end(self, off: int) -> int:
        depth = 0
        while off >= 0 and depth >= 0:
            off, depth = self._next_node(off, depth)
        return off

    def _get_name(self, off: int) -> bytes | int:
        err = self._frozen[3] if self._frozen else self._ro_probe()
        err = err if err < 0 else self._check_tag(off, FDT_BEGIN_NODE)
        if err < 0:
            return err
        start = (self._frozen[1] if self._frozen else self._u32(OFF_DT_STRUCT)) + off + 4  # NUL-ended: checked above
        name = self._read(start, self._find0(start, start + len(self.buf) + 1) - start)
        if (self._frozen[2] if self._frozen else self._u32(VERSION)) < 16:  # pre-v16 nodes hold full paths
            if b"/" not in name:
                return -FDT_ERR_BADSTRUCTURE
            name = name.rsplit(b"/", 1)[1]
        return name

    def _get_string(self, stroff: int) -> bytes | None:
        """The string at ``stroff`` in the strings block if it is NUL-ended
        inside the block (negative offsets count from the end of a
        sequential-write block)."""
        total = self._ro_probe()
        if total < 0:
            return None
        start = (stroff + self._u32(OFF_DT_STRINGS)) & U32
        size = self._u32(SIZE_DT_STRINGS)
        if start >= total:
            return None
        n = total - start
        if self._u32(MAGIC) == FDT_MAGIC:
            if stroff < 0 or (self._u32(VERSION) >= 17 and stroff >= size):
                return None
            if self._u32(VERSION) >= 17:
                n = min(n, size - stroff)
        elif stroff >= 0 or -stroff > size:
            return None
        else:
            n = min(n, -stroff)
        nul = self._find0(start, start + n)
        return None if nul < 0 else self._read(start, nul - start)

    def _next_prop(self, off: int) -> int:
        """The first property at or after ``off`` inside the current node."""
        while True:
            tag, nxt = self._next_tag(off)
            if tag == FDT_END:
                return -FDT_ERR_BADSTRUCTURE if nxt >= 0 else nxt
            if tag == FDT_PROP:
                return off
            if tag != FDT_NOP:
                return -FDT_ERR_NOTFOUND
            off = nxt

    def _find_prop(self, node: int, name: bytes) -> tuple[int, int]:
        """(property offset, value length), or (error, error)."""
        found = self._prop_scan(node, name)
        return self._prop_walk(node, name) if found is None else found

    def _prop_scan(self, node: int, name: bytes) -> tuple[int, int] | None:
        """_find_prop in one loop over a well-formed node of a v17+ tree
        whose structure and strings blocks lie inside the buffer (every
        lookup the kernel makes, but after a poke). None on anything else
        (a tag, length, name or string offset libfdt would reject or not
        find): then ``_prop_walk`` answers. Reads only."""
        buf = self.buf
        if len(buf) < HEADER_SIZE:
            return None
        magic, total, base, strs, _, version, last_comp, _, str_size, st_size = _HEADER.unpack_from(buf)
        limit = min(total - base, st_size)
        if (magic != FDT_MAGIC or version < 17 or last_comp > 17 or total >= INT_MAX or node < 0 or node % 4
                or limit < 0 or base + limit > len(buf) or strs + str_size > min(total, len(buf))):
            return None
        unpack, end = _BE32.unpack_from, base + limit
        if node + 4 > limit or unpack(buf, base + node)[0] != FDT_BEGIN_NODE:
            return None
        nul = buf.find(0, base + node + 4, end)
        off = _align4(nul - base + 1)
        if nul < 0 or off > limit:
            return None
        while off + 4 <= limit:
            tag = unpack(buf, base + off)[0]
            if tag == FDT_NOP:
                off += 4
                continue
            if tag == FDT_END_NODE:
                return -FDT_ERR_NOTFOUND, -FDT_ERR_NOTFOUND
            if tag == FDT_BEGIN_NODE:  # a child before any (further) property
                nul = buf.find(0, base + off + 4, end)
                ok = nul >= 0 and _align4(nul - base + 1) <= limit
                return (-FDT_ERR_NOTFOUND, -FDT_ERR_NOTFOUND) if ok else None
            if tag != FDT_PROP or off + 12 > limit:
                return None
            n, nameoff = unpack(buf, base + off + 4)[0], _s32(unpack(buf, base + off + 8)[0])
            if n + off + 4 >= INT_MAX or off + 12 + n > limit or not 0 <= nameoff < str_size:
                return None
            start = strs + nameoff  # inside the strings block, which ends inside totalsize
            nul = buf.find(0, start, strs + str_size)
            if nul >= 0 and buf[start:nul] == name:
                return off, _s32(n)
            off = _align4(off + 12 + n)
        return None

    def _prop_walk(self, node: int, name: bytes) -> tuple[int, int]:
        """_find_prop the long way, a tag at a time as libfdt reads."""
        off = self._check_tag(node, FDT_BEGIN_NODE)
        off = self._next_prop(off) if off >= 0 else off
        base = self._u32(OFF_DT_STRUCT)
        while off >= 0:
            if self._get_string(_s32(self._u32(base + off + 8))) == name:
                return off, _s32(self._u32(base + off + 4))
            off = self._check_tag(off, FDT_PROP)
            off = self._next_prop(off) if off >= 0 else off
        return off, off

    # -- read-only API -----------------------------------------------------
    def _prop_value(self, node: int, name: str | bytes) -> tuple[int, int]:
        """fdt_getprop's lookup: (buffer position of the value, length), or
        (-1, error)."""
        off, n = self._find_prop(node, _cstr(name))
        if off < 0:
            return -1, n
        pos = self._u32(OFF_DT_STRUCT) + off + 12
        if self._u32(VERSION) < 16 and (off + 12) % 8 and n >= 8:
            pos += 4  # pre-v16 values of 8 bytes or more start 8-aligned
        return pos, n

    def value_offset(self, node: int, name: str | bytes) -> int:
        """Where ``name``'s value starts in the buffer (its length word is 8
        bytes before it), or -1 when the property is absent."""
        return self._prop_value(node, name)[0]

    def getprop(self, node: int, name: str | bytes) -> tuple[bytes | None, int]:
        """fdt_getprop: (value, length) or (None, error). A value running past
        the buffer is cut at its end (``length`` still says what C saw)."""
        pos, n = self._prop_value(node, name)
        return (None, n) if pos < 0 else (bytes(self.buf[slice(*self._span(pos, n))]), n)

    def first_subnode(self, node: int) -> int:
        off, depth = self._next_node(node, 0)
        return off if off >= 0 and depth == 1 else -FDT_ERR_NOTFOUND

    def next_subnode(self, off: int) -> int:
        depth = 1
        while True:
            off, depth = self._next_node(off, depth)
            if off < 0 or depth < 1:
                return -FDT_ERR_NOTFOUND
            if depth == 1:
                return off

    def subnodes(self, parent: int) -> list[int]:
        """Offsets of ``parent``'s children (fdt_for_each_subnode)."""
        out, off = [], self.first_subnode(parent)
        while off >= 0:
            out.append(off)
            off = self.next_subnode(off)
        return out

    def subnode_offset(self, parent: int, name: str | bytes) -> int:
        """fdt_subnode_offset. "foo" also matches "foo@unit" unless the
        searched name has an '@' itself."""
        want = _cstr(name)
        err = self._scan_start()
        try:
            if err < 0:
                return err
            found = self._subnode_scan(parent, want)
            return self._subnode_walk(parent, want) if found is None else found
        finally:
            self._scan_end()

    def _subnode_scan(self, parent: int, want: bytes) -> int | None:
        """subnode_offset from the list of the parent's children, read in
        one loop over a v16+ structure block lying inside the buffer and
        well-formed to the parent's end (the kernel's FDT, with dozens of
        children: the model's hottest path). None on anything else (a tag,
        length or name libfdt would reject on the way, an old version, a
        block past the buffer): then ``_subnode_walk`` answers. Reads only,
        so the fallback starts from the same state."""
        assert self._frozen is not None  # inside a scan
        limit, base, version, _ = self._frozen
        buf = self.buf
        if version < 16 or parent < 0 or parent % 4 or base < 0 or limit < 0 or base + limit > len(buf):
            return None
        block: bytes = bytes(buf[base:base + limit])  # offsets in the block are the structure offsets
        kept = self._root_children if parent == 0 and shortcuts.ENABLED else None
        if kept is not None and kept[0] == base and kept[1] == block:
            children: list[tuple[bytes, int]] | None = kept[2]  # a shortcut: the same bytes, the same children
        else:
            children = _children(block, parent)
            if parent == 0 and children is not None and shortcuts.ENABLED:
                self._root_children = (base, block, children)
        if children is None:
            return None
        n_want = len(want)
        plain = b"@" not in want
        for name, off in children:
            if name[:n_want] == want and (len(name) == n_want or (plain and name[n_want:n_want + 1] == b"@")):
                return off
        return -FDT_ERR_NOTFOUND

    def _subnode_walk(self, parent: int, want: bytes) -> int:
        """subnode_offset the long way, node by node as libfdt walks; inside
        a read-only scan."""
        off, depth = parent, 0
        while off >= 0 and depth >= 0:
            if depth == 1:
                got = self._get_name(off)
                if isinstance(got, bytes) and got[:len(want)] == want and (
                        len(got) == len(want) or (b"@" not in want and got[len(want)] == 0x40)):
                    return off
            off, depth = self._next_node(off, depth)
        return -FDT_ERR_NOTFOUND if depth < 0 else off

    def node_check_compatible(self, node: int, compatible: str | bytes) -> int:
        """0 if the "compatible" string list holds ``compatible``, 1 if not,
        the getprop error if there is no such property. Like libfdt, each
        comparison reads one byte past the entry, possibly past the value."""
        pos, n = self._prop_value(node, PROP_COMPATIBLE)
        if pos < 0:
            return n
        want = _cstr(compatible) + b"\0"
        while n >= len(want) - 1:
            if self._read(pos, len(want)) == want:
                return 0
            nul = self._find0(pos, pos + n)
            if nul < 0:
                return 1
            n, pos = n - (nul - pos + 1), nul + 1
        return 1

    # -- read-write API ----------------------------------------------------
    def _splice(self, pos: int, old: int, new: int) -> int:
        """Replace ``old`` bytes at ``pos`` by ``new`` (uninitialised) bytes,
        shifting everything up to the end of the strings block."""
        dsize = (self._u32(OFF_DT_STRINGS) + self._u32(SIZE_DT_STRINGS)) & U32
        if old < 0 or pos < 0 or pos + old > dsize or (dsize + new) & U32 < old:
            return -FDT_ERR_BADOFFSET
        if (dsize - old + new) & U32 > self.totalsize():
            return -FDT_ERR_NOSPACE
        self._memmove(pos + new, pos + old, dsize - pos - old)
        return 0

    def _splice_struct(self, pos: int, old: int, new: int) -> int:
        err = self._splice(pos, old, new)
        if not err:
            self._w32(SIZE_DT_STRUCT, self._u32(SIZE_DT_STRUCT) + new - old)
            self._w32(OFF_DT_STRINGS, self._u32(OFF_DT_STRINGS) + new - old)
        return err

    def _find_add_string(self, name: bytes) -> tuple[int, bool]:
        """(string offset or error, whether it was appended)."""
        strtab, size = self._u32(OFF_DT_STRINGS), self._u32(SIZE_DT_STRINGS)
        end = strtab + _s32(size)
        hit = self.buf.find(name + b"\0", strtab, end) if end > strtab else -1
        if hit < 0 and end > len(self.buf):
            self.out_of_bounds = True
        if hit >= 0:
            return hit - strtab, False
        err = self._splice(strtab + size, 0, len(name) + 1)
        if err:
            return err, False
        self._write(strtab + size, name + b"\0")
        self._w32(SIZE_DT_STRINGS, size + len(name) + 1)
        return size, True

    def open_into(self, bufsize: int) -> int:
        """fdt_open_into(fdt, fdt, bufsize), in place: make the tree writable
        with ``bufsize`` bytes of room, reordering blocks if needed."""
        total = self._ro_probe()
        if total < 0:
            return total
        rsv = _s32((self._num_mem_rsv() + 1) * RSV_ENTRY)
        version = self._u32(VERSION)
        if version >= 17:
            st = _s32(self._u32(SIZE_DT_STRUCT))
        elif version == 16:
            st, tag = 0, 0
            while tag != FDT_END:
                tag, st = self._next_tag(st)
            if st < 0:
                return st
        else:
            return -FDT_ERR_BADVERSION
        if not self._misordered(rsv, st):  # in order: only the header changes
            if bufsize < 0 or total > bufsize:
                return -FDT_ERR_NOSPACE
            self._w32(VERSION, 17)
            self._w32(SIZE_DT_STRUCT, st)
            self._w32(TOTALSIZE, bufsize)
            return 0
        strings = self._u32(SIZE_DT_STRINGS)
        newsize = _s32(HEADER_SIZE + rsv + st + strings)
        if bufsize < newsize:
            return -FDT_ERR_NOSPACE
        tmp = 0
        if newsize > 0 and total > 0:  # would overlap the old tree: build behind it
            tmp = total
            if tmp + newsize > bufsize:
                return -FDT_ERR_NOSPACE
        self._packblocks(tmp, rsv, st, strings)
        self._memmove(0, tmp, newsize)
        # boot_cpuid_phys is also copied from the old header, which *is* the
        # new one after the move: a no-op.
        for field, v in ((MAGIC, FDT_MAGIC), (TOTALSIZE, bufsize), (VERSION, 17), (LAST_COMP_VERSION, 16)):
            self._w32(field, v)
        return 0

    def _packblocks(self, new: int, rsv: int, st: int, strings: int) -> None:
        """Copy the three blocks from the tree at 0 to a tree at ``new``,
        back to back after a 40-byte header, updating ``new``'s header."""
        soff = HEADER_SIZE + rsv
        stroff = _s32(soff + st)
        self._memmove(new + HEADER_SIZE, self._u32(OFF_MEM_RSVMAP), rsv)
        self._w32(new + OFF_MEM_RSVMAP, HEADER_SIZE)
        self._memmove(new + soff, self._u32(OFF_DT_STRUCT), st)
        self._w32(new + OFF_DT_STRUCT, soff)
        self._w32(new + SIZE_DT_STRUCT, st)
        self._memmove(new + stroff, self._u32(OFF_DT_STRINGS), strings)
        self._w32(new + OFF_DT_STRINGS, stroff)
        self._w32(new + SIZE_DT_STRINGS, self._u32(SIZE_DT_STRINGS))

    def pack(self) -> int:
        """fdt_pack: close the gaps between blocks; totalsize becomes the
        end of the strings block. Bytes after it are left as they were."""
        err = self._rw_probe()
        if err:
            return err
        rsv = _s32((self._num_mem_rsv() + 1) * RSV_ENTRY)
        self._packblocks(0, rsv, _s32(self._u32(SIZE_DT_STRUCT)), _s32(self._u32(SIZE_DT_STRINGS)))
        self._w32(TOTALSIZE, self._u32(OFF_DT_STRINGS) + self._u32(SIZE_DT_STRINGS))
        return 0

    def add_subnode(self, parent: int, name: str | bytes) -> int:
        """fdt_add_subnode: insert an empty node as the first child (right
        after ``parent``'s properties); its offset, or -EXISTS etc."""
        name = _cstr(name)
        err = self._rw_probe()
        if err:
            return err
        off = self.subnode_offset(parent, name)
        if off >= 0:
            return -FDT_ERR_EXISTS
        if off != -FDT_ERR_NOTFOUND:
            return off
        tag, nxt = self._next_tag(parent)
        if tag != FDT_BEGIN_NODE:
            return -FDT_ERR_INTERNAL
        while True:
            off = nxt
            tag, nxt = self._next_tag(off)
            if tag not in (FDT_PROP, FDT_NOP):
                break
        namelen = _align4(len(name) + 1)
        pos = self._u32(OFF_DT_STRUCT) + off
        err = self._splice_struct(pos, 0, namelen + 8)
        if err:
            return err
        self._write(pos, struct.pack(">I", FDT_BEGIN_NODE) + name.ljust(namelen, b"\0")
                    + struct.pack(">I", FDT_END_NODE))
        return off

    def setprop(self, node: int, name: str | bytes, value: bytes) -> int:
        """fdt_setprop: resize an existing property in place, or insert a new
        one as the node's first property (the name string is appended to the
        strings block unless some byte-match is already there)."""
        name, value = _cstr(name), bytes(value)
        err = self._rw_probe()
        if err:
            return err
        off, old = self._find_prop(node, name)
        base = self._u32(OFF_DT_STRUCT)
        if off >= 0:
            err = self._splice_struct(base + off + 12, _align4(old), _align4(len(value)))
            if err:
                return err
        elif off != -FDT_ERR_NOTFOUND:
            return off
        else:
            off = self._check_tag(node, FDT_BEGIN_NODE)
            if off < 0:
                return off
            stroff, appended = self._find_add_string(name)
            if stroff < 0:
                return stroff
            err = self._splice_struct(base + off, 0, 12 + _align4(len(value)))
            if err:
                if appended:  # roll the string back (its bytes stay)
                    self._w32(SIZE_DT_STRINGS, self._u32(SIZE_DT_STRINGS) - len(name) - 1)
                return err
            self._w32(base + off, FDT_PROP)
            self._w32(base + off + 8, stroff)
        self._w32(base + off + 4, len(value))
        self._write(base + off + 12, value)
        return 0

    def del_node(self, node: int) -> int:
        """fdt_del_node: cut the node and its subtree out of the structure."""
        err = self._rw_probe()
        if err:
            return err
        end = self._node_end(node)
        if end < 0:
            return end
        return self._splice_struct(self._u32(OFF_DT_STRUCT) + node, end - node, 0)

    # -- sequential-write API (building the root FDT) ------------------------
    # While building, the magic is FDT_SW_MAGIC, off_dt_strings is 0 until
    # the reservation map is finished and then equals totalsize, and the
    # strings grow down from the end of the buffer.
    def _sw_probe(self, in_struct: bool = True) -> int:
        magic = self._u32(MAGIC)
        if magic != FDT_SW_MAGIC:
            return -FDT_ERR_BADSTATE if magic == FDT_MAGIC else -FDT_ERR_BADMAGIC
        strings = self._u32(OFF_DT_STRINGS)
        return 0 if strings == (self.totalsize() if in_struct else 0) else -FDT_ERR_BADSTATE

    def _sw_append(self, data: bytes) -> int:
        """Append ``data`` to the structure block if it fits below the
        strings."""
        err = self._sw_probe()
        if err:
            return err
        used, base = self._u32(SIZE_DT_STRUCT), self._u32(OFF_DT_STRUCT)
        if used + len(data) > (self.totalsize() - base - self._u32(SIZE_DT_STRINGS)) & U32:
            return -FDT_ERR_NOSPACE
        self._w32(SIZE_DT_STRUCT, used + len(data))
        self._write(base + used, data)
        return 0

    def create(self) -> int:
        """fdt_create over the whole buffer: zero it, write a
        sequential-write header."""
        if len(self.buf) < SW_HEADER_SIZE:
            return -FDT_ERR_NOSPACE
        self.buf[:] = bytes(len(self.buf))
        for field, v in ((MAGIC, FDT_SW_MAGIC), (VERSION, 17), (TOTALSIZE, len(self.buf)),
                         (OFF_MEM_RSVMAP, SW_HEADER_SIZE), (OFF_DT_STRUCT, SW_HEADER_SIZE)):
            self._w32(field, v)
        return 0

    def finish_reservemap(self) -> int:
        """Terminate the (empty) reservation map; the structure follows."""
        err = self._sw_probe(False)
        if err:
            return err
        off = self._u32(OFF_DT_STRUCT)
        if off + RSV_ENTRY > self.totalsize():
            return -FDT_ERR_NOSPACE
        self._write(off, bytes(RSV_ENTRY))
        self._w32(OFF_DT_STRUCT, off + RSV_ENTRY)
        self._w32(OFF_DT_STRINGS, self.totalsize())
        return 0

    def begin_node(self, name: str | bytes) -> int:
        name = _cstr(name)
        return self._sw_append(struct.pack(">I", FDT_BEGIN_NODE) + name.ljust(_align4(len(name) + 1), b"\0"))

    def end_node(self) -> int:
        return self._sw_append(struct.pack(">I", FDT_END_NODE))

    def property(self, name: str | bytes, value: bytes) -> int:
        """fdt_property. Names are stored newest lowest, at negative offsets
        from the end of the buffer until fdt_finish; existing ones (or a
        suffix of one) are reused."""
        name = _cstr(name) + b"\0"
        err = self._sw_probe()
        if err:
            return err
        end, size = self.totalsize(), self._u32(SIZE_DT_STRINGS)
        hit = self.buf.find(name, max(end - size, 0), end)
        nameoff = hit - end if hit >= 0 else -(size + len(name))
        if hit < 0:
            if (end + nameoff) & U32 < self._u32(OFF_DT_STRUCT) + self._u32(SIZE_DT_STRUCT):
                return -FDT_ERR_NOSPACE
            self._write(end + nameoff, name)
            self._w32(SIZE_DT_STRINGS, size + len(name))
        value = bytes(value)
        err = self._sw_append(struct.pack(">III", FDT_PROP, len(value), nameoff & U32)
                              + value.ljust(_align4(len(value)), b"\0"))
        if err:
            self._w32(SIZE_DT_STRINGS, size)  # drop the name if it was new
        return err

    def property_string(self, name: str | bytes, value: str) -> int:
        return self.property(name, value.encode() + b"\0")

    def finish(self) -> int:
        """fdt_finish: end the structure, copy the strings behind it, turn the
        negative name offsets into real ones and seal the header."""
        err = self._sw_append(struct.pack(">I", FDT_END))
        if err:
            return err
        size = self._u32(SIZE_DT_STRINGS)
        new = self._u32(OFF_DT_STRUCT) + self._u32(SIZE_DT_STRUCT)
        self._memmove(new, self.totalsize() - size, size)
        self._w32(OFF_DT_STRINGS, new)
        off, base = 0, self._u32(OFF_DT_STRUCT)
        while True:
            tag, nxt = self._next_tag(off)
            if tag == FDT_END:
                break
            if tag == FDT_PROP:
                self._w32(base + off + 8, self._u32(base + off + 8) + size)
            off = nxt
        if nxt < 0:
            return nxt
        self._w32(TOTALSIZE, new + size)
        self._w32(LAST_COMP_VERSION, 16)
        self._w32(MAGIC, FDT_MAGIC)
        return 0


def _u64(v: int) -> bytes:
    return (v & (2**64 - 1)).to_bytes(8, "little")


def kho_root_fdt(page_size: int, compatible: str, root_phys: int) -> Fdt:
    """The old kernel's root FDT: one page, compatible plus the little-endian
    physical address of the preserved-memory map."""
    fdt = Fdt(bytearray(page_size))
    steps = (fdt.create, fdt.finish_reservemap, lambda: fdt.begin_node(""),
             lambda: fdt.property_string(PROP_COMPATIBLE, compatible),
             lambda: fdt.property(PROP_MEMORY_MAP, _u64(root_phys)), fdt.end_node, fdt.finish)
    for step in steps:
        if step():
            raise ValueError(f"page of {page_size} bytes cannot hold the root FDT")
    return fdt


def kho_add_subtree(fdt: Fdt, page_size: int, name: str | bytes, phys: int, size: int) -> int:
    """The kernel's add-subtree sequence: 0, -EEXIST or -ENOMEM."""
    if shortcuts.ENABLED:
        rc = _add_subtree_packed(fdt, page_size, _cstr(name), phys, size)
        if rc is not None:
            return rc
    if fdt.open_into(page_size):
        return -ENOMEM
    off = fdt.add_subnode(0, name)
    if off < 0:
        fdt.pack()
        return -EEXIST if off == -FDT_ERR_EXISTS else -ENOMEM
    if fdt.setprop(off, PROP_DATA, _u64(phys)) or fdt.setprop(off, PROP_SIZE, _u64(size)):
        fdt.del_node(off)
        fdt.pack()
        return -ENOMEM
    fdt.pack()
    return 0


def _add_subtree_packed(fdt: Fdt, page_size: int, name: bytes, phys: int, size: int) -> int | None:
    """``kho_add_subtree`` on a packed page-sized tree (header, one empty
    reservation entry, structure, strings, back to back: every KHO FDT
    once a subtree was added, until a poke), when the new node and its two
    properties fit: the bytes
    the long way leaves, written at once. None: any other tree (the long
    way answers).

    The long way, on such a tree: ``open_into`` changes only totalsize,
    which ``pack`` sets back; the node goes in after the root's properties;
    each ``setprop`` finds no property of that name in the new node, adds
    the name to the strings unless its bytes are there, and inserts its
    property first; every splice moves the rest of the data up, so the
    bytes past the final end are the old ones."""
    buf = fdt.buf
    if len(buf) != page_size or page_size < HEADER_SIZE + RSV_ENTRY:  # the header and the reservation entry read
        return None
    magic, total, st_off, str_off, rsv_off, version, last_comp, _, str_size, st_size = _HEADER.unpack_from(buf)
    if (magic != FDT_MAGIC or version != 17 or last_comp > 17 or rsv_off != HEADER_SIZE
            or st_off != HEADER_SIZE + RSV_ENTRY or str_off != st_off + st_size or total != str_off + str_size
            or total > page_size or any(buf[rsv_off + 8 : rsv_off + RSV_ENTRY])):
        return None
    found = fdt.subnode_offset(0, name)
    if found != -FDT_ERR_NOTFOUND:  # add_subnode failed: pack leaves the page as it was
        return -EEXIST if found >= 0 else -ENOMEM
    tag, nxt = fdt._next_tag(0)
    if tag != FDT_BEGIN_NODE:
        return -ENOMEM  # FDT_ERR_INTERNAL, and the page as it was
    while True:  # the root's properties: the new node goes after them
        at = nxt
        tag, nxt = fdt._next_tag(at)
        if tag not in (FDT_PROP, FDT_NOP):
            break
    strings = bytearray(buf[str_off:total])
    names: list[int] = []
    for prop in (PROP_DATA, PROP_SIZE):  # setprop's order
        want = prop.encode() + b"\0"
        hit = strings.find(want)
        names.append(hit if hit >= 0 else len(strings))
        if hit < 0:
            strings += want
    namelen = _align4(len(name) + 1)
    node = b"".join((_BE32.pack(FDT_BEGIN_NODE), name.ljust(namelen, b"\0"),
                     _PROP_HEAD.pack(FDT_PROP, 8, names[1]), _u64(size),
                     _PROP_HEAD.pack(FDT_PROP, 8, names[0]), _u64(phys), _BE32.pack(FDT_END_NODE)))
    end = total + len(node) + len(strings) - str_size
    if end > page_size:
        return None  # no room: the long way's failure paths
    structure = bytes(buf[st_off : st_off + at]) + node + bytes(buf[st_off + at : str_off])
    kept = fdt._root_children  # as subnode_offset above read them, if it could
    if kept is not None and kept[0] == st_off and kept[1] == buf[st_off:str_off] and all(o >= at for _, o in kept[2]):
        # The new node is one well-formed child, inserted before the others.
        fdt._root_children = (st_off, structure, [(name, at), *((n, o + len(node)) for n, o in kept[2])])
    buf[st_off:end] = structure + strings
    new_st = st_size + len(node)
    for field, v in ((TOTALSIZE, end), (OFF_DT_STRINGS, st_off + new_st), (SIZE_DT_STRINGS, len(strings)),
                     (SIZE_DT_STRUCT, new_st)):
        _BE32.pack_into(buf, field, v)
    return 0


def kho_remove_subtree(fdt: Fdt, page_size: int, phys: int) -> None:
    """The kernel's remove-subtree sequence: delete the first child whose
    8-byte "preserved-data" equals ``phys``."""
    if fdt.open_into(page_size):
        return
    off = fdt.first_subnode(0)
    while off >= 0:
        val, n = fdt.getprop(off, PROP_DATA)
        if val is not None and n == 8 and int.from_bytes(val, "little") == phys & (2**64 - 1):
            fdt.del_node(off)
            break
        off = fdt.next_subnode(off)
    fdt.pack()
