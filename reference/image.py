"""The handover image: page stores and readers shared by both kernels' sides."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping

from .arena import Words, words_from_bytes, words_to_bytes
from .outcome import Image
from .program import Header
from .tree import PageOf


class PageStore(Mapping[int, bytes]):
    """Tree node pages by phys, held as sparse words; the page bytes are built
    on access, so an image of a million keys does not hold gigabytes."""

    def __init__(self, pages: dict[int, Words], page_size: int) -> None:
        self._pages = pages
        self.page_size = page_size

    def __getitem__(self, phys: int) -> bytes:
        return words_to_bytes(self._pages[phys], self.page_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self._pages)

    def __len__(self) -> int:
        return len(self._pages)

    def __contains__(self, phys: object) -> bool:
        return phys in self._pages

    def __eq__(self, other: object) -> bool:
        # Equal words are equal bytes (zero words are absent): no page is built.
        if isinstance(other, PageStore) and other.page_size == self.page_size:
            return self._pages == other._pages
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]  # mutable, like a dict

    def __repr__(self) -> str:  # the content, for digests and messages (not the object's address)
        return f"PageStore({self._pages!r})"

    def words(self, phys: int) -> Words | None:
        return self._pages.get(phys)

    def __reduce__(self) -> tuple:  # pickled as its constructor call, compiled (mypyc) or not
        return PageStore, (self._pages, self.page_size)

    def __deepcopy__(self, memo: dict) -> dict[int, bytes]:
        # dataclasses.asdict (Outcome.to_json) deep-copies fields: give it a
        # plain dict, which is what the schema declares.
        return dict(self)


def page_reader(image: Image) -> PageOf:
    """Word view of the image's pages, for any implementation's image."""
    pages = image.pages
    page_size = 1 << image.page_shift
    if isinstance(pages, PageStore) and pages.page_size == page_size:
        return pages.words
    cache: dict[int, Words] = {}

    def words(phys: int) -> Words | None:
        if phys not in cache:
            if phys not in pages:
                return None
            cache[phys] = words_from_bytes(pages[phys], page_size)
        return cache[phys]

    return words


def scratch_entries(data: bytes) -> list[tuple[int, int]]:
    """struct kho_scratch {u64 addr; u64 size;} entries; a trailing partial entry is ignored."""
    return [struct.unpack_from("<QQ", data, off) for off in range(0, len(data) - 15, 16)]


class MemoryPages(Mapping[int, bytes]):
    """The old kernel's memory as the image holds it, page by page: every
    page it has, with the scratch descriptors and then the FDT (as the image
    says they are) over whatever else the page held. A page is built when
    asked for, so an image of 10^6 keys is read one page at a time."""

    def __init__(self, image: Image) -> None:
        self._image = image
        self._phys = {*image.other_pages, *image.pages, image.scratch_phys, image.fdt_phys}

    def __getitem__(self, phys: int) -> bytes:
        if phys not in self._phys:
            raise KeyError(phys)
        image = self._image
        data = image.pages[phys] if phys in image.pages else image.other_pages.get(phys, b"")
        for at, head in ((image.scratch_phys, image.scratch), (image.fdt_phys, image.fdt)):
            if phys == at:
                data = bytes(head) + bytes(data)[len(head):]
        return data

    def __iter__(self) -> Iterator[int]:
        return iter(self._phys)

    def __len__(self) -> int:
        return len(self._phys)


class PageFault(Exception):
    """The next kernel read memory the old kernel never had: a fault."""


def memory_reader(image: Image, header: Header) -> Callable[[int], Words]:
    """Words of the page-sized span at any phys, as the next kernel's direct
    map shows the old kernel's memory (quirk next-kernel-trusts-tree): the
    image's pages where it has them, zeros elsewhere in the arena, and a
    PageFault outside it. A span may straddle two pages."""
    return _MemoryReader(image, header)


class _MemoryReader:
    """``memory_reader``'s reader. An object, not closures: compiled, the
    closures of one function share an environment that holds them, a
    reference cycle."""

    def __init__(self, image: Image, header: Header) -> None:
        self.page_size = 1 << image.page_shift
        lo, hi = header.arena_range()
        self.lo, self.hi = lo << image.page_shift, hi << image.page_shift
        self.pages = MemoryPages(image)
        self.cache: dict[int, Words] = {}

    def _page(self, phys: int) -> bytes:
        return bytes(self.pages.get(phys, b"")[: self.page_size]).ljust(self.page_size, b"\0")

    def __call__(self, phys: int) -> Words:
        page_size = self.page_size
        if not self.lo <= phys <= self.hi - page_size:
            raise PageFault(f"the next kernel reads {phys:#x}, outside the old kernel's memory")
        if phys not in self.cache:
            base, off = phys & -page_size, phys & (page_size - 1)
            data = self._page(base)[off:] + self._page(base + page_size)[:off] if off else self._page(base)
            self.cache[phys] = words_from_bytes(data, page_size)
        return self.cache[phys]
