"""Imports point one way: between packages (finetune → pretrain → data_prep → cluster) and
between modules (no module imports, directly or through others, one that imports it)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["cluster", "data_prep", "pretrain", "finetune"]  # each may import those before it


def import_graph(root: Path, packages: list[str]) -> nx.DiGraph:
    """Module -> module edges for every import (lazy ones inside functions included) from
    one of ``packages``' modules to another."""
    modules = {_module_name(path, root): path for package in packages
               for path in sorted((root / package).rglob("*.py"))}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported(node, name, path.name == "__init__.py"):
                # ``from package import module`` names the module, else the package itself
                found = target if target in modules else target.rpartition(".")[0]
                if found in modules and found != name:
                    graph.add_edge(name, found)
    return graph


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, importer: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the importer's package, up level - 1 more
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    return [f"{base}.{alias.name}" for alias in node.names]


def layer_violations(graph: nx.DiGraph, layers: list[str]) -> list[str]:
    rank = {package: index for index, package in enumerate(layers)}
    return sorted(f"{a} -> {b}" for a, b in graph.edges
                  if rank[b.split(".")[0]] > rank[a.split(".")[0]])


def module_cycles(graph: nx.DiGraph) -> list[list[str]]:
    return [sorted(group) for group in nx.strongly_connected_components(graph)
            if len(group) > 1]


def test_packages_import_only_the_layers_below_them() -> None:
    assert layer_violations(import_graph(REPO, LAYERS), LAYERS) == []


def test_no_module_imports_itself_back() -> None:
    assert module_cycles(import_graph(REPO, LAYERS)) == []


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path: Path) -> None:
    """The checks above can fail: a tree with one of each is caught, lazy and relative
    imports included."""
    (tmp_path / "low").mkdir()
    (tmp_path / "high").mkdir()
    (tmp_path / "low" / "__init__.py").write_text("")
    (tmp_path / "high" / "__init__.py").write_text("")
    (tmp_path / "low" / "a.py").write_text("def f():\n    from high import b\n")
    (tmp_path / "high" / "b.py").write_text("from . import c\n")
    (tmp_path / "high" / "c.py").write_text("import high.b\n")
    graph = import_graph(tmp_path, ["low", "high"])
    assert layer_violations(graph, ["low", "high"]) == ["low.a -> high.b"]
    assert module_cycles(graph) == [["high.b", "high.c"]]
