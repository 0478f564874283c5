"""The import graph of ``cmerl`` has no cycle: imports point down (docs: README "Architecture").

Every ``import`` / ``from ... import`` of each module is read with :mod:`ast`, including those inside
functions (a cycle hidden in a function body is still a cycle); imports under ``if TYPE_CHECKING:`` are
left out (they never run). ``from cmerl.pkg import sub`` counts as an import of ``cmerl.pkg.sub`` when
``sub`` is a module, else of ``cmerl.pkg``; the implicit import of a parent package is not an edge.
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import cmerl

ROOT = Path(cmerl.__file__).parent

#: Cycles known to exist outside the evaluation/report area, left for their owners (strongly connected
#: components, as sorted module lists). A new cycle, or a cycle through one of these with more modules,
#: fails the test.
KNOWN_CYCLES: list[list[str]] = []


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


# --- Function-body imports: only to defer a heavy module (issue 11) --------------------------------------

#: Third-party packages slow to import here (``python -X importtime`` / wall time on the dev CPU: torch 1.1 s,
#: accelerate 1.3 s, peft 3.7 s, anthropic 1.6 s, sklearn 1.7 s, datasets 1.0 s, transformers 0.6 s,
#: matplotlib.pyplot 0.7 s, ray 0.6 s, pandas 0.4 s, math_verify 0.4 s, fastapi 0.4 s, trl 0.24 s,
#: huggingface_hub 0.13-0.2 s on first use, pyarrow 0.15 s, sacrebleu 0.15 s, scipy 0.16 s, uvicorn 0.12 s,
#: gguf 0.12 s, numpy 0.1 s; pydantic models of the server 0.4 s) or optional extras. Everything else
#: (stdlib, yaml 0.02 s, rich, typer, tqdm, httpx 0.1 s: none reached from ``cmerl --help``) is light.
HEAVY_THIRD_PARTY = frozenset({
    "torch", "transformers", "trl", "peft", "accelerate", "datasets", "pyarrow", "pandas", "matplotlib", "ray",
    "anthropic", "openai", "sklearn", "scipy", "statsmodels", "sacrebleu", "math_verify", "gguf",
    "huggingface_hub", "numpy", "fastapi", "uvicorn", "starlette", "pydantic"})


def split_imports(tree: ast.Module) -> tuple[list[ast.stmt], list[ast.stmt]]:
    """(module-level imports, imports inside a function body); ``if TYPE_CHECKING:`` blocks left out. Class
    bodies run at import, so their imports are module level."""
    top: list[ast.stmt] = []
    body: list[ast.stmt] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            (body if in_function else top).append(node)
        inside = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return top, body


class Heaviness:
    """Which imports are heavy, statically: an import is heavy when it names a :data:`HEAVY_THIRD_PARTY`
    package, or a cmerl module (or a parent package it runs) that is heavy, i.e. that imports a heavy
    module at module level; ``from pkg import name`` of a name that ``pkg`` only provides through a
    module-level ``__getattr__`` is as heavy as the imports in that ``__getattr__``."""

    def __init__(self) -> None:
        self.files = module_files()
        self.trees = {m: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for m, p in self.files.items()}
        self.split = {m: split_imports(t) for m, t in self.trees.items()}
        self._heavy: dict[str, bool] = {}

    def _bound(self, module: str) -> set[str]:
        names: set[str] = set()
        for node in self.trees[module].body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                names |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        return names

    def _lazy(self, module: str) -> list[ast.stmt]:
        getattr_ = [n for n in self.trees[module].body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]
        return [n for g in getattr_ for n in ast.walk(g) if isinstance(n, ast.Import | ast.ImportFrom)]

    def _targets(self, module: str, node: ast.stmt) -> tuple[set[str], set[str], list[tuple[str, ast.stmt]]]:
        """(cmerl modules the import runs, parents included; third-party top names; lazy imports it runs)."""
        path = self.files[module]
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        ours: set[str] = set()
        third: set[str] = set()
        lazy: list[tuple[str, ast.stmt]] = []

        def add(name: str) -> None:
            if name.split(".")[0] != "cmerl":
                third.add(name.split(".")[0])
                return
            while name and name not in self.files:
                name = name.rpartition(".")[0]
            parts = name.split(".")
            ours.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in self.files)

        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
            return ours, third, lazy
        if node.level:
            target = ".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        add(target)
        if target in self.files:
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in self.files:
                    add(sub)
                elif alias.name not in self._bound(target):
                    lazy += [(target, n) for n in self._lazy(target)]
        return ours, third, lazy

    def module(self, module: str) -> bool:
        """Whether importing ``module`` itself (its module-level imports) loads a heavy package."""
        if module not in self._heavy:
            self._heavy[module] = False  # a cycle counts as light until shown heavy
            self._heavy[module] = any(self.import_(module, n) for n in self.split[module][0])
        return self._heavy[module]

    def import_(self, module: str, node: ast.stmt) -> bool:
        """Whether the import statement ``node`` of ``module`` loads a heavy package."""
        ours, third, lazy = self._targets(module, node)
        return bool(third & HEAVY_THIRD_PARTY) or any(m != module and self.module(m) for m in ours) or any(
            self.import_(pkg, n) for pkg, n in lazy)


def _optional_probe(node: ast.stmt, parents: dict[ast.AST, ast.AST]) -> bool:
    """An import tried under ``try: ... except ImportError`` (a dependency treated as optional)."""
    up = parents.get(node)
    return isinstance(up, ast.Try) and node in up.body and any(
        h.type is not None and any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
                                   for n in ast.walk(h.type)) for h in up.handlers)


def _commented(node: ast.stmt, parents: dict[ast.AST, ast.AST], lines: list[str]) -> bool:
    """``deferred:`` on the import's line, the line above it, or the line above the run of consecutive
    import statements it belongs to."""
    siblings: list[ast.stmt] = next((getattr(parents[node], f) for f in ("body", "orelse", "finalbody")
                                     if node in getattr(parents[node], f, [])), [node])
    first = siblings.index(node)
    while first and isinstance(siblings[first - 1], ast.Import | ast.ImportFrom):
        first -= 1
    candidates = {node.lineno, node.lineno - 1, siblings[first].lineno - 1}
    return any(0 < n <= len(lines) and "deferred:" in lines[n - 1] for n in candidates)


def function_body_import_problems() -> list[str]:
    heaviness = Heaviness()
    problems = []
    for module, (_, body) in sorted(heaviness.split.items()):
        tree = heaviness.trees[module]
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        lines = heaviness.files[module].read_text(encoding="utf-8").splitlines()
        for node in body:
            where = f"{heaviness.files[module].relative_to(ROOT.parent)}:{node.lineno}: {ast.unparse(node)}"
            heavy = heaviness.import_(module, node)
            if not heavy and not _optional_probe(node, parents):
                problems.append(f"{where}: a light module: import it at the top of the module")
            elif not _commented(node, parents, lines):
                problems.append(f"{where}: say what it defers (# deferred: torch (torch-free CLI start))")
    return problems


def test_heaviness_is_read_from_module_level_imports():
    heaviness = Heaviness()
    assert heaviness.module("cmerl.models")  # imports torch at the top
    assert heaviness.module("cmerl.rewards")  # through cmerl.models
    assert not heaviness.module("cmerl.io") and not heaviness.module("cmerl.data")  # datasets only in functions
    assert not heaviness.module("cmerl.scoring")  # Verifier comes through __getattr__ ...
    verifier = ast.parse("from cmerl.scoring import Verifier").body[0]
    assert heaviness.import_("cmerl.cli.score", verifier)  # ... and importing it is heavy
    config = ast.parse("from cmerl.training.config import TrainConfig").body[0]
    assert heaviness.import_("cmerl.study", config)  # runs cmerl.training's __init__


def test_function_body_imports_only_defer_heavy_modules():
    """Issue 11: an import inside a function body is of a heavy module (or an optional-dependency probe) and
    carries a ``deferred:`` comment; every light import sits at the top of its module."""
    problems = function_body_import_problems()
    assert not problems, "\n".join(problems)


def test_cli_help_does_not_import_torch():
    code = ("import sys\nfrom cmerl.cli import app\ntry:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "Usage" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-500:]
