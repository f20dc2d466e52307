"""Where the corpus is read from: ``corpus/`` of a source checkout, or the
same files installed with the wheel (the ``kho_corpus`` package data).

Known-finding records and fuzz seeds are read at run time by every stage, so
an installed kho-conform must find them without a checkout. Saved findings
are written wherever the user points ``--crashes``.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from .errors import KhoConformError

_CHECKOUT_CORPUS = Path(__file__).resolve().parent.parent / "corpus"


def corpus_dir() -> Path:
    """The corpus this installation ships: the checkout's, else the wheel's."""
    if (_CHECKOUT_CORPUS / "known").is_dir():
        return _CHECKOUT_CORPUS
    spec = find_spec("kho_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise KhoConformError("the kho-conform corpus is not installed; reinstall kho-conform (pip install .)")
    return Path(next(iter(spec.submodule_search_locations)))


def known_dir() -> Path:
    return corpus_dir() / "known"


def seeds_dir() -> Path:
    return corpus_dir() / "seeds"
