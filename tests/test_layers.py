"""The package's layers, as calibrated_sampling/__init__.py declares them, hold: every module has a
layer, no import points to a higher layer, and no modules import each other in a circle.

Imports are read with ``ast`` from the source (nothing is imported), including those inside functions
and under ``TYPE_CHECKING``: an import deferred into a function still ties the two modules together.
"""

import ast
import re
from pathlib import Path

PACKAGE = "calibrated_sampling"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
LAYER_LINE = re.compile(r"^ {4}(\w+) {2,}(\w+(?:, \w+)*)\s*$")


def declared_layers() -> dict[str, int]:
    """module -> layer index (0 = lowest), from the map in the package docstring."""
    doc = ast.get_docstring(ast.parse((ROOT / "__init__.py").read_text()))
    rows = [match.groups() for match in map(LAYER_LINE.match, doc.splitlines()) if match]
    assert rows, "the package docstring has no layer map (lines '    LAYER   module, module, ...')"
    layers = {}
    for index, (_, modules) in enumerate(rows):
        for module in modules.split(", "):
            assert module not in layers, f"{module} is in two layers of the map"
            layers[module] = index
    return layers


def package_modules() -> list[str]:
    return sorted(path.stem for path in ROOT.glob("*.py") if path.stem != "__init__")


def imports_of(module: str, modules: set[str], source: str | None = None) -> dict[str, int]:
    """{imported module of the package: line of the first such import} for one module's source."""
    found: dict[str, int] = {}
    source = (ROOT / f"{module}.py").read_text() if source is None else source

    def add(name: str | None, line: int) -> None:
        if name in modules and name != module:
            found.setdefault(name, line)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE and len(parts) > 1:
                    add(parts[1], node.lineno)
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".") if node.module else []
            if node.level == 0 and parts[:1] == [PACKAGE]:
                parts = parts[1:]
            elif node.level != 1:
                continue  # another package
            if parts:
                add(parts[0], node.lineno)
            else:  # `from . import x`: x is a module, or a name of the package's __init__ (its façade)
                for alias in node.names:
                    add(alias.name, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    modules = set(package_modules())
    return {module: imports_of(module, modules) for module in sorted(modules)}


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    layers = declared_layers()
    missing = [m for m in package_modules() if m not in layers]
    assert not missing, (f"{PACKAGE}/{missing[0]}.py is in no layer: add it to the layer map in "
                         f"{PACKAGE}/__init__.py (all undeclared: {missing})")


def test_no_import_points_to_a_higher_layer():
    layers = declared_layers()
    names = [match.group(1) for match in map(LAYER_LINE.match, ast.get_docstring(
        ast.parse((ROOT / "__init__.py").read_text())).splitlines()) if match]
    upward = [f"{module}.py:{line} imports {target} ({names[layers[target]]}) from the {names[layers[module]]} layer"
              for module, targets in import_graph().items() if module in layers
              for target, line in targets.items() if target in layers and layers[target] > layers[module]]
    assert not upward, "imports that point to a higher layer:\n" + "\n".join(upward)


def test_no_import_cycle_between_modules():
    graph = import_graph()
    found = cycles(graph)
    lines = [", ".join(f"{a} -> {b} (line {graph[a][b]})" for a in component for b in graph[a] if b in component)
             for component in found]
    assert not found, "modules that import each other in a circle:\n" + "\n".join(lines)


def test_the_checks_see_deferred_imports_and_circles():
    # Deferred imports are how circles hide, so the reader must find them (and ignore other packages).
    source = ("from __future__ import annotations\nimport torch\nfrom . import __version__\n\n"
              "def f():\n    from .b import g\n    from calibrated_sampling import c\n"
              "    import calibrated_sampling.d\n    from .e.x import y\n")
    assert imports_of("a", {"a", "b", "c", "d", "e"}, source) == {"b": 6, "c": 7, "d": 8, "e": 9}
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []
