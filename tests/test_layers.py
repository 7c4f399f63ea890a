"""The package's modules import down the layers only, and no import cycle exists: every
`import` is read with `ast`, those inside functions included (a deferred import is still a
dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lmmtune"

LAYERS = {
    # bottom to top: a module may import its own layer and those below it
    "errors": 0,
    "redact": 0,
    "distributed": 0,
    "hub": 0,  # hub ids, reachability, the download hint: models (model) and data sets (data)
    "config": 1,
    "validate": 1,
    "stage_configs": 1,  # the configs of a two-stage run's stages
    "yaml_config": 1,  # config files read as plain data
    "data": 2,
    "demo": 2,  # the demo set (data) and the tiny model (model builds on it)
    "model": 3,
    "model_projector": 3,
    "rundir": 3,
    "finished_run": 4,
    "training": 4,
    "tracking": 5,
    "eval": 6,
    "export": 7,
    "commands": 7,
    "combine": 7,
    "chat": 7,
    "stages": 8,
    "cli": 8,
    "api": 9,
    "__init__": 10,
    "__main__": 10,
}
"""The top-level module or sub-package of each `lmmtune.X` and its layer."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str) -> set[str]:
    """Every lmmtune module `path` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    # The package itself (`from lmmtune import __version__`) is no edge: Python imports it
    # before any of its modules anyway, and its notebook functions import their modules late.
    return {
        name: {m for m in imported_modules(path, name) if m in files and m not in (name, "lmmtune")}
        for name, path in files.items()
    }


def layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in LAYERS, f"{module}: add lmmtune.{top} to LAYERS in {__file__}"
    return top, LAYERS[top]


def test_no_module_imports_up_the_layers():
    upward = []
    for name, imports in import_graph().items():
        top, level = layer(name)
        for target in imports:
            target_top, target_level = layer(target)
            if target_level > level:
                upward.append(f"{name} ({top}, layer {level}) -> {target} (layer {target_level})")
    assert not upward, "imports up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = import_graph()
    cycles, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_graph_sees_function_level_imports():
    """The check itself: a deferred import counts (config imports errors only inside functions)."""
    assert "lmmtune.errors" in import_graph()["lmmtune.config"]
