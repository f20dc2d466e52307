"""What is under test: one kernel build and the model profile it is held to
(``Target``), or a live update across versions (``Pair``): the old kernel of
one build hands its image over to the next kernel of another.

Both answer the same questions for the differential engine: ``run`` (the
kernel's outcome of a program), ``old`` and ``next`` (the build whose old
kernel, and whose next kernel, a program meets), ``page_shift`` and
``label``. A ``Target`` is its own old and next kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from reference.outcome import Outcome
from reference.profiles import Profile, select_profile
from reference.program import Program

from ..errors import KhoConformError
from ..native.binding import NativeKernel
from ..native.build import Build
from ..source.identity import handover_label


@dataclass(frozen=True)
class Target:
    native: NativeKernel
    profile: Profile
    build: Build

    @property
    def label(self) -> str:
        return f"{self.build.source.version} ps{self.build.page_shift} {self.build.flavor}"

    @property
    def page_shift(self) -> int:
        return self.build.page_shift

    @property
    def old(self) -> Target:
        return self

    @property
    def next(self) -> Target:
        return self

    def run(self, program: Program) -> Outcome:
        return self.native.run(program)  # its own next kernel


@dataclass(frozen=True)
class Pair:
    """The old kernel of ``old`` hands over to the next kernel of ``next``:
    ``old``'s library runs the program up to and including kexec, ``next``'s
    boots from the image it left and runs the rest."""

    old: Target
    next: Target

    def __post_init__(self) -> None:
        if self.old.page_shift != self.next.page_shift or self.old.build.flavor != self.next.build.flavor:
            raise KhoConformError(f"a handover needs two builds of one page shift and flavor, not {self.old.label} "
                                  f"and {self.next.label}")

    @property
    def kernels(self) -> str:
        return handover_label(self.old.build.source.version, self.next.build.source.version)

    @property
    def label(self) -> str:
        return f"{self.kernels} ps{self.page_shift} {self.old.build.flavor}"

    @property
    def page_shift(self) -> int:
        return self.old.page_shift

    def run(self, program: Program) -> Outcome:
        return self.old.native.run(program, self.next.native)


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
