"""The package's import graph points down only: no cycle between packages, and each package imports
only from the layers below it (or its own). Imports inside functions count too, and so do imports
under `if TYPE_CHECKING:`: a type hint that names a higher layer is a dependency on it all the
same (a lower layer handed a higher one's object declares what it reads as a `Protocol`, as
`methods.base.RecipeView` does for the recipe)."""

from __future__ import annotations

import ast
import itertools
from collections import defaultdict
from pathlib import Path

import peftkit

ROOT = Path(peftkit.__file__).resolve().parent

# Bottom to top. A package is a subfolder of peftkit/ or a top-level module; "peftkit" is the root
# package itself (__version__). `launch` reads the process's environment only (model loading asks
# it too); `caches` names every cache folder (data, GGUF, built-in models) under one root, which
# data and models both use; `metrics` is the metrics.jsonl log that the objectives, the loop and
# the reports share. The data sections (`data.spec`) sit with the data code that reads them, below
# the recipe, as the model section (`models.spec`) does. `kernels` (the fused MLP, head and
# cross-entropy, varlen attention) sits below the objectives, training and the planner, which all
# read its facts; it reads models' layer helpers and data's IGNORE label. Each objective
# (`objectives/`: SFT, multitask, task head, DPO, ORPO, KTO, SimPO, GRPO) owns its recipe section
# and rules, its data, its loss and its metrics, so it sits above data (reading and chat rendering)
# and the kernels, and below the recipe, which composes the objectives' sections (its
# `objective:` is their union) as it composes the methods' (`adapter:`); the loop and every
# consumer ask the objective. Each exporter (`exporters/`: merged safetensors, adapter, GGUF, LoRA
# GGUF, task head) owns its `export:` section, its refusals and its build step, so it sits below
# the recipe, which composes their sections (`export:` is their union keyed on `format`); a build
# step composes the merge, writers and read-back that `export` (above) hands it as an
# `ExportContext`, so it imports none of them, not even inside a function. `report` draws pages
# from a run directory's files (export and the sweep call it; the training loop is handed its
# writer by api and sweep).
LAYERS = [
    {
        "peftkit",
        "errors",
        "io",
        "caches",
        "units",
        "_compat",
        "section",
        "section_registry",
        "launch",
        "metrics",
    },
    {"models"},
    {"methods"},
    {"data"},
    {"kernels"},
    {"objectives"},
    {"exporters"},
    {"recipe"},
    {"training"},
    {"planner", "export", "adapters", "serving", "sweep", "report"},
    {"api"},
    {"cli", "__main__"},
]
LEVEL = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "peftkit":
        return None
    return parts[1] if len(parts) > 1 else "peftkit"


def _imports(tree: ast.AST, module: str, is_package: bool):
    """(imported module, line) for every import in `tree`, at any depth (TYPE_CHECKING too)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:  # `from peftkit import api` imports the module peftkit.api
                yield f"{target}.{alias.name}", node.lineno
        stack.extend(ast.iter_child_nodes(node))


def _is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def package_graph() -> dict[tuple[str, str], list[str]]:
    """{(importing package, imported package): ["module:line -> target", ...]}."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        for target, line in _imports(tree, module, path.name == "__init__.py"):
            src, dst = _package(module), _package(target)
            if dst is None or src == dst or not _is_module(target):
                continue
            edges[(src, dst)].append(f"{module}:{line} -> {target}")
    return edges


def test_every_package_has_a_layer():
    packages = {_package(_module_name(p)) for p in ROOT.rglob("*.py")}
    assert packages - set(LEVEL) == set(), "add the new package to LAYERS in this test"


def test_no_cycle_between_packages():
    edges = package_graph()
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst in edges:
        graph[src].add(dst)
    cycle = _find_cycle(graph)
    if cycle:
        where = [w for a, b in itertools.pairwise(cycle) for w in edges[(a, b)]]
        raise AssertionError(f"import cycle {' -> '.join(cycle)}:\n" + "\n".join(where))


def test_imports_point_down():
    upward = [
        f"{src} (layer {LEVEL[src]}) imports {dst} (layer {LEVEL[dst]}): {where}"
        for (src, dst), found in sorted(package_graph().items())
        if LEVEL[dst] > LEVEL[src]
        for where in found
    ]
    assert upward == []


def test_the_check_sees_lazy_and_type_checking_imports(tmp_path):
    # an import inside a function is an edge, and so is one under TYPE_CHECKING
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from peftkit.api import train\n"
        "def f():\n    from peftkit import cli\n"
    )
    found = {t for t, _ in _imports(tree, "peftkit.models.x", False)}
    assert "peftkit.cli" in found and "peftkit.api" in found


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt, [*path, nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_no_cycle_between_the_files_of_a_package():
    """Inside a package, files import each other one way too (lazy imports included): a cycle
    between two files means a concept without its own home."""
    graph: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], str] = {}
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        for target, line in _imports(tree, module, path.name == "__init__.py"):
            if not target.startswith("peftkit.") or not _is_module(target) or target == module:
                continue
            if _package(target) != _package(module) or target.endswith(".__init__"):
                continue
            if (ROOT.parent.joinpath(*target.split(".")) / "__init__.py").is_file():
                continue  # a package's face (its __init__), not one of its files
            graph[module].add(target)
            where.setdefault((module, target), f"{module}:{line} -> {target}")
    cycle = _find_cycle(graph)
    assert cycle is None, "file-level import cycle:\n" + "\n".join(
        where[(a, b)] for a, b in itertools.pairwise(cycle)
    )
