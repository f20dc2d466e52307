"""The runtime's and shims' hand-written stand-ins for kernel helpers
(conformance/shims/kc/*.h and kc_strscpy in the runtime), each checked at its
edges against a Python statement of the kernel's definition.

tests/csrc/shim_probe.c is compiled exactly like the kernel unit (-nostdinc,
the staged tree headers, the shims, -DKC_PAGE_SHIFT) and exports one
kc_test_* wrapper per helper; tests/csrc/shim_main.c (built against libc)
answers queries read from stdin. Every helper is called with run-time
arguments, so nothing is constant-folded away.

The tree's own helpers (fls64, __ffs, __fls, ilog2, count_trailing_zeros) are
compiled unchanged; they get sanity checks because the driver relies on them.
"""

from __future__ import annotations

import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PAGE_SHIFTS, SERIES

from conformance.native.build import find_compiler
from conformance.native.extract import RUNTIME_DIR, generated_dir, include_flags, stage
from conformance.source import fetch

CSRC = Path(__file__).parent / "csrc"
M = (1 << 64) - 1
INT_MAX = (1 << 31) - 1
E2BIG = 7
EDGES = sorted({0, 1, 2, 3, 31, 32, 33, 62, 63, 64, 65, 127, 128, 129, 4095, 4096, 4097,
                1 << 31, (1 << 32) - 1, 1 << 32, (1 << 32) + 1, 1 << 62, (1 << 63) - 1,
                1 << 63, (1 << 63) + 1, M - 4096, M - 4095, M - 4094, M - 1, M})


def s64(x: int) -> int:
    x &= M
    return x - (1 << 64) if x >> 63 else x


@dataclass
class Probe:
    exe: Path
    page_shift: int

    def ask(self, queries: list[str]) -> list[str]:
        proc = subprocess.run([str(self.exe)], input="\n".join(queries) + "\n", capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"probe died ({proc.returncode}): {proc.stderr[-500:]}"
        out = proc.stdout.splitlines()
        assert len(out) == len(queries)
        assert "?" not in out
        return out

    def ints(self, queries: list[str]) -> list[int]:
        return [int(x) for x in self.ask(queries)]


_probes: dict[tuple[str, int], Probe] = {}


def _cc(*args: str) -> None:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stderr}"


@pytest.fixture(scope="module", params=[(s, ps) for s in SERIES for ps in PAGE_SHIFTS], ids=lambda p: f"{p[0]}-ps{p[1]}")
def probe(request, tmp_path_factory) -> Probe:
    series, ps = request.param
    if (series, ps) in _probes:
        return _probes[(series, ps)]
    cc = find_compiler("plain")
    work = tmp_path_factory.mktemp(f"probe-{series}-{ps}")
    staged = work / "stage"
    stage(fetch(series).root, staged)
    gen = generated_dir(staged)
    common = ["-std=gnu11", "-O1", "-g", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function", f"-DKC_PAGE_SHIFT={ps}"]
    _cc(cc, *common, *include_flags(staged), "-c", str(CSRC / "shim_probe.c"), "-o", str(work / "probe.o"))
    runtime = RUNTIME_DIR
    runtime_objs = []
    for path in sorted(runtime.glob("*.c")):
        runtime_objs.append(str(work / f"{path.stem}.o"))
        _cc(cc, *common, f"-I{runtime}", f"-I{gen}", "-c", str(path), "-o", runtime_objs[-1])
    _cc(cc, *common, f"-I{runtime}", f"-I{gen}", "-c", str(CSRC / "shim_main.c"), "-o", str(work / "main.o"))
    exe = work / "probe"
    _cc(cc, str(work / "main.o"), str(work / "probe.o"), *runtime_objs, "-ldl", "-o", str(exe))
    p = Probe(exe, ps)
    assert p.ints(["page_shift"]) == [ps]
    _probes[(series, ps)] = p
    return p


# ---- bitmap search ---------------------------------------------------------


def find_next_bit_ref(words: list[int], size: int, offset: int) -> int:
    """lib/find_bit.c: the first set bit in [offset, size), else size."""
    bits = sum(w << (64 * i) for i, w in enumerate(words))
    for i in range(offset, size):
        if bits >> i & 1:
            return i
    return size


def _bitmap_cases() -> list[tuple[list[int], int, int]]:
    cases = []
    for size in (0, 1, 2, 63, 64, 65, 127, 128, 129, 191, 192):
        nw = -(-size // 64)
        patterns = [[0] * nw, [M] * nw, [1 << 63] * nw, [1] * nw]
        if nw:
            patterns.append([0] * (nw - 1) + [M])  # bits past size in the last word: ignored
            patterns.append([0] * (nw - 1) + [1 << ((size - 1) % 64)])  # only the last valid bit
        for words in patterns:
            for off in sorted({0, 1, 62, 63, 64, 65, 127, 128, size - 1, size, size + 1, M} - {-1}):
                cases.append((words, size, off))
    rng = random.Random(12)
    for _ in range(400):
        size = rng.randrange(0, 64 * 6)
        nw = -(-size // 64)
        words = [rng.choice([0, M, rng.getrandbits(64), 1 << rng.randrange(64)]) for _ in range(nw)]
        cases.append((words, size, rng.randrange(0, size + 3)))
    return cases


def test_find_next_bit(probe):
    cases = _bitmap_cases()
    # The words end exactly at a PROT_NONE page: reading past
    # BITS_TO_LONGS(size) words would kill the probe.
    got = probe.ints([f"find_next_bit {size} {off} " + " ".join(map(str, w)) for w, size, off in cases])
    want = [find_next_bit_ref(w, size, off) for w, size, off in cases]
    bad = [(c, g, e) for c, g, e in zip(cases, got, want) if g != e]
    assert not bad, bad[:5]
    got = probe.ints([f"find_first_bit {size} " + " ".join(map(str, w)) for w, size, _ in cases])
    assert got == [find_next_bit_ref(w, size, 0) for w, size, _ in cases]


def test_for_each_set_bit(probe):
    cases = _bitmap_cases()
    got = probe.ask([f"for_each_set_bit {size} " + " ".join(map(str, w)) for w, size, _ in cases])
    for (w, size, _), line in zip(cases, got):
        count, *bits = map(int, line.split())
        bitmap = sum(x << (64 * i) for i, x in enumerate(w))
        want = [i for i in range(size) if bitmap >> i & 1]
        assert count == len(want) and bits == want, (w, size)


# ---- bit scans -------------------------------------------------------------


def test_fls_long_and_tree_bit_scans(probe):
    xs = EDGES + [1 << i for i in range(64)] + [(1 << i) - 1 for i in range(1, 65)]
    assert probe.ints([f"fls_long {x}" for x in xs]) == [x.bit_length() for x in xs]
    assert probe.ints([f"fls64 {x}" for x in xs]) == [x.bit_length() for x in xs]
    x32 = [x for x in xs if x < 1 << 32]
    assert probe.ints([f"fls {x}" for x in x32]) == [x.bit_length() for x in x32]
    nz = [x for x in xs if x]
    assert probe.ints([f"__ffs {x}" for x in nz]) == [(x & -x).bit_length() - 1 for x in nz]
    assert probe.ints([f"__fls {x}" for x in nz]) == [x.bit_length() - 1 for x in nz]


def test_count_trailing_zeros(probe):
    assert probe.ints(["count_trailing_zeros 0"]) == [64]  # BITS_PER_LONG for 0
    xs = [x for x in EDGES if x] + [1 << i for i in range(64)]
    assert probe.ints([f"count_trailing_zeros {x}" for x in xs]) == [(x & -x).bit_length() - 1 for x in xs]


def test_ilog2(probe):
    pows = [1 << i for i in range(64)]
    assert probe.ints([f"ilog2 {x}" for x in pows]) == list(range(64))
    xs = [x for x in EDGES if x]
    assert probe.ints([f"ilog2 {x}" for x in xs]) == [x.bit_length() - 1 for x in xs]
    # the 32-bit path (sizeof(n) <= 4) agrees
    assert probe.ints([f"ilog2_u32 {1 << i}" for i in range(32)]) == list(range(32))


# ---- arithmetic ------------------------------------------------------------

POW2 = [1, 2, 8, 4096, 1 << 16, 1 << 30, 1 << 63]


def round_up_ref(x: int, y: int, width: int = 64) -> int:
    """include/linux/math.h round_up(x, y), y a power of two: the smallest
    multiple of y >= x, in the type of x (so 0 -> 0 and past the top -> 0)."""
    return (-(-x // y) * y) % (1 << width)


def test_round_up(probe):
    cases = [(x, y) for x in EDGES for y in POW2]
    assert probe.ints([f"round_up {x} {y}" for x, y in cases]) == [round_up_ref(x, y) for x, y in cases]
    assert probe.ints(["round_up 0 4096", "round_up 1 4096", f"round_up {M} 4096"]) == [0, 4096, 0]


def test_round_up_keeps_the_type_of_x(probe):
    cases = [(x, y) for x in (0, 1, 0x8000_0001, (1 << 32) - 1) for y in (16, 4096, 1 << 32)]
    got = probe.ints([f"round_up_u32 {x} {y}" for x, y in cases])
    m32 = (1 << 32) - 1
    # math.h: ((((x)-1) | ((__typeof__(x))((y)-1)))+1), all in unsigned int
    assert got == [((((x - 1) & m32) | ((y - 1) & m32)) + 1) & m32 for x, y in cases]


def test_div_round_up(probe):
    ds = [1, 2, 3, 7, 64, 4096, 1 << 32, M]
    cases = [(n, d) for n in EDGES for d in ds]
    got = probe.ints([f"div_round_up {n} {d}" for n, d in cases])
    # the kernel's definition, ((n) + (d) - 1) / (d), wraps when n + d - 1 overflows
    assert got == [((n + d - 1) & M) // d for n, d in cases]
    # and is the ceiling wherever it does not
    assert all(g == -(-n // d) for (n, d), g in zip(cases, got) if n + d - 1 <= M)


def test_min_max(probe):
    pairs = [(a, b) for a in (0, 1, 1 << 32, 1 << 63, M) for b in (0, 1, (1 << 32) - 1, M - 1, M)]
    assert probe.ints([f"min {a} {b}" for a, b in pairs]) == [min(a, b) for a, b in pairs]
    assert probe.ints([f"max {a} {b}" for a, b in pairs]) == [max(a, b) for a, b in pairs]
    sp = [(a, b) for a in (-(1 << 63), -1, 0, 1, (1 << 63) - 1) for b in (-(1 << 63), -2, 0, 2, (1 << 63) - 1)]
    assert probe.ints([f"min_signed {a & M} {b & M}" for a, b in sp]) == [min(a, b) for a, b in sp]
    assert probe.ints([f"max_signed {a & M} {b & M}" for a, b in sp]) == [max(a, b) for a, b in sp]
    # min_t/max_t compare after converting both to the type
    t = [(a, b) for a in (0, 1, (1 << 32) + 1, M) for b in (2, 1 << 32, (1 << 32) - 1)]
    m32 = (1 << 32) - 1
    assert probe.ints([f"min_t_u32 {a} {b}" for a, b in t]) == [min(a & m32, b & m32) for a, b in t]
    assert probe.ints([f"max_t_u32 {a} {b}" for a, b in t]) == [max(a & m32, b & m32) for a, b in t]


def get_order_ref(size: int, page_shift: int) -> int:
    """asm-generic/getorder.h: the order of the smallest block of pages that
    holds size bytes, ceil(log2(ceil(size / PAGE_SIZE))); 1..PAGE_SIZE -> 0.
    For 0 the kernel computes fls64((0 - 1) >> PAGE_SHIFT) = 64 - PAGE_SHIFT."""
    if size == 0:
        return 64 - page_shift
    return ((size - 1) >> page_shift).bit_length()


def test_get_order(probe):
    ps = probe.page_shift
    P = 1 << ps
    sizes = sorted(set(EDGES) | {P - 1, P, P + 1, 2 * P - 1, 2 * P, 2 * P + 1, 4 * P, 73, 1 << 40, (1 << 40) + 1})
    want = [get_order_ref(s, ps) for s in sizes]
    assert probe.ints([f"get_order {s}" for s in sizes]) == want
    assert probe.ints([f"kc_get_order {s}" for s in sizes]) == want
    assert probe.ints([f"get_order {s}" for s in (1, P - 1, P, P + 1, 2 * P, 2 * P + 1, 0, M)]) == [0, 0, 0, 1, 1, 2, 64 - ps, 64 - ps]


# ---- memory access ---------------------------------------------------------


def test_get_unaligned_u64(probe):
    rng = random.Random(7)
    buffers = [bytes(range(1, 25)), b"\xff" * 24, b"\0" * 24, bytes(rng.getrandbits(8) for _ in range(24))]
    cases = [(buf, off) for buf in buffers for off in range(0, 17)]
    got = probe.ints([f"get_unaligned {buf.hex()} {off}" for buf, off in cases])
    assert got == [int.from_bytes(buf[off : off + 8], "little") for buf, off in cases]


# ---- bit masks -------------------------------------------------------------


def test_bit_masks(probe):
    nrs = EDGES
    assert probe.ints([f"bit_mask {n}" for n in nrs]) == [1 << (n % 64) for n in nrs]
    assert probe.ints([f"bit_word {n}" for n in nrs]) == [n // 64 for n in nrs]
    assert probe.ints([f"bit {n}" for n in range(64)]) == [1 << n for n in range(64)]
    # BITS_TO_LONGS is DIV_ROUND_UP(nr, BITS_PER_LONG): wraps to 0 within 63 of the top
    assert probe.ints([f"bits_to_longs {n}" for n in nrs]) == [((n + 63) & M) // 64 for n in nrs]
    assert probe.ints(["bits_to_longs 0", "bits_to_longs 1", "bits_to_longs 64", "bits_to_longs 65"]) == [0, 1, 1, 2]
    hl = [(h, l) for h in (0, 1, 31, 32, 62, 63) for l in (0, 1, 31, 32, 62, 63) if l <= h]
    ref = [((1 << (h + 1)) - 1) ^ ((1 << l) - 1) for h, l in hl]
    assert probe.ints([f"genmask {h} {l}" for h, l in hl]) == ref
    assert probe.ints([f"genmask_ull {h} {l}" for h, l in hl]) == ref
    assert probe.ints(["genmask 63 0", "genmask 0 0", "genmask 63 63"]) == [M, 1, 1 << 63]


def test_set_clear_test_bit(probe):
    for nr in (0, 1, 63, 64, 65, 127, 128, 191):
        words = [0x5555_5555_5555_5555, 0, M]
        for set_ in (1, 0):
            out = list(map(int, probe.ask([f"set_clear_test_bit {nr} {set_} " + " ".join(map(str, words)) ])[0].split()))
            bits = sum(w << (64 * i) for i, w in enumerate(words))
            bits = bits | (1 << nr) if set_ else bits & ~(1 << nr)
            assert out == [set_] + [(bits >> (64 * i)) & M for i in range(3)]


# ---- error pointers --------------------------------------------------------


def test_err_ptr(probe):
    errs = [-1, -2, -12, -22, -95, -4095, -4096, 0, 1]
    assert probe.ints([f"err_ptr {e & M}" for e in errs]) == [e & M for e in errs]
    ptrs = EDGES
    is_err = [p >= (1 << 64) - 4095 for p in ptrs]
    assert probe.ints([f"is_err {p}" for p in ptrs]) == [int(x) for x in is_err]
    assert probe.ints([f"is_err_value {p}" for p in ptrs]) == [int(x) for x in is_err]
    assert probe.ints([f"is_err_or_null {p}" for p in ptrs]) == [int(p == 0 or x) for p, x in zip(ptrs, is_err)]
    assert probe.ints([f"ptr_err {p}" for p in ptrs]) == [s64(p) for p in ptrs]
    # the boundary: -MAX_ERRNO is an error, one below is a pointer
    assert probe.ints([f"is_err {(-4095) & M}", f"is_err {(-4096) & M}", "is_err 0"]) == [1, 0, 0]


# ---- kc_strscpy ------------------------------------------------------------

FILL = 0xAA
DEST = 80


def strscpy_ref(src: bytes, n: int) -> tuple[int, bytes]:
    """lib/string.c sized_strscpy(dest, src, count): -E2BIG without touching
    dest if count is 0 or > INT_MAX; else copy up to count - 1 bytes and NUL
    terminate, returning the length, or -E2BIG if src was truncated."""
    dest = bytearray([FILL] * DEST)
    if n == 0 or n > INT_MAX:
        return -E2BIG, bytes(dest)
    s = src.split(b"\0", 1)[0]
    if len(s) < n:
        dest[: len(s) + 1] = s + b"\0"
        return len(s), bytes(dest)
    dest[: n - 1] = s[: n - 1]
    dest[n - 1] = 0
    return -E2BIG, bytes(dest)


def _strscpy(probe, cases):
    out = []
    for line in probe.ask([f"strscpy {src.hex() or '-'} {n} {FILL}" for src, n in cases]):
        rc, dest = line.split()
        out.append((int(rc), bytes.fromhex(dest)))
    return out


def test_strscpy(probe):
    cases = []
    for s in (b"", b"a", b"abc", b"x" * 64, b"kho-conform", b"y" * 79):
        for n in sorted({1, 2, 3, 4, len(s), len(s) + 1, len(s) + 2, 65, DEST} - {0}):
            if n <= DEST:
                cases.append((s + b"\0", n))
    # a source without a NUL inside the first n bytes, ending at an
    # unreadable page: only n bytes may be read
    cases += [(b"z" * 10, n) for n in (1, 5, 10)]
    assert _strscpy(probe, cases) == [strscpy_ref(s, n) for s, n in cases]
    # count 0: -E2BIG, dest untouched
    assert _strscpy(probe, [(b"abc\0", 0)]) == [(-E2BIG, bytes([FILL] * DEST))]


def test_strscpy_count_above_int_max(probe):
    cases = [(b"abc\0", INT_MAX + 1), (b"abc\0", M)]
    assert _strscpy(probe, cases) == [strscpy_ref(s, n) for s, n in cases]


# ---- kvmalloc ----------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 511, 512, 513, 1 << 20])
def test_kvmalloc_arrays_end_at_a_guard_page(probe, n):
    """A kernel that writes past a kvmalloc'd array (a restore that trusts a
    corrupt descriptor) faults at once, contained, instead of corrupting the
    host's heap; every index inside the array is writable."""
    assert probe.ints([f"kvmalloc_store {n} 0", f"kvmalloc_store {n} {n - 1}"]) == [8 * n, 8 * n]
    proc = subprocess.run([str(probe.exe)], input=f"kvmalloc_store {n} {n}\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == -11 and proc.stdout == "", (proc.returncode, proc.stdout)
