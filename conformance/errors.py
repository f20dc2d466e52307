"""Errors shown to the user as a single line instead of a traceback."""

from __future__ import annotations


class KhoConformError(Exception):
    """A failure the user can fix; the message is one line and names the fix.

    The CLI prints ``str(error)`` and exits non-zero, so messages must stand on
    their own (what failed, why, and what to do instead).
    """

    def __init__(self, message: str) -> None:
        # Tool output folded into messages may carry newlines; keep it one line.
        super().__init__(" ".join(message.split()))
