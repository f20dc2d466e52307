"""Running the external tools the source providers use (apt, tar, git),
with one-line errors and optional progress display."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..errors import KhoConformError

if TYPE_CHECKING:
    from rich.progress import Progress


@contextmanager
def step(progress: Progress | None, description: str) -> Iterator[None]:
    if progress is None:
        yield
        return
    task = progress.add_task(description, total=None)
    try:
        yield
    finally:
        progress.update(task, total=1, completed=1)


def run(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run a tool to completion (killed at the timeout), output captured as text."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except FileNotFoundError as e:
        raise KhoConformError(f"{cmd[0]} not found; install it or use --kernel-tree PATH") from e
    except subprocess.TimeoutExpired as e:
        raise KhoConformError(f"{cmd[0]} timed out after {timeout:.0f} s; retry or use --kernel-tree PATH") from e


def first_line(text: str, prefixes: tuple[str, ...] = ()) -> str:
    """The first non-empty line starting with one of ``prefixes`` (else the first line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(prefixes):
            return line
    return lines[0] if lines else "no output"
