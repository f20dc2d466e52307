"""The cache every source provider writes into, outside the repository.

Kernel files never go into the repository: everything lives in
:func:`cache_dir` (``~/.cache/kho-conform`` or ``$KHO_CONFORM_CACHE``)::

    <cache>/lock                 flock held by every writer of the cache
    <cache>/apt/                 private apt state (parts/, lists/, cache/, updated)
    <cache>/series/<X.Y>.json    which entry a series request resolved to, and when
    <cache>/trees/<entry>/       one extracted source: meta.json + tree/
    <cache>/tmp/                 downloads and extractions in progress
    <cache>/builds/<key>/        built libraries (native stage)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import KhoConformError
from .identity import KernelSource, line_ranges
from .tree_files import NEEDED_PATHS, makefile_version, needed_files

_CHECKOUT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    env = os.environ.get("KHO_CONFORM_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "kho-conform"
    path = path.resolve()
    # Kernel code must never land in a checkout of this project.
    if (_CHECKOUT / "pyproject.toml").is_file() and (path == _CHECKOUT or _CHECKOUT in path.parents):
        raise KhoConformError(
            f"cache directory {path} is inside the repository {_CHECKOUT}; "
            "set KHO_CONFORM_CACHE to a directory outside it"
        )
    return path


@contextmanager
def locked() -> Iterator[Path]:
    """Hold the cache lock; yields the cache dir with an emptied tmp/."""
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Only lock holders use tmp/, so whatever is there was left by a
            # killed run.
            shutil.rmtree(root / "tmp", ignore_errors=True)
            (root / "tmp").mkdir()
            yield root
    except OSError as e:
        raise KhoConformError(
            f"file operation failed in cache {root}: {e}; check space and permissions or set KHO_CONFORM_CACHE"
        ) from e


def hash_files(root: Path) -> dict[str, str]:
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in needed_files(root)}


def load_entry(entry: Path) -> KernelSource | None:
    """The cached source in ``entry``, or None if absent or extracted for other NEEDED_PATHS."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("needed_paths") != list(NEEDED_PATHS):
        return None
    if meta.get("patches") and "changed_lines" not in meta:
        return None  # patched before changed lines were recorded: made again
    tree = entry / "tree"
    return KernelSource(meta["version"], meta["provider"], tree, hash_files(tree), meta["makefile_version"],
                        tuple(tuple(p) for p in meta.get("patches", ())), line_ranges(meta.get("changed_lines", {})))


def install_entry(root: Path, name: str, staged_tree: Path, version: str, provider: str,
                  patches: list[tuple[str, str]] = (), changed_lines: dict | None = None) -> KernelSource:
    """Move a fully prepared tree from tmp/ into trees/<name> (caller holds the lock)."""
    staging = staged_tree.parent
    meta = {
        "version": version,
        "provider": provider,
        "makefile_version": makefile_version(staged_tree),
        "needed_paths": list(NEEDED_PATHS),
        "patches": [list(p) for p in patches],
        "changed_lines": {path: [list(r) for r in ranges] for path, ranges in (changed_lines or {}).items()},
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    final = root / "trees" / name
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(final, ignore_errors=True)  # stale: extracted for older NEEDED_PATHS
    staging.rename(final)
    source = load_entry(final)
    assert source is not None
    return source


def cached_entry(name: str, make: Callable[[Path, Path], KernelSource]) -> KernelSource:
    """The cache entry ``name``, or make(cache root, scratch dir) under the
    cache lock (checked again there: another process may have made it)."""
    if (hit := load_entry(cache_dir() / "trees" / name)) is not None:
        return hit
    with locked() as root:
        if (hit := load_entry(root / "trees" / name)) is not None:
            return hit
        work = Path(tempfile.mkdtemp(dir=root / "tmp"))
        try:
            return make(root, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def list_cached() -> list[KernelSource]:
    trees = cache_dir() / "trees"
    if not trees.is_dir():
        return []
    return [s for entry in sorted(trees.iterdir()) if (s := load_entry(entry)) is not None]
