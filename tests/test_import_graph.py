"""The import graph of ``cmerl`` has no cycle: imports point down (docs: README "Architecture").

Every ``import`` / ``from ... import`` of each module is read with :mod:`ast`, including those inside
functions (a cycle hidden in a function body is still a cycle); imports under ``if TYPE_CHECKING:`` are
left out (they never run). ``from cmerl.pkg import sub`` counts as an import of ``cmerl.pkg.sub`` when
``sub`` is a module, else of ``cmerl.pkg``; the implicit import of a parent package is not an edge.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import cmerl

ROOT = Path(cmerl.__file__).parent

#: Cycles known to exist outside the evaluation/report area, left for their owners (strongly connected
#: components, as sorted module lists). A new cycle, or a cycle through one of these with more modules,
#: fails the test.
KNOWN_CYCLES: list[list[str]] = [
    ["cmerl.data", "cmerl.problems"],  # problems uses data's PromptDataError; data dispatches to problems
]


def module_files() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """``{imported cmerl module: line of the first such import}`` of one module."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.setdefault(name, line)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                add(sub if sub in modules else target, node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def import_graph() -> dict[str, dict[str, int]]:
    modules = module_files()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def one_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    """A readable cycle through ``component``: ``a (line 3) -> b (line 9) -> a``."""
    inside = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        here = path[-1]
        nxt = sorted(w for w in graph[here] if w in inside)
        back = next((w for w in nxt if w in seen), None)
        step = back if back is not None else nxt[0]
        path.append(step)
        if back is not None:
            cycle = path[path.index(back):]
            return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(cycle)) + f" -> {back}"
        seen.add(step)


def test_the_graph_reads_imports_inside_functions():
    graph = import_graph()
    assert "cmerl.report" in graph["cmerl.evaluation"]  # module level
    assert "cmerl.winrates" in graph["cmerl.cli.evaluate"]  # inside a command function (torch-free CLI start)
    assert "cmerl.training.config" not in graph["cmerl.training.reward_registry"]  # only under TYPE_CHECKING


def test_no_import_cycle():
    graph = import_graph()
    cycles = [c for c in strongly_connected(graph) if c not in KNOWN_CYCLES]
    assert not cycles, "import cycles:\n" + "\n".join(one_cycle(graph, c) for c in cycles)


def reachable(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_report_and_evaluation_import_downward():
    """The report reads result files and never the pipelines that write them (not even through another
    module); no cycle runs through the evaluation modules."""
    graph = import_graph()
    below_report = reachable(graph, "cmerl.report")
    assert not below_report & {"cmerl.evaluation", "cmerl.comparison", "cmerl.study"}, sorted(below_report)
    for module in ("cmerl.evaluation", "cmerl.report", "cmerl.winrates", "cmerl.checks", "cmerl.comparison"):
        in_cycle = [c for c in strongly_connected(graph) if module in c]
        assert not in_cycle, one_cycle(graph, in_cycle[0])
