"""What a fuzzing run reports: its totals and its timeline (which the
conformance report plots)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class FuzzPoint:
    """One sample of a run's timeline."""

    seconds: float
    execs: int
    exec_per_s: float
    coverage: int
    corpus: int
    findings: int


@dataclass
class FuzzStats:
    execs: int = 0
    exec_per_s: float = 0.0  # the latest libFuzzer figure
    coverage: int = 0  # edges of the kernel code: the most any one worker has seen
    features: int = 0  # likewise
    corpus: int = 0
    started_from: int = 0  # inputs in the corpus at the start: resumed ones, else the seeds
    findings: int = 0  # finding directories in the crashes dir
    seconds: float = 0.0
    new_findings: list[Path] = field(default_factory=list)
    timeline: list[FuzzPoint] = field(default_factory=list)
    crash_inputs: list[Path] = field(default_factory=list)  # inputs that killed a worker
    lost_crash_inputs: int = 0  # workers killed in a hung crash report before they wrote or printed their input
    interrupted: bool = False

    @property
    def mean_exec_per_s(self) -> float:
        return self.execs / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "new_findings": [str(p) for p in self.new_findings],
                "crash_inputs": [str(p) for p in self.crash_inputs]}
