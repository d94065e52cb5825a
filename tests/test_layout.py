"""The package's architecture, checked from the code: layers import only downwards, no import
loops, and each ``dvc.yaml`` stage lists as deps every project module its command imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
# Bottom to top; a module may import from its own layer or the ones before it. Top-level modules
# of the package (predict, grid, throughput) are the commands, above the stages.
LAYERS = ("core", "data", "models", "training", "evaluation", "deploy", "stages")
COMMANDS = len(LAYERS)
# Modules that only send copies of results to MLflow: they change no stage output, so (like
# ``tracking.uri``) they are not stage deps, and editing them reruns nothing.
TRACKING_ONLY = {"pipeline/core/tracking.py", "pipeline/core/review.py"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in ``path`` (module level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                     else node.module for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] == "pipeline")
    unknown = found - set(modules)
    assert not unknown, f"{path}: imports modules that do not exist: {sorted(unknown)}"
    return found


def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def rank(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return COMMANDS + 1  # the package itself (its docstring)
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else COMMANDS


def test_layers_import_only_downwards():
    upward = [f"{mod} -> {dep}" for mod, deps in graph().items() for dep in deps
              if rank(dep) > rank(mod)]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_stage_imports_another_stage():
    sideways = [f"{mod} -> {dep}" for mod, deps in graph().items() for dep in deps
                if rank(mod) == rank(dep) == LAYERS.index("stages")]
    assert not sideways, "stage modules share code through the library:\n" + "\n".join(sideways)


def test_no_import_loop():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g[node]):
            if state.get(dep) == 1:
                loop = path[path.index(dep):] + [dep] if dep in path else [node, dep]
                pytest.fail("import loop: " + " -> ".join(loop))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for start in sorted(g):
        if start not in state:
            visit(start, [start])


def closure(module: str, g: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(g[mod])
    return seen


def docstring_only(path: Path) -> bool:
    """A module with nothing but a docstring (a package's ``__init__.py``): no dep needed."""
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def stage_commands() -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (module its command runs, its deps) from dvc.yaml (matrix/foreach stages:
    their template, whose deps hold the code files unexpanded)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        words = stage["cmd"].split()
        module = words[words.index("-m") + 1]
        out[name] = (module, [str(d) if isinstance(d, str) else next(iter(d)) for d in stage["deps"]])
    return out


@pytest.mark.parametrize("stage", sorted(stage_commands()))
def test_dvc_deps_list_every_imported_module(stage):
    module, deps = stage_commands()[stage]
    files = module_files()
    needed = sorted(str(files[m].relative_to(ROOT)) for m in closure(module, graph())
                    if not docstring_only(files[m]))
    needed = [f for f in needed if f not in TRACKING_ONLY]
    listed = sorted(d for d in deps if d.startswith("pipeline/"))
    assert listed == needed, (
        f"dvc.yaml stage {stage!r} runs {module}: its code deps should be exactly the modules it "
        f"imports; add {sorted(set(needed) - set(listed))}, drop {sorted(set(listed) - set(needed))}")
