"""What legitimately differs between the kernel versions the model covers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    linux: str  # first release series with this behaviour
    compatible: str  # KHO_FDT_COMPATIBLE: written by the old kernel, required by the next
    # The 7.3 radix API: raw-key add/del (RADIX_ADD_KEY/RADIX_DEL_KEY), node
    # callbacks in the walk (walk_nodes), and the next kernel marks the 1 GiB
    # blocks free of preserved memory as scratch ("extend scratch").
    key_api: bool
    # kho_scratch_overlap() is public API (7.3); before, the op is refused.
    scratch_overlap: bool


KHO_V3 = Profile("kho-v3", "7.1", "kho-v3", key_api=False, scratch_overlap=False)
KHO_V4 = Profile("kho-v4", "7.2", "kho-v4", key_api=False, scratch_overlap=False)
KHO_V4_KEYAPI = Profile("kho-v4-keyapi", "7.3", "kho-v4", key_api=True, scratch_overlap=True)

PROFILES: dict[str, Profile] = {p.name: p for p in (KHO_V3, KHO_V4, KHO_V4_KEYAPI)}


def select_profile(compatible: str, key_api: bool, scratch_overlap: bool) -> Profile:
    """The profile of a kernel tree, from its KHO_FDT_COMPATIBLE, whether it
    defines kho_radix_add_key and kho_scratch_overlap. KeyError when the
    model has none."""
    for p in PROFILES.values():
        if (p.compatible, p.key_api, p.scratch_overlap) == (compatible, key_api, scratch_overlap):
            return p
    raise KeyError(f"no profile for compatible {compatible!r} (key API: {key_api}, scratch_overlap: {scratch_overlap})")
