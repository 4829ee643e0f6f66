"""The package-level import graph (tools/import_graph.py, which draws docs/imports.png): the packages of ``iam``
import one another without a circle, in the layers docs/architecture.md names, and the script names a circle."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "import_graph.py"
_spec = importlib.util.spec_from_file_location("import_graph", TOOL)
graph_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(graph_tool)


def test_no_package_circle_and_the_documented_layers():
    modules = graph_tool.module_graph()
    assert "iam.core.kernels.local" in modules and "iam_vllm.model" in modules  # subpackages and the plugin are read
    assert "iam.core.cache" in modules["iam.core.model"]  # relative imports are followed
    packages, _ = graph_tool.package_graph(modules)
    assert graph_tool.find_cycle(packages) is None
    layer = {p: y for y, row in enumerate(graph_tool.layers(packages)) for p in row}
    assert layer["io"] < layer["models"] < layer["core"] < layer["eval"] < min(layer["bench"], layer["tuning"], layer["export"])
    assert max(layer["bench"], layer["tuning"], layer["export"]) < layer["cli"]
    assert not packages["core"] - {"io", "models"}  # the method imports no evaluation, bench or command-line code


def test_a_circle_is_named_and_fails(tmp_path: Path, capsys):
    root = tmp_path / "iam"
    for folder in ("a", "b"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "a" / "x.py").write_text("from ..b import y\n")
    (root / "b" / "y.py").write_text("def f():\n    from iam.a import x\n")  # a late import counts too
    assert graph_tool.main(["--check", "--source", str(root)]) == 1
    err = capsys.readouterr().err
    assert "import circle between packages: a -> b -> a" in err
    assert "iam.a.x -> iam.b.y" in err and "iam.b.y -> iam.a.x" in err
