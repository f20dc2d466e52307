"""Fuzzing, beside the programs stage: fuzzer bytes -> op programs
(``decode``), the atheris entry point (``entry``), minimization and replay
(``minimize``), findings on disk (``findings``), the continuous libFuzzer
runner (``runner``) and what a run reports (``stats``).

It imports the native and compare stages, never report or check."""
