"""The vmalloc preservation format, from the ABI header's "Kexec Handover ABI
for vmalloc Preservation": a descriptor (``struct kho_vmalloc``: the first
chunk's phys, the area's page count, flags and page order) and a linked list
of chunk pages (``struct kho_vmalloc_chunk``: the next chunk's phys, then a
zero-terminated array of the phys of each block of 2^order pages).

And where the caller keeps its records on the handover page (program.py):
one u64 per alloc slot, one descriptor per vmalloc slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from .arena import Words, set_word
from .program import ALLOC_SLOTS_OFFSET, AREA_ALLOC, AREA_HUGE, VMALLOC_DESCRIPTOR_BYTES, VMALLOC_SLOTS_OFFSET

# The descriptor's flags: how the area was made. Not in the ABI header (they
# are the C file's), but they cross kexec in every descriptor.
KHO_VMALLOC_ALLOC = 0x1
KHO_VMALLOC_HUGE_VMAP = 0x2

CHUNK_NEXT_WORD = 0  # struct kho_vmalloc_hdr: the next chunk's phys, 0 for none


def chunk_capacity(page_size: int) -> int:
    """KHO_VMALLOC_SIZE: block addresses a chunk page holds after its header."""
    return (page_size - 8) // 8


def kho_flags(vm_flags: int) -> int:
    """The descriptor's flags for an area's vm_flags (program.AREA_*)."""
    return (KHO_VMALLOC_ALLOC if vm_flags & AREA_ALLOC else 0) | (KHO_VMALLOC_HUGE_VMAP if vm_flags & AREA_HUGE else 0)


def alloc_slot_word(slot: int) -> int:
    return ALLOC_SLOTS_OFFSET // 8 + slot


def vmalloc_slot_word(slot: int) -> int:
    """The descriptor's first word on the handover page; it takes two."""
    return (VMALLOC_SLOTS_OFFSET + slot * VMALLOC_DESCRIPTOR_BYTES) // 8


@dataclass(frozen=True)
class Descriptor:
    """struct kho_vmalloc { u64 first; u32 total_pages; u16 flags; u16 order; }"""

    first: int = 0
    total_pages: int = 0
    flags: int = 0
    order: int = 0

    @classmethod
    def read(cls, words: Words, slot: int) -> Descriptor:
        w = vmalloc_slot_word(slot)
        meta = words.get(w + 1, 0)
        return cls(words.get(w, 0), meta & 0xFFFF_FFFF, (meta >> 32) & 0xFFFF, meta >> 48)

    def write(self, words: Words, slot: int) -> None:
        w = vmalloc_slot_word(slot)
        meta = (self.total_pages & 0xFFFF_FFFF) | (self.flags & 0xFFFF) << 32 | (self.order & 0xFFFF) << 48
        set_word(words, w, self.first)
        set_word(words, w + 1, meta)
