"""``kho-conform mutate``: the suite measures its own oracle.

Mutants of the functions the harness reaches in the kernel's KHO file are
generated from pycparser's AST (``mutants``), each built and attacked with
the scenario library and a fuzz budget until a check's verdict changes
(``runner``); the report gives killed, survived, did-not-build and
timed-out per function, with each survivor's diff.
"""

from .mutants import KINDS, Mutant, generate
from .runner import Plan, Settings, plan, run_mutation

__all__ = ["KINDS", "Mutant", "Plan", "Settings", "generate", "plan", "run_mutation"]
