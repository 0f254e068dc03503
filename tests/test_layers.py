"""The package's layers (docs/architecture.md): every import, at module level or inside a function, points down
or stays in its layer, and no chain of imports comes back to where it started (between modules, or between the
packages of one layer). Read from the source with `ast`, so an import hidden in a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import posttrain

ROOT = Path(posttrain.__file__).parent

# bottom to top; a module belongs to the first entry its dotted name starts with
LAYERS = [
    ["errors", "batch", "buffer", "invariants", "presets", "algos"],  # types and pure functions
    ["config"],
    ["data", "sandbox", "rewards", "models", "rollout", "tasks"],  # the pieces
    ["train"],  # run lifecycle, checkpoints, metrics and reports, the optimizer step, evaluation
    ["rl"],  # the one RL loop and its roles
    ["distributed"],  # the roles on Ray
    ["recipes"],  # one function per command
    ["api"],  # every command as a function (the CLI calls it)
    ["cli", "__main__", ""],  # the command line, the package itself
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module (relative to posttrain, "" for the package) -> the posttrain modules it imports."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        out = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from .x import y
                    base = package.split(".") if package else []
                    base = base[:len(base) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                elif node.module and node.module.split(".")[0] == "posttrain":
                    target = node.module.removeprefix("posttrain").lstrip(".")
                else:
                    continue
                for alias in node.names:
                    full = f"{target}.{alias.name}" if target else alias.name
                    out.add(full if full in modules else target)
            elif isinstance(node, ast.Import):
                out |= {a.name.removeprefix("posttrain").lstrip(".") for a in node.names
                        if a.name.split(".")[0] == "posttrain"}
        edges[name] = {t for t in out if t != name}
    return edges


def layer(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"posttrain.{module} is in no layer: add it to LAYERS (and docs/architecture.md)")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_import_points_down_or_stays_in_its_layer():
    upward = sorted(f"posttrain.{a} (layer {layer(a)}) imports posttrain.{b} (layer {layer(b)})"
                    for a, targets in imports().items() for b in targets if layer(b) > layer(a))
    assert upward == [], "\n".join(upward)


def test_no_import_cycle_between_modules():
    edges = imports()
    graph = {a: {b for b in targets if b in edges} for a, targets in edges.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_import_cycle_between_the_packages_of_a_layer():
    packages: dict[str, set[str]] = {}
    for a, targets in imports().items():
        for b in targets:
            pa, pb = a.split(".")[0], b.split(".")[0]
            if pa != pb:
                packages.setdefault(pa, set()).add(pb)
    assert find_cycle(packages) is None, " -> ".join(find_cycle(packages))


def test_the_checker_finds_an_upward_edge_and_a_cycle():
    assert layer("rl.loop") > layer("train.run") > layer("models.lean") > layer("config") > layer("algos.kl")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    edges = imports()
    assert "train.optim" in edges["rl.learner"] and "rl.roles" in edges["distributed.cluster"]
