"""The package's shape: no import cycles, capabilities that do not reach into each other, no global
matplotlib backend."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for file in SRC.rglob("*.py"):
        parts = list(file.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = file
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> steerlab modules it imports anywhere in its body (function-level imports included)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, file in modules.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for target in targets:
                if target in modules and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
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
                    cycles.append(sorted(component))
    return cycles


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_shared_layers_do_not_import_capabilities():
    """evaluate/data/hooks/models/report serve every capability and import none of them."""
    capabilities = (
        "steerlab.steering",
        "steerlab.influence",
        "steerlab.hessian",
        "steerlab.finetune",
        "steerlab.organisms",
        "steerlab.redteam",
        "steerlab.playground",
    )
    shared = (
        "steerlab.evaluate",
        "steerlab.data",
        "steerlab.hooks",
        "steerlab.models",
        "steerlab.report",
        "steerlab.io",
        "steerlab.options",
        "steerlab.errors",
    )
    graph = import_graph()
    offenders = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith(shared)
        for target in targets
        if target.startswith(capabilities)
    }
    assert offenders == set()


def test_no_module_sets_the_matplotlib_backend():
    offenders = [str(f) for f in SRC.rglob("*.py") if "matplotlib.use(" in f.read_text()]
    assert offenders == []


def test_reports_import_without_transformers_or_pyplot():
    code = (
        "import sys, steerlab.hessian.report, steerlab.influence.report, steerlab.steering.report,"
        " steerlab.redteam.report, steerlab.organisms.report, steerlab.finetune.report;"
        "print(sorted(m for m in ('transformers', 'matplotlib.pyplot') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
