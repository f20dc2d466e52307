"""The cyclic garbage collector held off while a program runs.

A run allocates objects for every op and drops few of them before it ends.
With 10^6 ops, the collector's passes over every live object (the
program's steps among them) took a tenth of the run and found next to
nothing. Reference counting still frees what a run drops at once; the few
cycles the collector would have found wait until the run is over."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic collection inside the block (as it was, after it; nested blocks are fine)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
