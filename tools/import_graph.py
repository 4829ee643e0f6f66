"""The house as a picture: the package-level import graph of ``src/iam`` (and the ``iam_vllm`` plugin beside it),
drawn in layers.

Every module's imports are read off its source (``ast``: absolute and relative imports, at module level, inside
functions and under ``TYPE_CHECKING`` alike) and folded to packages, the first level under ``iam``: ``core``,
``models``, ``eval``, ``bench``, ``tuning``, ``cli`` and the top-level modules ``io``, ``reporting``, ``export``;
``__init__`` is ``iam``'s own ``__init__`` (the public names, and ``__version__``), ``__main__`` the ``python -m iam``
entry, and ``iam_vllm`` the vLLM plugin, a package of its own. ``core.kernels`` is drawn inside ``core``: its modules
import ``core.step``, ``core.mapping`` and ``core.errors``, and ``core.attention`` imports them, so as a node of its
own it would make a circle with ``core`` that no module makes.

A package's layer is the longest import chain below it: layer 0 imports no other package of ``iam``. Arrows go from
the importer to the imported, so every arrow points down. With a circle between packages (or between modules) the
script names it on stderr and exits 1, drawing nothing.

    .venv/bin/python tools/import_graph.py                 # writes docs/imports.png (make imports)
    .venv/bin/python tools/import_graph.py --check         # only the check and the layers
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = (HERE.parent / "src" / "iam", HERE.parent / "src" / "iam_vllm")
PICTURE = HERE.parent / "docs" / "imports.png"


def module_names(root: Path) -> dict[str, Path]:
    """Every module under ``root`` (a package folder) by its dotted name: ``iam.core.model``, ``iam.core.kernels``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(module: str, path: Path, modules: Iterable[str]) -> set[str]:
    """The modules among ``modules`` that ``module`` (its source at ``path``) imports. ``from p import n`` counts as
    ``p.n`` where that is a module, else as ``p``; ``import a.b`` counts as ``a.b``."""
    known = set(modules)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m in known and m != module}


def module_graph(roots: Iterable[Path] = SOURCES) -> dict[str, set[str]]:
    """Each module of the packages at ``roots`` and the modules of them that it imports."""
    modules = {name: path for root in roots for name, path in module_names(root).items()}
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def package_of(module: str) -> str:
    """The first level under ``iam`` (``iam.core.kernels.local`` -> ``core``, ``iam`` -> ``__init__``); another top-level
    package is one node (``iam_vllm.model`` -> ``iam_vllm``)."""
    parts = module.split(".")
    if parts[0] != "iam":
        return parts[0]
    return parts[1] if len(parts) > 1 else "__init__"


def package_graph(modules: Mapping[str, set[str]]) -> tuple[dict[str, set[str]], dict[tuple[str, str], list[str]]]:
    """The packages, each with the packages it imports, and for each edge the module imports that make it
    (``"iam.cli.common -> iam.core.model"``)."""
    graph: dict[str, set[str]] = {package_of(m): set() for m in modules}
    why: dict[tuple[str, str], list[str]] = {}
    for module, targets in modules.items():
        for target in sorted(targets):
            a, b = package_of(module), package_of(target)
            if a != b:
                graph[a].add(b)
                why.setdefault((a, b), []).append(f"{module} -> {target}")
    return graph, why


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as its nodes, the first repeated at the end, or ``None``."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for other in sorted(graph[node]):
            if circle := visit(other, [*path, node]):
                return circle
        done.add(node)
        return None

    for node in sorted(graph):
        if circle := visit(node, []):
            return circle
    return None


def layers(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The nodes by layer, lowest first: a node's layer is one above the highest it imports (the graph is acyclic)."""
    level: dict[str, int] = {}

    def of(node: str) -> int:
        if node not in level:
            level[node] = 1 + max((of(o) for o in graph[node]), default=-1)
        return level[node]

    rows: list[list[str]] = [[] for _ in range(1 + max(map(of, graph), default=-1))]
    for node in sorted(graph):
        rows[level[node]].append(node)
    return rows


def implied(graph: Mapping[str, set[str]]) -> set[tuple[str, str]]:
    """The edges ``a -> b`` that a longer path from ``a`` to ``b`` also gives (all but the transitive reduction)."""

    def below(node: str, seen: set[str]) -> set[str]:
        for other in graph[node]:
            if other not in seen:
                seen.add(other)
                below(other, seen)
        return seen

    return {(a, b) for a in graph for b in graph[a] if any(b in below(c, set()) for c in graph[a] - {b})}


def draw(graph: Mapping[str, set[str]], rows: list[list[str]], out: Path) -> None:
    """The layered diagram: one row per layer, the lowest at the bottom, an arrow from importer to imported; an import
    that a path of other arrows already implies is drawn thin and grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch

    width = max(map(len, rows))
    fig, ax = plt.subplots(figsize=(2.4 * width + 3.5, 1.1 * len(rows) + 1.0))
    where: dict[str, tuple[float, float]] = {}
    for y, row in enumerate(rows):
        # order each row by where its imports sit, so arrows cross less
        below = {n: sum(where[o][0] for o in graph[n]) / len(graph[n]) if graph[n] else 0.0 for n in row}
        for i, node in enumerate(sorted(row, key=lambda n: (below[n], n))):
            where[node] = (1.6 * (i - (len(row) - 1) / 2), float(y))
    boxes = {
        node: ax.text(
            x,
            y,
            node,
            ha="center",
            va="center",
            fontsize=11,
            family="monospace",
            zorder=3,
            bbox={"boxstyle": "round,pad=0.45", "facecolor": "#e8eef7", "edgecolor": "#3b5b8c"},
        )
        for node, (x, y) in where.items()
    }
    left = -1.6 * width / 2 - 0.4
    for y in range(len(rows)):
        ax.text(left, y, f"layer {y}", ha="right", va="center", fontsize=9, color="#666666")
    fig.canvas.draw()  # the boxes' extents, so arrows start and end at their edges
    extra = implied(graph)
    fan: dict[str, int] = {}
    for node in sorted(graph, key=lambda n: (-where[n][1], where[n][0])):
        for target in sorted(graph[node], key=lambda n: (-where[n][1], where[n][0])):
            (x0, y0), (x1, y1) = where[node], where[target]
            style = {"color": "#333333", "lw": 1.3, "connectionstyle": "arc3,rad=0"}
            if (node, target) in extra:  # fanned out, so the grey arrows into one package do not lie on each other
                k = fan[target] = fan.get(target, 0) + 1
                side = 1 if x1 > x0 or (x1 == x0 and k % 2) else -1
                style = {"color": "#a0a0a0", "lw": 0.8, "connectionstyle": f"arc3,rad={side * (0.12 + 0.05 * (k // 2))}"}
            ax.add_patch(
                FancyArrowPatch(
                    (x0, y0),
                    (x1, y1),
                    patchA=boxes[node].get_bbox_patch(),
                    patchB=boxes[target].get_bbox_patch(),
                    arrowstyle="-|>",
                    mutation_scale=11,
                    shrinkA=2,
                    shrinkB=2,
                    zorder=2,
                    **style,
                )
            )
    ax.set_xlim(left - 1.0, 1.6 * width / 2 + 0.6)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.axis("off")
    ax.set_title(
        "Packages of iam: an arrow from the importer to the imported; grey, an import a path of arrows also implies\n"
        "(drawn by tools/import_graph.py; core.kernels is inside core)",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, metadata={"Software": None})  # no version stamp: the same graph, the same bytes
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source", type=Path, nargs="+", default=SOURCES, help="the package folders (default: src/iam src/iam_vllm)"
    )
    parser.add_argument("--out", type=Path, default=PICTURE, help="the picture (default: docs/imports.png)")
    parser.add_argument("--check", action="store_true", help="check for circles and print the layers; draw nothing")
    parser.add_argument("--why", action="store_true", help="print, for each edge, the module imports that make it")
    args = parser.parse_args(argv)

    modules = module_graph(args.source)
    graph, why = package_graph(modules)
    for name, g in (("package", graph), ("module", modules)):
        if circle := find_cycle(g):
            print(f"import circle between {name}s: {' -> '.join(circle)}", file=sys.stderr)
            if name == "package":
                for a, b in zip(circle, circle[1:]):
                    print(f"  {a} -> {b}: {'; '.join(why[(a, b)])}", file=sys.stderr)
            return 1
    rows = layers(graph)
    for y, row in reversed(list(enumerate(rows))):
        print(f"layer {y}: " + ", ".join(f"{n} -> {{{', '.join(sorted(graph[n]))}}}" if graph[n] else n for n in row))
    if args.why:
        for (a, b), made in sorted(why.items()):
            print(f"{a} -> {b}: {'; '.join(made)}")
    if not args.check:
        draw(graph, rows, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
