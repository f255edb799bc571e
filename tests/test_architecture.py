"""The module graph: no import cycles (function-level imports included), Ray only in `catrs.distributed`, and
no chain of imports inside `catrs.distributed` longer than four modules (the Ray glue stays shallow)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"catrs": ROOT / "platform" / "catrs", "trainables": ROOT / "trainables"}


def module_files() -> dict[str, Path]:
    """Every module of the two packages by dotted name (a package by its own name)."""
    found = {}
    for root in PACKAGES.values():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root.parent).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(path: Path) -> set[str]:
    """Every absolute import in the file, wherever it stands (a lazy import inside a function still makes a
    cycle, only one that shows later)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = module_files()

    def owner(name: str) -> str | None:  # `catrs.train.fit` → `catrs.train`
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    return {
        module: {target for name in imported_names(path) if (target := owner(name)) not in (None, module)}
        for module, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                component.append(member)
            if component:
                found.append(sorted([node, *component]))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_detector_finds_a_cycle_through_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_catrs_or_trainables_is_part_of_an_import_cycle():
    graph = import_graph()
    assert {"catrs.train", "catrs.teacher", "catrs.sweep.run", "catrs.distributed.tune", "trainables.catrs"} <= set(
        graph
    )
    assert cycles(graph) == []


def test_only_catrs_distributed_imports_ray():
    outside = [
        module
        for module, path in module_files().items()
        if not module.startswith("catrs.distributed")
        and any(name == "ray" or name.startswith("ray.") for name in imported_names(path))
    ]
    assert outside == []


def longest_chain(graph: dict[str, set[str]], within: str) -> list[str]:
    """The longest path of imports among the modules whose names start with `within` (the graph has no cycles)."""
    inner = {m: {t for t in targets if t.startswith(within)} for m, targets in graph.items() if m.startswith(within)}
    memo: dict[str, list[str]] = {}

    def from_(module: str) -> list[str]:
        if module not in memo:
            memo[module] = [module, *max((from_(t) for t in inner[module]), key=len, default=[])]
        return memo[module]

    return max((from_(m) for m in inner), key=len, default=[])


def test_the_longest_chain_is_found():
    graph = {"p.a": {"p.b", "q.x"}, "p.b": {"p.c"}, "p.c": set(), "q.x": {"p.a"}}
    assert longest_chain(graph, "p.") == ["p.a", "p.b", "p.c"]


def test_no_import_chain_inside_distributed_is_longer_than_four_modules():
    chain = longest_chain(import_graph(), "catrs.distributed.")
    assert 2 <= len(chain) <= 4, " -> ".join(chain)


def signatures_with(parameter: str) -> list[str]:
    """The functions of both packages that take `parameter`."""
    found = []
    for module, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                if parameter in {a.arg for a in arguments}:
                    found.append(f"{module}.{node.name}")
    return found


def parameter_counts(*names: str) -> dict[str, int]:
    """How many parameters each named function of both packages takes."""
    counts = {}
    for module, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in names:
                arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                counts[f"{module}.{node.name}"] = len(arguments)
    return counts


if __name__ == "__main__":  # the shape of the code, as the closing notes report it: python -m tests.test_architecture
    for module, path in sorted(module_files().items()):
        if module.startswith(("catrs.distributed", "catrs.sweep")) or module in ("catrs.search_space",):
            print(f"{len(path.read_text().splitlines()):5d}  {module}")
    print(
        "longest import chain inside catrs.distributed:",
        " -> ".join(longest_chain(import_graph(), "catrs.distributed.")),
    )
    print("signatures that take data_root:", len(signatures_with("data_root")))
    print("parameters:", parameter_counts("run_sweep", "train_distributed"))
