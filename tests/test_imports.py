"""The package's import structure: every module imports on its own, and the layers depend one way.

The README's flow is recipe -> model -> parallel -> train: `vggt_fsdp.model` knows nothing of sharding,
`vggt_fsdp.parallel` shards any model from a recipe's sections without knowing the recipe module, and
no two modules import each other, directly or through others. The graph is read statically from every
`import` statement of the package (at module level, inside functions and under TYPE_CHECKING alike:
a lazy import still ties two modules together), so the check needs no import order to be lucky.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vggt_fsdp"


def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules its import statements execute: the named module and the packages
    above it (Python runs `a/__init__.py` before `a.b`), without the importer's own ancestors (they are
    already running when it is imported)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                targets.add(source)
                targets.update(f"{source}.{alias.name}" for alias in node.names)  # `from pkg import module`
        edges = set()
        for target in targets:
            parts = target.split(".")
            edges.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules)
        graph[name] = {e for e in edges if e != name and not name.startswith(e + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


GRAPH = import_graph(package_modules())


def test_the_graph_reader_sees_the_known_edges():
    """The reader itself: a plain, a lazy and a relative import each give an edge, and a submodule's
    import runs its package's __init__ first."""
    assert "vggt_fsdp.parallel.config" in GRAPH["vggt_fsdp.recipe"]
    assert "vggt_fsdp.parallel" in GRAPH["vggt_fsdp.recipe"]  # parallel/__init__ runs before parallel.config
    assert "vggt_fsdp.recipe" in GRAPH["vggt_fsdp.train.build"]  # imported inside a function
    assert "vggt_fsdp.model.vggt" in GRAPH["vggt_fsdp.model"]  # `from .vggt import ...`
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(toy) == [["a", "b", "c"]]


def test_no_import_cycles_in_the_package():
    assert cycles(GRAPH) == []


def test_the_parallel_layer_never_reaches_the_recipe_module():
    """recipe.py loads the `parallel:` section and checks the `accelerate:` one with parallel's
    functions; parallel reads recipes only through their sections (LaunchSpec), never the module."""
    parallel = [name for name in GRAPH if name == "vggt_fsdp.parallel" or name.startswith("vggt_fsdp.parallel.")]
    assert "vggt_fsdp.parallel.accelerate" in reachable(GRAPH, "vggt_fsdp.recipe")
    for name in parallel:
        assert "vggt_fsdp.recipe" not in reachable(GRAPH, name), name


@pytest.mark.parametrize("layer", ["vggt_fsdp.model", "vggt_fsdp.parallel"])
def test_model_and_parallel_import_nothing_else_of_the_package(layer):
    """The model knows nothing of sharding and the sharding engine knows no particular model."""
    inside = [name for name in GRAPH if name == layer or name.startswith(layer + ".")]
    outside = {target for name in inside for target in reachable(GRAPH, name)
               if target != layer and not target.startswith(layer + ".") and target != "vggt_fsdp"}
    assert outside == set()


IMPORT_ALL = """
import importlib, sys, traceback
failures = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        failures.append(name + ": " + traceback.format_exc(limit=3))
print("\\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_every_module_imports_in_a_fresh_interpreter():
    """No module needs an optional dependency or a name that another import happens to provide at
    import time (the static test above rules out cycles whatever the import order)."""
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL, *sorted(GRAPH)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
