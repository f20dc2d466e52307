"""reference/fdt.py against the real libfdt (pylibfdt), byte for byte.

The C side drives libfdt's raw calls on a bytearray in exactly the kernel's
order, so both sides see the same buffer. Corrupted buffers are handed to C
with a zeroed tail (``PAD``) so that libfdt's reads past the page stay in
memory we own; where the model reports ``out_of_bounds`` the C result depends
on memory outside the page and is not compared.
"""

from __future__ import annotations

import itertools
import shutil
import struct
import subprocess

import libfdt
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from reference import fdt as F
from reference.fdt import Fdt, kho_add_subtree, kho_remove_subtree, kho_root_fdt


def kernel_check_header(buf: bytes | bytearray) -> int:
    """fdt_check_header as the kernel's libfdt answers it: pylibfdt's (an
    older libfdt), plus the block alignment checks newer libfdt makes right
    after the total-size check (memory reservation block 8-, structure block
    4-byte aligned, as the devicetree specification requires)."""
    rc = libfdt.fdt_check_header(buf)
    if rc in (-libfdt.BADMAGIC, -libfdt.BADVERSION) or len(buf) < 40:
        return rc
    h = struct.unpack_from(">10I", buf)
    if F._header_size(h[5]) <= h[1] <= F.INT_MAX and (h[4] % 8 or h[2] % 4):
        return -F.FDT_ERR_ALIGNMENT
    return rc

PAGES = (4096, 16384, 65536)
COMPATS = ("kho-v3", "kho-v4")
PAD = 1 << 16
U64 = st.integers(0, 2**64 - 1)
DTC = shutil.which("dtc")


# -- the kernel's call sequences on libfdt ---------------------------------------
def c_root(page: int, compat: str, phys: int) -> bytearray:
    buf = bytearray(page)
    assert libfdt.fdt_create(buf, page) == 0
    assert libfdt.fdt_finish_reservemap(buf) == 0
    assert libfdt.fdt_begin_node(buf, "") == 0
    assert libfdt.fdt_property_string(buf, "compatible", compat) == 0
    assert libfdt.fdt_property_stub(buf, "preserved-memory-map", struct.pack("<Q", phys), 8) == 0
    assert libfdt.fdt_end_node(buf) == 0
    assert libfdt.fdt_finish(buf) == 0
    return buf


def c_add(buf: bytearray, page: int, name: str, phys: int, size: int) -> tuple[int, str]:
    """(return code, which call failed)."""
    if libfdt.fdt_open_into(buf, buf, page):
        return -F.ENOMEM, "open_into"
    off = libfdt.fdt_add_subnode(buf, 0, name)
    if off < 0:
        libfdt.fdt_pack(buf)
        return (-F.EEXIST if off == -F.FDT_ERR_EXISTS else -F.ENOMEM), f"add_subnode{off}"
    for prop, v in (("preserved-data", phys), ("blob-size", size)):
        if libfdt.fdt_setprop(buf, off, prop, struct.pack("<Q", v), 8):
            libfdt.fdt_del_node(buf, off)
            libfdt.fdt_pack(buf)
            return -F.ENOMEM, prop
    libfdt.fdt_pack(buf)
    return 0, ""


def c_remove(buf: bytearray, page: int, phys: int) -> None:
    if libfdt.fdt_open_into(buf, buf, page):
        return
    off = libfdt.fdt_first_subnode(buf, 0)
    while off >= 0:
        val, n = libfdt.fdt_getprop(buf, off, "preserved-data")
        if val is not None and n == 8 and struct.unpack("<Q", bytes(val))[0] == phys:
            libfdt.fdt_del_node(buf, off)
            break
        off = libfdt.fdt_next_subnode(buf, off)
    libfdt.fdt_pack(buf)


# -- readers, as the next kernel and remove_subtree use them ---------------------
def _norm(v):
    return tuple(bytes(x) if isinstance(x, (bytes, bytearray)) else x for x in v)


def c_readers(buf: bytearray, names: list[str]) -> list:
    out = [kernel_check_header(buf), libfdt.fdt_totalsize(buf)]
    out += [libfdt.fdt_node_check_compatible(buf, 0, c) for c in COMPATS]
    out += [_norm(libfdt.fdt_getprop(buf, 0, p)) for p in ("preserved-memory-map", "compatible")]
    for name in names:
        off = libfdt.fdt_subnode_offset(buf, 0, name)
        out += [off] + [_norm(libfdt.fdt_getprop(buf, off, p)) for p in ("preserved-data", "blob-size")]
    subs, off = [], libfdt.fdt_first_subnode(buf, 0)
    while off >= 0:
        subs.append(off)
        off = libfdt.fdt_next_subnode(buf, off)
    return out + [subs]


def m_readers(fdt: Fdt, names: list[str]) -> list:
    out = [fdt.check_header(), fdt.totalsize()]
    out += [fdt.node_check_compatible(0, c) for c in COMPATS]
    out += [fdt.getprop(0, p) for p in ("preserved-memory-map", "compatible")]
    for name in names:
        off = fdt.subnode_offset(0, name)
        out += [off] + [fdt.getprop(off, p) for p in ("preserved-data", "blob-size")]
    return out + [fdt.subnodes(0)]


def parses(buf: bytes) -> None:
    """pylibfdt accepts it, and dtc decodes it (-f: dtc's node-name style
    checks reject names the kernel accepts, e.g. two '@')."""
    fdt = libfdt.Fdt(buf)
    off = fdt.first_subnode(0, libfdt.QUIET_NOTFOUND)
    while off >= 0:
        fdt.get_name(off)
        off = fdt.next_subnode(off, libfdt.QUIET_NOTFOUND)
    if DTC:
        r = subprocess.run([DTC, "-f", "-q", "-I", "dtb", "-O", "dts", "-o", "/dev/null", "-"],
                           input=buf, capture_output=True, check=False)
        assert r.returncode == 0, r.stderr


# -- strategies ----------------------------------------------------------------
NAMES = st.one_of(
    st.sampled_from(["foo", "foo@1", "foo@2", "bar", "", "@", "@1", "x@y", "n" * 63]),
    st.text(alphabet="ab@1", max_size=6),
    st.builds(lambda n, k: ("n" * n + str(k))[:63], st.integers(0, 63), st.integers(0, 999)),
)
PHYS = st.integers(0, 7) | U64
OPS = st.lists(
    st.one_of(st.tuples(st.just("add"), NAMES, PHYS, U64), st.tuples(st.just("remove"), PHYS)),
    max_size=80,
)


def build(page: int, names: list[str]) -> tuple[Fdt, bytearray]:
    m, c = kho_root_fdt(page, "kho-v3", 0x1234), c_root(page, "kho-v3", 0x1234)
    for i, name in enumerate(names):
        assert kho_add_subtree(m, page, name, i, 2 * i) == c_add(c, page, name, i, 2 * i)[0]
    assert m.buf == c
    return m, c


# -- tests -----------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("compat", COMPATS)
def test_root_fdt(page: int, compat: str) -> None:
    m = kho_root_fdt(page, compat, 0xFEDC_BA98_7654_3210)
    assert m.buf == c_root(page, compat, 0xFEDC_BA98_7654_3210)  # whole page, not just totalsize
    assert m.check_header() == 0 and m.node_check_compatible(0, compat) == 0
    assert m.getprop(0, "preserved-memory-map") == (struct.pack("<Q", 0xFEDC_BA98_7654_3210), 8)
    parses(bytes(m.buf[: m.totalsize()]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(page=st.sampled_from((4096, 4096, 16384, 65536)), fill=st.integers(0, 90), step=st.integers(1, 60),
       ops=OPS)
def test_add_remove_sequences(page: int, fill: int, step: int, ops: list[tuple]) -> None:
    """Random adds and removes, after ``fill`` adds of distinct names of
    assorted widths: enough to run a 4 KiB page out of room."""
    m, c = kho_root_fdt(page, "kho-v4", 7), c_root(page, "kho-v4", 7)
    fill_ops = [("add", f"{i}".rjust(i * step % 61, "f"), i % 8, i) for i in range(fill)]
    for op in fill_ops + ops:
        if op[0] == "add":
            rc, where = c_add(c, page, *op[1:])
            assert kho_add_subtree(m, page, *op[1:]) == rc, op
            event(f"add {rc} {where.rstrip('-0123456789')}")
        else:
            c_remove(c, page, op[1])
            kho_remove_subtree(m, page, op[1])
        assert m.buf == c, op
        assert not m.out_of_bounds
    parses(bytes(m.buf[: m.totalsize()]))


def test_fill_page_until_nospace() -> None:
    """Every failure path of add_subtree on a full 4 KiB page: no room for
    the node, for the first property, for the second."""
    seen = set()
    for width in range(0, 64, 3):
        m, c = build(4096, [])
        for i in range(200):
            name = f"{i}".rjust(width, "s")
            rc, where = c_add(c, 4096, name, i, i)
            assert kho_add_subtree(m, 4096, name, i, i) == rc and m.buf == c
            seen.add(where)
            if i % 7 == 3:  # holes, refilled by later adds
                c_remove(c, 4096, i - 2)
                kho_remove_subtree(m, 4096, i - 2)
                assert m.buf == c
    assert {"", "add_subnode-3", "preserved-data", "blob-size"} <= seen


def test_generic_setprop_and_names() -> None:
    """Beyond the kernel's sequence: resizing an existing property, name
    reuse by suffix match, new properties going first, '@' matching."""
    m, c = build(4096, ["foo@1", "bar"])
    for name, val in (("data", b"12345"), ("preserved-data", b"x" * 13), ("a", b""), ("data", b"")):
        assert m.setprop(0, name, val) == libfdt.fdt_setprop(c, 0, name, val, len(val))
        assert m.buf == c
    for name in ("foo", "foo@1", "foo@", "fo", "bar@1", "bar", "", "@"):
        assert m.subnode_offset(0, name) == libfdt.fdt_subnode_offset(c, 0, name)
    assert m.getprop(0, "data") == _norm(libfdt.fdt_getprop(c, 0, "data"))


@settings(max_examples=150, deadline=None)
@given(names=st.lists(NAMES, max_size=5, unique=True), pokes=st.lists(
    st.tuples(st.integers(0, 39) | st.integers(0, 511) | st.integers(0, 4095), st.integers(0, 255)),
    min_size=1, max_size=4), cut=st.none() | st.integers(0, 600), cut_totalsize=st.booleans())
def test_readers_on_corrupt_buffers(names, pokes, cut, cut_totalsize) -> None:
    """Byte changes and truncation: every reader returns what libfdt does."""
    m, c = build(4096, names)
    for off, v in pokes:
        c[off] = v
    if cut is not None:  # truncation: the tail lost, or totalsize shrunk
        if cut_totalsize:
            struct.pack_into(">I", c, 4, cut)
        else:
            c[cut:] = bytes(len(c) - cut)
    model = Fdt(bytearray(c))
    got = m_readers(model, names + ["foo", "x"])
    if model.out_of_bounds or libfdt.fdt_totalsize(c) > len(c) + PAD - 16:
        event("not compared: reads past the page")
        return
    assert got == c_readers(c + bytes(PAD), names + ["foo", "x"])


@settings(max_examples=150, deadline=None)
@given(fields=st.lists(st.tuples(st.integers(0, 9), st.sampled_from(
    [0, 1, 2, 3, 15, 16, 17, 18, 27, 28, 32, 35, 36, 39, 40, 41, 48, 56, 0x7FFFFFFF, 0x80000000, 2**32 - 1])
    | st.integers(0, 400)), min_size=1, max_size=4))
def test_check_header_fields(fields) -> None:
    """Header fields set to boundary values: the same verdict as libfdt."""
    m, c = build(4096, ["foo"])
    for i, v in fields:
        struct.pack_into(">I", c, 4 * i, v)
    assert Fdt(c).check_header() == kernel_check_header(c)


@settings(max_examples=150, deadline=None)
@given(names=st.lists(NAMES, max_size=4, unique=True), pokes=st.lists(
    st.tuples(st.integers(0, 39) | st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=2),
    ops=st.lists(st.one_of(st.tuples(st.just("add"), NAMES, PHYS, U64),
                           st.tuples(st.just("remove"), st.integers(0, 4))), min_size=1, max_size=4))
def test_writers_after_poke(names, pokes, ops) -> None:
    """The kernel's POKE_FDT: bytes of the page changed, then more adds and
    removes. C runs only where the model says libfdt stays inside the page
    (elsewhere libfdt may crash); there both agree byte for byte."""
    m, c = build(4096, names)
    for off, v in pokes:
        m.buf[off] = c[off] = v
    c += bytes(PAD)
    for op in ops:
        if op[0] == "add":
            rc = kho_add_subtree(m, 4096, *op[1:])
            if m.out_of_bounds:
                break
            assert c_add(c, 4096, *op[1:])[0] == rc
        else:
            kho_remove_subtree(m, 4096, op[1])
            if m.out_of_bounds:
                break
            c_remove(c, 4096, op[1])
        assert m.buf == c[:4096] and not any(c[4096:]), op
    event("stopped: out of bounds" if m.out_of_bounds else "compared")


@pytest.mark.parametrize("version", range(21))
def test_header_versions(version: int) -> None:
    """Older layouts (v1-v16 header sizes, pre-v16 realigned values and
    full-path names, the v16 structure-size walk in open_into) for readers
    and for a following add/remove."""
    for comp, size_dt_struct in itertools.product((0, 2, 16, 17, 18), (None, 0, 5000)):
        m, c = build(4096, ["foo@1", "bar", "n" * 20])
        for model_or_c in (m.buf, c):
            struct.pack_into(">II", model_or_c, 20, version, comp)
            if size_dt_struct is not None:
                struct.pack_into(">I", model_or_c, 36, size_dt_struct)
        got = m_readers(Fdt(bytearray(c)), ["foo", "bar", "x"])
        assert got == c_readers(c + bytes(PAD), ["foo", "bar", "x"])
        c += bytes(PAD)
        rc = kho_add_subtree(m, 4096, "new", 9, 9)
        assert not m.out_of_bounds and c_add(c, 4096, "new", 9, 9)[0] == rc and m.buf == c[:4096]
        kho_remove_subtree(m, 4096, 0)
        c_remove(c, 4096, 0)
        assert not m.out_of_bounds and m.buf == c[:4096]


def test_short_buffers_never_raise() -> None:
    """A buffer shorter than its totalsize (C would read past it: not
    compared) never makes a reader raise, and is reported as such."""
    m, _ = build(4096, ["foo", "bar@2", ""])
    full = bytes(m.buf[: m.totalsize()])
    for n in range(len(full) + 1):
        fdt = Fdt(full[:n])
        m_readers(fdt, ["foo", "bar", ""])
        assert fdt.out_of_bounds or n >= F.HEADER_SIZE
    assert not fdt.out_of_bounds


@settings(max_examples=300, deadline=None)
@given(names=st.lists(NAMES, max_size=6, unique=True), nested=st.lists(
    st.tuples(st.integers(0, 5), NAMES, st.binary(max_size=20)), max_size=4), pokes=st.lists(
    st.tuples(st.integers(0, 39) | st.integers(40, 700), st.integers(0, 255)), max_size=3),
    version=st.sampled_from((None, 1, 15, 16, 17, 18)), queries=st.lists(NAMES, max_size=4),
    parent=st.sampled_from((-4, 2, 601)) | st.integers(0, 150).map(lambda i: 4 * i))
def test_subnode_scan_is_the_walk(names, nested, pokes, version, queries, parent) -> None:
    """subnode_offset's one-loop scan answers only what the node-by-node
    walk answers, on trees nested deeper than the kernel's, with pre-v16
    versions and corrupted bytes; and it does answer on the kernel's trees."""
    m, _ = build(4096, names)
    for i, name, value in nested:  # grandchildren, with properties of any length
        children = m.subnodes(0)
        if children:
            child = m.add_subnode(children[i % len(children)], name)
            if child >= 0:
                assert m.setprop(child, "v", value) == 0
    clean = not pokes and version is None
    tags, off = [], 0  # every tag of the tree as built: a parent of each kind
    while off >= 0:
        tags.append(off)
        off = m._next_tag(off)[1]
    for off, v in pokes:
        m.buf[off] = v
    if version is not None:
        struct.pack_into(">I", m.buf, 20, version)
    queries = names + queries + ["foo", "x"]
    for at in {parent, *tags}:
        for want in queries:
            want = want.encode()
            err = m._scan_start()
            try:
                if err < 0:
                    continue
                fast = m._subnode_scan(at, want)
                slow = m._subnode_walk(at, want)
            finally:
                m._scan_end()
            if clean and at in (0, *m.subnodes(0), *m.subnodes(m.subnodes(0)[0] if names else 0)):
                assert fast is not None  # a well-formed tree never takes the long way
            if fast is not None:
                assert fast == slow and not m.out_of_bounds, (at, want)
            event("scan answered" if fast is not None else "walked")


@settings(max_examples=300, deadline=None)
@given(names=st.lists(NAMES, max_size=5, unique=True), props=st.lists(
    st.tuples(st.integers(0, 5), st.sampled_from(["v", "preserved-data", "blob-size", "compatible", "data"]),
              st.binary(max_size=20)), max_size=5), pokes=st.lists(
    st.tuples(st.integers(0, 39) | st.integers(40, 700), st.integers(0, 255)), max_size=3),
    version=st.sampled_from((None, 1, 15, 16, 17, 18)), nop=st.integers(0, 8),
    node=st.sampled_from((-4, 2, 601)) | st.integers(0, 150).map(lambda i: 4 * i))
def test_prop_scan_is_the_walk(names, props, pokes, version, nop, node) -> None:
    """_find_prop's one-loop scan answers only what the tag-by-tag walk
    answers, on nodes with several properties, NOPs and children, with
    other versions and corrupted bytes; and it answers on the kernel's trees."""
    m, _ = build(4096, names)
    assert m.open_into(4096) == 0
    for i, name, value in props:
        nodes = [0, *m.subnodes(0)]
        assert m.setprop(nodes[i % len(nodes)], name, value) == 0
    if m.subnodes(0):
        assert m.add_subnode(m.subnodes(0)[0], "child") >= 0
    tags, off = [], 0  # every tag of the tree as built
    while off >= 0:
        tags.append(off)
        off = m._next_tag(off)[1]
    base = m._u32(F.OFF_DT_STRUCT)
    found = [(a, b) for a, b in zip(tags, tags[1:]) if m._u32(base + a) == F.FDT_PROP]
    if found:  # fdt_nop_property: a property's words become NOPs
        a, b = found[nop % len(found)]
        m.buf[base + a : base + b] = struct.pack(">I", F.FDT_NOP) * ((b - a) // 4)
    clean = not pokes and version is None
    for off, v in pokes:
        m.buf[off] = v
    if version is not None:
        struct.pack_into(">I", m.buf, 20, version)
    for at in {node, *tags}:
        for want in ("v", "preserved-data", "blob-size", "compatible", "preserved-memory-map", "x", "", "data"):
            fast = m._prop_scan(at, want.encode())
            slow = m._prop_walk(at, want.encode())
            if clean and at in (0, *m.subnodes(0)):
                assert fast is not None  # a well-formed tree never takes the long way
            if fast is not None:
                assert fast == slow and not m.out_of_bounds, (at, want)
            event("scan answered" if fast is not None else "walked")
