"""The reference model compiled with mypyc: the same source (``reference/``,
pure Python, type-checked), built into the cache and loaded in its place,
about twice as fast.

``use_compiled_model()`` runs when the ``conformance`` package is imported,
before any module of the model is: it builds the model once per source
(``<cache>/model/<digest>/``, the build aside and then renamed into place,
under the cache lock) and puts the build first on the package's path.
``KHO_CONFORM_MODEL=python`` keeps the pure-Python model (the tests run
both ways); so does a build that cannot be made (no mypy, no compiler),
after a one-line note.

Not compiled: ``shortcuts`` (a switch flipped at run time), and the value
types programs and outcomes are made of (``program``, ``outcome``), which
cross processes pickled: a frozen dataclass compiled by mypyc cannot be
unpickled. The model's work is in the other modules.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import reference

from ..errors import KhoConformError
from ..processes import exit_code, supervised, temp_dir
from ..source.cache import cache_dir, locked

MODEL_ENV = "KHO_CONFORM_MODEL"  # "python": the pure-Python model
SOURCE = Path(reference.__file__).resolve().parent
NOT_COMPILED = ("__init__.py", "shortcuts.py", "program.py", "outcome.py")
COMPILER = "clang-16"


def _sources() -> list[Path]:
    return sorted(p for p in SOURCE.glob("*.py") if p.name not in NOT_COMPILED)


def _digest() -> str:
    h = hashlib.sha256(f"{sys.version}|{sys.platform}|mypy {importlib.metadata.version('mypy')}".encode())
    for path in (Path(__file__), *sorted(SOURCE.glob("*.py"))):  # this file: how the model is built
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def build_compiled_model() -> Path:
    """The build of the current model source, made if missing."""
    try:
        where = cache_dir() / "model" / _digest()
    except importlib.metadata.PackageNotFoundError:
        raise KhoConformError("mypy is not installed; install it (pip install mypy) or set KHO_CONFORM_MODEL=python") from None
    failed = where.with_name(where.name + ".failed")  # a build that failed is not tried on every run
    if (where / "reference").is_dir():
        return where
    if failed.is_file():
        raise KhoConformError(f"{failed.read_text().strip()} (delete {failed} to try again)")
    with locked() as root, temp_dir(root / "tmp", prefix="model-") as work:
        if (where / "reference").is_dir():  # built while we waited for the lock
            return where
        print("kho-conform: compiling the reference model with mypyc (once per model source, about 20 s)",
              file=sys.stderr, flush=True)
        shutil.copytree(SOURCE, work / "reference", ignore=shutil.ignore_patterns("__pycache__"))
        cmd = [sys.executable, "-m", "mypyc", *(f"reference/{p.name}" for p in _sources())]
        env = {**os.environ, "CC": shutil.which(COMPILER) or os.environ.get("CC", "cc")}
        with supervised(cmd, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            output, _ = proc.communicate()
        if proc.returncode:
            last = (output.strip().splitlines() or ["?"])[-1]
            message = f"compiling the reference model with mypyc failed: {last[:300]}"
            failed.parent.mkdir(parents=True, exist_ok=True)
            failed.write_text(message + "\n")
            raise KhoConformError(message)
        built = work / "out"
        (built / "reference").mkdir(parents=True)
        for lib in work.glob("*.so"):  # the group library, found on sys.path
            lib.rename(built / lib.name)
        for lib in (work / "reference").glob("*.so"):  # one per module, found on the package's path
            lib.rename(built / "reference" / lib.name)
        where.parent.mkdir(parents=True, exist_ok=True)
        built.rename(where)
    return where


def use_compiled_model() -> str:
    """Load the compiled model for every later import of ``reference``'s
    modules; what runs: "compiled" or "python"."""
    if os.environ.get(MODEL_ENV) == "python":
        return "python"
    if any(name.startswith("reference.") for name in sys.modules):
        return "python"  # modules already loaded: one model per process, never a mix
    try:
        where = build_compiled_model()
    except KhoConformError as e:
        print(f"kho-conform: the reference model runs as pure Python: {e}", file=sys.stderr)
        return "python"
    except KeyboardInterrupt as e:  # at import, before any command's own handling
        print("kho-conform: interrupted while compiling the reference model; nothing was kept", file=sys.stderr)
        raise SystemExit(exit_code(e)) from None
    sys.path.append(str(where))
    reference.__path__.insert(0, str(where / "reference"))
    return "compiled"


def model_kind() -> str:
    """Which model this process runs: "compiled" or "python"."""
    import reference.model

    return "python" if reference.model.__file__.endswith(".py") else "compiled"
