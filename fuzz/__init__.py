"""Fuzzing: fuzzer bytes -> op programs (``decode``), the atheris harness
(``fuzz.harness``), minimization and replay (``minimize``), findings on disk
(``findings``) and the continuous runner (``runner``)."""

from .decode import decode
from .findings import iter_findings, load_finding, save_finding, trace
from .minimize import minimize, minimize_file, replay, signature_predicate
from .runner import FuzzPoint, FuzzStats, run_fuzz

__all__ = [
    "FuzzPoint", "FuzzStats", "decode", "iter_findings", "load_finding", "minimize", "minimize_file", "replay",
    "run_fuzz", "save_finding", "signature_predicate", "trace",
]
