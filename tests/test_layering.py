"""The package's layering, read from the source with ``ast`` (nothing is imported).

Layers: ``kernels`` -> ``ops`` -> ``nn`` -> ``models`` / ``convert`` -> ``bench``. The kernels and the ops never
import the module layer or anything above it, and the package-internal import graph has no cycle. Every import
statement counts, wherever it is: at the top, inside a function (a lazy import hides a cycle from the
interpreter, not from the design), under ``if TYPE_CHECKING``.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "resnet_fast"
PACKAGE = "resnet_fast"
LOW_LAYERS = ("resnet_fast.ops", "resnet_fast.kernels")
ABOVE_OPS = ("resnet_fast.nn", "resnet_fast.convert", "resnet_fast.models")


def _module_name(path: pathlib.Path, root: pathlib.Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _is_under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def import_graph(sources: dict, package: str = PACKAGE) -> dict:
    """``{module: {(imported module, line)}}`` over the package-internal imports of ``sources``
    (``{module name: (source text, is a package __init__)}``). ``from X import y`` is an edge to ``X.y`` when
    that is a module of the package, else to ``X``; relative imports are resolved against the importing module."""
    modules = set(sources)
    graph = {}
    for name, (text, is_package) in sources.items():
        edges = set()
        for node in ast.walk(ast.parse(text, filename=name)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
            else:
                continue
            for target in targets:
                if _is_under(target, (package,)) and target != name:
                    edges.add((target, node.lineno))
        graph[name] = edges
    return graph


def layer_violations(graph: dict) -> list:
    """``"module:line imports target"`` for each import of the module layer or above by the kernels or ops."""
    return sorted(f"{name}:{line} imports {target}" for name, edges in graph.items() if _is_under(name, LOW_LAYERS)
                  for target, line in edges if _is_under(target, ABOVE_OPS))


def find_cycle(graph: dict) -> list | None:
    """One import cycle ``[a, b, ..., a]`` of ``graph``, or None (iterative depth-first search)."""
    adjacency = {name: sorted({t for t, _ in edges if t in graph}) for name, edges in graph.items()}
    state = {}  # 1: on the current path, 2: done
    for start in sorted(adjacency):
        if state.get(start):
            continue
        path, stack = [start], [iter(adjacency[start])]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(adjacency[nxt]))
    return None


def package_sources(root: pathlib.Path = ROOT, package: str = PACKAGE) -> dict:
    return {_module_name(p, root, package): (p.read_text(encoding="utf-8"), p.name == "__init__.py")
            for p in sorted(root.rglob("*.py"))}


# ------------------------------------------------------------------------------------------- the package
@pytest.fixture(scope="module")
def graph():
    g = import_graph(package_sources())
    assert "resnet_fast.ops.conv" in g and "resnet_fast.nn.functional" in g  # the walk found the package
    return g


def test_kernels_and_ops_do_not_import_the_module_layer(graph):
    assert layer_violations(graph) == []


def test_package_import_graph_has_no_cycle(graph):
    cycle = find_cycle(graph)
    if cycle is not None:
        lines = [min(line for t, line in graph[a] if t == b) for a, b in zip(cycle, cycle[1:])]
        steps = [f"{a} (line {n})" for a, n in zip(cycle, lines)]
        pytest.fail("import cycle: " + " -> ".join(steps + [cycle[-1]]))


def test_the_graph_sees_relative_and_lazy_imports(graph):
    # Known edges of the real package: a relative module import, a relative package import, a lazy import.
    targets = {name: {t for t, _ in edges} for name, edges in graph.items()}
    assert "resnet_fast._backend" in targets["resnet_fast.ops.conv"]
    assert "resnet_fast.ops" in targets["resnet_fast.nn.functional"]
    assert "resnet_fast.kernels.conv_fwd" in targets["resnet_fast.ops.conv"]  # inside the custom op's body


# ------------------------------------------------------------------------- the checks catch what they must
def _fake(modules: dict) -> dict:
    """Sources of a fake ``resnet_fast``: ``{name: text}``, names ending in ``__init__`` are packages."""
    return {n.removesuffix(".__init__"): (text, n.endswith("__init__")) for n, text in modules.items()}


@pytest.mark.parametrize("text", [
    "from ..nn import functional\n",                             # relative, top level
    "def f():\n    from ..nn.sync_bn import SyncBatchNorm2d\n",  # relative, lazy (the cycle-hiding kind)
    "import resnet_fast.convert\n",                              # absolute
    "def f():\n    from resnet_fast import models\n",          # absolute, lazy, a package via from-import
    "from .. import nn\n",                                       # the package itself, relative
])
def test_layer_check_catches_an_upward_import(text):
    sources = _fake({"resnet_fast.__init__": "", "resnet_fast.ops.__init__": "", "resnet_fast.ops.conv": text,
                     "resnet_fast.nn.__init__": "", "resnet_fast.nn.functional": "", "resnet_fast.nn.sync_bn": "",
                     "resnet_fast.convert": "", "resnet_fast.models.__init__": ""})
    (violation,) = layer_violations(import_graph(sources))
    assert violation.startswith("resnet_fast.ops.conv:")


def test_layer_check_allows_downward_imports():
    sources = _fake({"resnet_fast.__init__": "", "resnet_fast._backend": "",
                     "resnet_fast.kernels.__init__": "", "resnet_fast.kernels.checks": "from .. import _backend\n",
                     "resnet_fast.ops.__init__": "", "resnet_fast.ops.conv": "from ..kernels import checks\n",
                     "resnet_fast.nn.__init__": "", "resnet_fast.nn.functional": "from .. import ops\n"})
    assert layer_violations(import_graph(sources)) == []


def test_cycle_check_catches_a_lazy_cycle():
    sources = _fake({"resnet_fast.__init__": "", "resnet_fast.ops.__init__": "",
                     "resnet_fast.ops.a": "from . import b\n",
                     "resnet_fast.ops.b": "def f():\n    from .a import g\n",
                     "resnet_fast.ops.c": "from .a import g\n"})
    graph = import_graph(sources)
    assert find_cycle(graph) in (["resnet_fast.ops.a", "resnet_fast.ops.b", "resnet_fast.ops.a"],
                                 ["resnet_fast.ops.b", "resnet_fast.ops.a", "resnet_fast.ops.b"])
    del sources["resnet_fast.ops.b"]
    assert find_cycle(import_graph(sources)) is None
