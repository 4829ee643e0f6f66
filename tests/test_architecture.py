"""The package's shape, read off its source: the method package reads no environment and imports no evaluation,
bench or command-line code; there is no import circle; no module of the method is over 450 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import iam

ROOT = Path(iam.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(module: str) -> set[str]:
    """The modules of ``iam`` that ``module`` imports (anywhere in it, ``TYPE_CHECKING`` blocks included)."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            relative = [*package[: len(package) - node.level + 1], *([node.module] if node.module else [])]
            target = ".".join(relative) if node.level else node.module
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in MODULES and m != module}


def test_core_reads_no_environment_and_imports_no_evaluation_code():
    core = {m: p for m, p in MODULES.items() if m.startswith("iam.core")}
    assert "iam.core.model" in core and "iam.core.kernels.flex" in core  # the walk sees the package and its subpackages
    for module, path in core.items():
        tree = ast.parse(path.read_text())
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not names & {"environ", "getenv", "putenv", "cache_root"}, module
        above = {m for m in imports(module) if m.split(".")[1] in ("eval", "bench", "cli")}
        assert not above, f"{module} imports {sorted(above)}"


def test_no_import_circle():
    graph = {m: imports(m) for m in MODULES}
    assert "iam.core.cache" in graph["iam.core.model"]  # relative imports are followed
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path[path.index(module) :], module))
        if module in done:
            return
        for other in graph[module]:
            visit(other, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_no_module_of_the_method_is_over_450_lines():
    long = {m: n for m, p in MODULES.items() if m.startswith("iam.core") and (n := len(p.read_text().splitlines())) > 450}
    assert not long
