"""A kernel build under test and the model profile it is held to."""

from __future__ import annotations

from dataclasses import dataclass

from reference.profiles import Profile, select_profile

from ..errors import KhoConformError
from ..native.binding import NativeKernel
from ..native.build import Build


@dataclass(frozen=True)
class Target:
    native: NativeKernel
    profile: Profile
    build: Build

    @property
    def label(self) -> str:
        return f"{self.build.source.version} ps{self.build.page_shift} {self.build.flavor}"


def target_for(build: Build) -> Target:
    try:
        profile = select_profile(build.compatible, build.api == "key", build.scratch_overlap)
    except KeyError:
        public = "with" if build.scratch_overlap else "without"
        raise KhoConformError(
            f"kernel {build.source.version} uses compatible '{build.compatible}' with the {build.api} API, "
            f"{public} kho_scratch_overlap(), which no model profile covers; add one in reference/profiles.py"
        ) from None
    return Target(NativeKernel(build), profile, build)
