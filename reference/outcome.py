"""What one program run produces, in the same form for the model and for the
kernel's C code, so that the two can be compared field by field.

Op result conventions (``OpResult.rc``):
- int-returning kernel calls: their return code (0 or -errno);
- void calls (unpreserve, del, remove_subtree, pokes): 0;
- every old-kernel op when KHO failed to initialise: -EOPNOTSUPP, not run;
- ``kexec``: 0 when the next kernel accepted the handover, -EINVAL when not;
- restore ops: 0 with ``value`` = pfn of the returned page, -1 for NULL;
  ``value2`` = pages handed to the managed-page count;
- ``retrieve_subtree``: its return code, ``value`` = phys, ``value2`` = size.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from itertools import chain

# Loop steps of kernel code past which the kernel may not finish within the
# harness's CPU budget (native.contract.CPU_BUDGET_MS per op): the outcome is the model's,
# or a timeout. Far below what the budget allows, so that an op that must
# finish always does.
SLOW_WORK = 1 << 20
# The same for adding subtrees one after another (fill_fdt): each add walks
# every node already in the FDT, so the work is the node visits. 2^15 is
# about 0.13 s in the fuzz flavor, the slowest build (a 64 KiB FDT filled to
# its 777 subtrees: 3 * 10^5 visits, about 1.2 s).
SLOW_FDT_VISITS = 1 << 15

# Linux errno values (asm-generic/errno-base.h, errno.h) the KHO code returns.
ENOENT = 2
E2BIG = 7
ENOMEM = 12
EEXIST = 17
EINVAL = 22
ERANGE = 34
EOPNOTSUPP = 95
EADDRNOTAVAIL = 99
ERRNO = {"ENOENT": ENOENT, "E2BIG": E2BIG, "ENOMEM": ENOMEM, "EEXIST": EEXIST, "EINVAL": EINVAL,
         "ERANGE": ERANGE, "EOPNOTSUPP": EOPNOTSUPP, "EADDRNOTAVAIL": EADDRNOTAVAIL}


@dataclass(frozen=True, slots=True)  # slots: an outcome may hold 10^6 results
class OpResult:
    rc: int = 0
    value: int = 0
    value2: int = 0
    # Where each warning fired. Only the count is compared: sites are
    # kernel-version specific, the count is the contract.
    warnings: tuple[str, ...] = ()
    # restore_vmalloc: the pages mapped, as (first pfn, count) runs in order.
    pages: tuple[tuple[int, int], ...] = ()
    # The model's alone (not compared): the op does so much work (struct
    # pages initialised, loop steps) that the kernel may exceed its CPU
    # budget instead of answering.
    may_time_out: bool = False


@dataclass(frozen=True, slots=True)  # slots: a tree of 10^6 pages has 3*10^4 nodes
class TreeNode:
    """One node page of the radix tree, named by its index path from the root."""

    path: tuple[int, ...]  # table index at each level from the root; () = root
    level: int  # KHO_TREE_MAX_DEPTH - 1 at the root, 0 for a leaf bitmap
    phys: int
    entries: tuple[int, ...]  # table: non-zero slots; leaf: set bits (ascending)

    def canonical(self) -> tuple:
        return (self.path, self.level, self.entries)


@dataclass(frozen=True)
class Image:
    """What crosses kexec: the FDT and the physical pages holding the tree and
    the scratch descriptors. Any implementation's next kernel can start from
    any implementation's image."""

    page_shift: int
    fdt_phys: int
    fdt: bytes  # fdt_totalsize() bytes
    scratch_phys: int
    scratch: bytes  # the struct kho_scratch array
    pages: Mapping[int, bytes] = field(default_factory=dict)  # phys -> page bytes (tree nodes)
    # The rest of the old kernel's memory, for a next kernel that follows
    # corrupted pointers: every other arena page with content, and how many
    # arena pages the old kernel used (the next kernel must not reuse them).
    other_pages: Mapping[int, bytes] = field(default_factory=dict)
    arena_hwm: int = 0


class Pairs:
    """(u64, u64) pairs, held packed: 16 bytes each instead of a tuple and
    two ints (a next kernel's boot lists several per preserved block, and a
    handover may hold 10^6 blocks). Reads as a tuple of pairs; equal to
    another ``Pairs`` or a tuple with the same pairs in the same order."""

    __slots__ = ("_words",)

    def __init__(self, pairs: Iterable[tuple[int, int]] = ()) -> None:
        self._words = pairs._words if isinstance(pairs, Pairs) else array("Q", chain.from_iterable(pairs))

    @classmethod
    def of_words(cls, words: array) -> Pairs:
        """From the flat words a, b, a, b, ... (an array("Q"), taken as is)."""
        out = cls.__new__(cls)
        out._words = words
        return out

    def __len__(self) -> int:
        return len(self._words) // 2

    def __iter__(self) -> Iterator[tuple[int, int]]:
        words = iter(self._words)
        return zip(words, words)

    def __getitem__(self, i: int) -> tuple[int, int]:
        i = range(len(self))[i]  # negative indices, and IndexError
        return self._words[2 * i], self._words[2 * i + 1]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Pairs):
            return self._words == other._words
        if isinstance(other, tuple):
            return tuple(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))  # as the equal tuple's

    def __repr__(self) -> str:
        return repr(tuple(self))

    def __reduce__(self) -> tuple:
        return Pairs.of_words, (self._words,)

    def __deepcopy__(self, memo: dict) -> tuple[tuple[int, int], ...]:
        # dataclasses.asdict (Outcome.to_json, digests) deep-copies fields:
        # give it the tuple the field reads as.
        return tuple(self)


PAIRS_FIELDS = ("walk", "reserved", "noinit", "scratch_marks", "magic")  # the NextBoot fields that are Pairs


@dataclass(frozen=True)
class NextBoot:
    """What the next kernel's boot made of the handover: whether it took
    it, and the map of preserved memory it rebuilt (the restored map)."""

    accepted: bool
    reason: str = ""  # why the handover was refused (model) or the kernel's log (C)
    # Pair lists (one or more pairs per preserved block) are Pairs, whatever iterable of pairs is given.
    walk: Pairs = Pairs()  # (phys, order) in walk order
    walk_nodes: tuple[int, ...] = ()  # node pages visited (key-API kernels)
    reserved: Pairs = Pairs()  # memblock_reserve(phys, size), in call order
    noinit: Pairs = Pairs()  # memblock_reserved_mark_noinit
    scratch_marks: Pairs = Pairs()  # memblock_mark_kho_scratch
    magic: Pairs = Pairs()  # (pfn, order) of RAM head pages with the KHO magic
    phantom: tuple[int, ...] = ()  # non-RAM pfns whose struct page the walk touched
    # The model's alone (not compared): under a quirk, the next kernel's boot
    # does so much work that the kernel may exceed its CPU budget instead.
    may_time_out: bool = False

    def __post_init__(self) -> None:
        for name in PAIRS_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, Pairs):
                object.__setattr__(self, name, Pairs(value))


@dataclass(frozen=True)
class SanitizerReport:
    """A sanitizer report from the kernel's code (the model has none: its
    behaviour is defined). Its site is what identifies it across versions:
    the check kind, the function and the text of the source line (hashed),
    never the line number alone."""

    op: int | None  # the op it happened in (None: boot or the end state)
    kind: str  # "misaligned-access", "shift-out-of-bounds", "asan:heap-buffer-overflow", ...
    function: str
    file: str
    line: int
    detail: str = ""  # the type involved, or an ASan report's stack
    line_hash: str = ""  # identity of the source line's text
    ended_op: bool = False  # ASan: the op's result is not compared

    @property
    def site(self) -> tuple[str, str, str]:
        return (self.kind, self.function, self.line_hash)

    def where(self) -> str:
        return f"{self.kind} in {self.function} {self.file.rsplit('/', 1)[-1]}:{self.line}"


@dataclass(frozen=True)
class Outcome:
    boot: OpResult
    ops: tuple[OpResult, ...]
    # Old-kernel state at kexec (or at the end of a program without kexec).
    root_phys: int = 0
    tree: tuple[TreeNode, ...] = ()
    node_pages: Mapping[int, bytes] = field(default_factory=dict)
    fdt: bytes = b""
    image: Image | None = None
    next: NextBoot | None = None
    # What ended the run early (a fault, an access outside the arena, a
    # timeout, a BUG): each is a finding, and the ops after it never ran.
    events: tuple[str, ...] = ()
    event_ops: tuple[int | None, ...] = ()  # the op each event happened in (None: boot)
    # Sanitizer reports: findings that end nothing (UBSan recovers; an ASan
    # report voids only its op).
    reports: tuple[SanitizerReport, ...] = ()
    log: tuple[str, ...] = ()  # printk, for traces only

    def to_json(self) -> dict:
        def enc(x):
            if isinstance(x, bytes):
                return x.hex()
            if isinstance(x, dict):
                return {hex(k) if isinstance(k, int) else k: enc(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [enc(v) for v in x]
            return x

        return enc(asdict(self))
