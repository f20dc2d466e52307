"""The sanitizer runtimes of the asan and fuzz flavors: which library a
process must be started with, re-executing under it, and resolving code
addresses in reports to kernel source lines."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

from ..errors import KhoConformError
from .build import SANITIZED_FLAVORS

# UBSan recovers (reports and goes on); ASan reports through its callback and
# the runtime ends the op; SEGV/ILL stay with the runtime's own handlers.
SANITIZER_ENV = {
    "ASAN_OPTIONS": "halt_on_error=0:allow_user_segv_handler=1:handle_segv=0:handle_sigill=0:detect_leaks=0",
}


def sanitizer_preload(flavor: str) -> str | None:
    """The runtime a sanitizer flavor needs preloaded into the Python process."""
    if flavor not in SANITIZED_FLAVORS:
        return None
    if flavor == "fuzz":
        import atheris

        return str(Path(atheris.path()) / "asan_with_fuzzer.so")
    for cc in ("clang-16", "clang"):
        try:
            out = subprocess.run([cc, "-print-file-name=libclang_rt.asan-x86_64.so"], capture_output=True, text=True).stdout.strip()
        except FileNotFoundError:
            continue
        if out and Path(out).exists():
            return out
    raise KhoConformError("the asan flavor needs clang's ASan runtime: apt-get install clang-16 libclang-rt-16-dev")


def ensure_process_for(flavor: str) -> None:
    """Re-exec this process with the sanitizer runtime preloaded, if needed:
    an ASan-built library can only load into a process started with it."""
    lib = sanitizer_preload(flavor)
    if lib is None or lib in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ, LD_PRELOAD=lib, **SANITIZER_ENV)
    # orig_argv: the command line as given, so that ``python -m ...`` re-runs as a module
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


@functools.lru_cache(maxsize=4096)
def symbolize(location: str) -> str:
    """'lib.so+0x1234' -> 'function file:line', for event records."""
    m = re.search(r"(\S+\.so)\+(0x[0-9a-f]+)", location)
    if not m:
        return location
    try:
        out = subprocess.run(["addr2line", "-f", "-i", "-e", m.group(1), m.group(2)], capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired):
        return location
    if len(out) >= 2 and out[0] != "??":
        return location.replace(m.group(0), f"{out[0]} {out[1].rsplit('/', 1)[-1]}")
    return location
