"""The package's shape (README, "Layout"): layers import downward only, and no module imports
itself back through others. Every import counts, the ones inside functions too: a lazy import
hides a cycle from Python, not from a reader.

Layers: 0 foundation (errors, config, console, runtime, ledger, io) < 1 stage cores (the paper's
steps as numpy/torch/pandas functions) < 2 Ray adapters (where a core runs and how it streams)
< 3 the stage registry and entry points (``raycp.stages``, ``raycp run``, the CLIs)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raycp"

FOUNDATION = {"raycp", "raycp.errors", "raycp.config", "raycp.console", "raycp.runtime", "raycp.ledger", "raycp.layout"}
ADAPTERS = {"raycp.sites", "raycp.inspect", "raycp.preprocess.pipeline", "raycp.preprocess.tasks", "raycp.extract.pipeline", "raycp.extract.tasks",
            "raycp.extract.sources", "raycp.train.trainer", "raycp.train.data", "raycp.train.loop",
            "raycp.screens.build", "raycp.trainset.sources"}

# Upward imports allowed for now, each with its reason (none since #13). A new one fails this test,
# and so does a listed one that is gone (remove it from the list).
KNOWN_UPWARD: set[tuple[str, str]] = set()


#: Python APIs that are entry points (they choose the cluster, as the CLI does).
ENTRY_POINTS = {"raycp.extract"}
#: Sweeps drive whole runs (a subset trial trains, then walks the registered stages): layer 3.
SWEEP_DRIVERS = {"raycp.sweep.trial", "raycp.sweep.tuning", "raycp.sweep.writers"}


def layer(module: str) -> int:
    if module in ENTRY_POINTS or module in SWEEP_DRIVERS or module == "raycp.cli" or module.endswith(".cli") or module in ("raycp.run", "raycp.stages") or module.startswith(("raycp.run.", "raycp.stages.")):
        return 3
    if module in FOUNDATION or module == "raycp.io" or module.startswith("raycp.io."):
        return 0
    return 2 if module in ADAPTERS else 1


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            # a package's __init__ re-exporting its own modules, or a module importing its package, is no edge
            if target and target != name and not name.startswith(target + ".") and not target.startswith(name + "."):
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_no_module_imports_itself_back():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_import_downward_only():
    graph = _graph()
    assert {"raycp.io.tables", "raycp.preprocess.compress", "raycp.extract.pipeline", "raycp.run.runner",
            "raycp.stages.report"} <= set(graph)
    upward = {(m, t) for m, targets in graph.items() for t in targets if layer(t) > layer(m)}
    assert upward - KNOWN_UPWARD == set(), sorted(upward - KNOWN_UPWARD)
    assert KNOWN_UPWARD <= upward, "a known upward import is gone: remove it from KNOWN_UPWARD"


def test_the_foundation_imports_no_stage():
    graph = _graph()
    for module in graph:
        if layer(module) == 0:
            assert all(layer(t) == 0 for t in graph[module]), (module, sorted(graph[module]))


def test_only_the_runtime_connects_to_ray():
    """One home for Ray: library code asks :func:`raycp.runtime.connection` for the cluster its entry
    point chose (:func:`raycp.runtime.use`); only the runtime calls ``ray.init``, and only entry
    points call :func:`raycp.runtime.init` or ``use``."""
    calls = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name):
                calls.append((name, f"{node.func.value.id}.{node.func.attr}"))
    inits = {(m, c) for m, c in calls if c in ("ray.init", "runtime.init", "runtime.use")}
    assert {m for m, c in inits if c == "ray.init"} == {"raycp.runtime"}
    assert all(layer(m) == 3 for m, c in inits if c in ("runtime.init", "runtime.use")), sorted(inits)
    assert ("raycp.run.runner", "runtime.use") in inits


def test_library_code_without_a_chosen_cluster_says_so():
    import subprocess
    import sys

    code = ("from raycp import runtime\n"
            "try:\n    runtime.connection()\nexcept runtime.RuntimeSetupError as exc:\n    print(exc.one_line())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "needs a Ray cluster and no entry point chose one" in out.stdout, out.stdout + out.stderr
