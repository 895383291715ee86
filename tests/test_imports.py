"""The package's import graph has no cycle, imports inside functions included (layering: kernels <- rules <-
layers <- mixture <- model <- training <- CLI).

Nodes are the modules of `lsm` and `lsm_kernels` (the `kernels/` folder); an edge A -> B is any `import B` or
`from B import x` (relative or absolute, at any depth of A's AST) where B, or `B.x` for a submodule `x`, is one
of those modules. The implicit import of a parent package's `__init__` is not an edge.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"lsm": ROOT / "lsm", "lsm_kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [pkg, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _targets(name: str, path: Path, node: ast.AST, mods: dict[str, Path]) -> set[str]:
    """The package modules one import statement of module `name` loads."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in mods}
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods}
    if base in mods and len(out) < len(node.names):  # some names are attributes of `base` itself
        out.add(base)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(name, path, node, mods)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    colour = dict.fromkeys(graph, 0)   # 0 unseen, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if colour[m] == 1:
                return stack[stack.index(m):] + [m]
            if colour[m] == 0 and (cycle := visit(m)):
                return cycle
        stack.pop()
        colour[n] = 2
        return None

    for n in sorted(graph):
        if colour[n] == 0 and (cycle := visit(n)):
            return cycle
    return None


def test_graph_sees_the_layering():
    graph = import_graph()
    assert "lsm.rules.base" in graph["lsm.rules"] and "lsm.rules.deltanet" in graph["lsm.rules"]
    assert "lsm.checkpoint" in graph["lsm.train"] and "lsm.model" in graph["lsm.checkpoint"]
    assert "lsm_kernels.diag" in graph["lsm.rules._diag"]          # an import inside a function counts


def test_import_graph_is_acyclic():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} import edges, no cycle")


def test_find_cycle_reports_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
