"""One switch for the speed shortcuts that skip provably redundant work
(a cached leaf lookup in the model's tree, a one-block page range added
without the range walk, a handover restore not run twice on one image, ...).

Each shortcut must give the same verdicts as the long way; tests compare
the two over the seed corpus and a hypothesis sample. ``KHO_CONFORM_SHORTCUTS=0``
in the environment (or ``ENABLED = False`` here, at run time) turns them off.
"""

from __future__ import annotations

import os

ENABLED = os.environ.get("KHO_CONFORM_SHORTCUTS", "1") != "0"
