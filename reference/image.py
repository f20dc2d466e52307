"""The handover image: page stores and readers shared by both kernels' sides."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping

from .arena import Words, words_from_bytes, words_to_bytes
from .outcome import Image
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

    def words(self, phys: int) -> Words | None:
        return self._pages.get(phys)

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
