"""The folder tree is the data flow: kernel source -> native -> compare ->
programs (fuzz beside it) -> report -> check, bench, cli. A stage imports
only earlier stages (and itself); ``fuzz`` never imports report, check or
the tools on top; the reference model imports nothing of the project but
itself and holds no C."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("reference", "conformance", "fuzz")

# (prefix, rank): the longest matching prefix decides a module's stage.
STAGES = (
    ("reference", 0),
    ("conformance.errors", 0),
    ("conformance.corpus", 0),
    ("conformance.processes", 0),
    ("conformance.source", 1),
    ("conformance.native", 2),
    ("conformance.compare", 3),
    ("conformance.programs", 4),
    ("fuzz", 4),
    ("conformance.report", 5),
    ("conformance.check", 6),
    ("conformance.bench", 6),
    ("conformance.mutate", 6),
    ("conformance.export", 6),
    ("conformance.doc", 6),
    ("conformance.cli", 6),
    ("conformance", 6),  # the package itself
)
# Beside each other, and fuzz below report and check: neither sees the other.
APART = {("fuzz", "conformance.programs"), ("conformance.programs", "fuzz")}


def stage_of(module: str) -> tuple[str, int]:
    for prefix, rank in sorted(STAGES, key=lambda s: -len(s[0])):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, rank
    raise KeyError(module)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import of the project in ``path``,
    function-level imports included."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # "from . import x" names submodules
            names = [f"{base}.{a.name}" for a in node.names] if not node.module else [base]
        else:
            continue
        out += [(node.lineno, n) for n in names if n.split(".")[0] in PACKAGES]
    return out


def violations(module: str, imports: list[tuple[int, str]]) -> list[str]:
    here, rank = stage_of(module)
    out = []
    for line, target in imports:
        there, target_rank = stage_of(target)
        if target_rank > rank:
            out.append(f"{module}:{line}: {here} (stage {rank}) imports {target} (stage {target_rank})")
        elif (here, there) in APART:
            out.append(f"{module}:{line}: {here} imports {target}: they sit beside each other")
    return out


SOURCES = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_flow_one_way(path):
    assert violations(module_name(path), project_imports(path)) == []


def test_the_rule_can_fail():
    assert violations("conformance.native.binding", [(1, "conformance.compare.diff")])
    assert violations("fuzz.runner", [(1, "conformance.report.schema")])
    assert violations("fuzz.entry", [(1, "conformance.check")])
    assert violations("fuzz.entry", [(1, "conformance.programs.scenarios")])
    assert not violations("conformance.check", [(1, "fuzz.runner")])


def test_reference_is_pure_python():
    assert not [p for p in (REPO / "reference").rglob("*") if p.suffix in (".c", ".h", ".so")]
    for path in (REPO / "reference").rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not imported & {"cffi", "ctypes", "conformance", "fuzz"}, path


def test_stages_are_folders():
    names = {p.name for p in (REPO / "conformance").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert {"source", "native", "compare", "programs", "report"} <= names


def test_every_package_ships():
    """pyproject.toml lists its packages: a new stage must not be left out of the wheel."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(p.parent) for pkg in PACKAGES for p in (REPO / pkg).rglob("__init__.py")}
    assert found | {"kho_corpus"} == listed
