"""The package's shape, read from the source: no import cycle, the stages' packages imported in the
order a run meets them, no module over 400 lines, and no strategy name tested outside
launcher/strategies/ (everything else asks the strategy)."""

import ast
from pathlib import Path

import pytest

from launcher.strategies import NAMES

PACKAGE = Path(__file__).resolve().parents[2] / "launcher"
MAX_LINES = 400


def module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_of(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """The package's modules that `path` imports, at any depth of the code (function bodies included)."""
    this = module_of(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import sub` imports the submodule; `from pkg import name` reads pkg itself.
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return {name for name in found if name in MODULES and name != this}


def test_no_import_cycle():
    graph = {name: imported_modules(path) for name, path in MODULES.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycle = trail[trail.index(target) :] + [target] if target in trail else [name, target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


# What every stage may import without pulling in another stage (signals: before anything heavy).
LEAF_MODULES = [
    "launcher.config",
    "launcher.objective_config",
    "launcher.adapter_config",
    "launcher.quiet",
    "launcher.typed_yaml",
    "launcher.dtypes",
    "launcher.resources",
    "launcher.collectives",
    "launcher.signals",
    "launcher.node_cache",
    "launcher.safe_load",
    "launcher.cpu_shims",
    "launcher.vision",
]
ENTRY_POINTS = [
    "launcher.__main__",
    "launcher.accelerate_entry",
    "launcher.cli",
    "launcher.train",
    "launcher.preflight",
    "launcher.demo",
]
# The stages, in the order a run meets them: a package imports only leaves, itself, and the ones before it.
STAGES = ["data", "objectives", "model", "strategies", "run", "checkpoint", "memory", "launch"]


def stage_of(name: str) -> str:
    if name in LEAF_MODULES or name == "launcher":
        return "leaf"
    if name in ENTRY_POINTS:
        return "entry"
    parts = name.split(".")
    assert len(parts) > 1 and parts[1] in STAGES, f"{name} is neither a leaf, an entry point nor in a stage package"
    return parts[1]


def rank_of(stage: str) -> int:
    return {"leaf": -1, "entry": len(STAGES)}.get(stage) if stage in ("leaf", "entry") else STAGES.index(stage)


@pytest.mark.parametrize("name", LEAF_MODULES)
def test_leaf_modules_import_only_leaves(name):
    assert {stage_of(target) for target in imported_modules(MODULES[name])} <= {"leaf"}, imported_modules(MODULES[name])


def test_the_top_level_holds_only_entry_points_and_leaves():
    top = {name for name, path in MODULES.items() if path.parent == PACKAGE and path.name != "__init__.py"}
    assert top == set(LEAF_MODULES) | set(ENTRY_POINTS), top ^ (set(LEAF_MODULES) | set(ENTRY_POINTS))


@pytest.mark.parametrize("name", sorted(set(MODULES) - set(ENTRY_POINTS) - set(LEAF_MODULES) - {"launcher"}))
def test_a_stage_imports_only_leaves_itself_and_earlier_stages(name):
    own = stage_of(name)
    later = {t for t in imported_modules(MODULES[name]) if rank_of(stage_of(t)) > rank_of(own)}
    assert not later, f"{name} ({own}) imports later stages {sorted(later)}; the order is {STAGES}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by job"


def strategy_tests(tree: ast.AST) -> list[str]:
    """Comparisons with a strategy name, and `.startswith` with a prefix of one."""

    def names_in(node) -> list[str]:
        if isinstance(node, ast.Constant) and node.value in NAMES:
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [n for element in node.elts for n in names_in(element)]
        return []

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            found += [n for side in (node.left, *node.comparators) for n in names_in(side)]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "startswith":
            found += [
                arg.value
                for arg in node.args
                if isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
                and any(n.startswith(arg.value) for n in NAMES)
            ]
    return found


def test_no_strategy_name_is_tested_outside_strategies():
    outside = {name: path for name, path in MODULES.items() if not name.startswith("launcher.strategies")}
    offenders = {
        name: found for name, path in outside.items() if (found := strategy_tests(ast.parse(path.read_text())))
    }
    assert not offenders, f"ask the strategy (its spec or a hook) instead of testing its name: {offenders}"


def test_the_checks_see_what_they_look_for():
    # The rules above would pass on anything if the parsing were wrong.
    assert strategy_tests(ast.parse('if s.name.startswith("zero") or s in ("fsdp1", "x"): pass')) == ["zero", "fsdp1"]
    assert imported_modules(PACKAGE / "train.py") >= {
        "launcher.preflight",
        "launcher.checkpoint.store",
        "launcher.memory.measure",
    }
    assert imported_modules(PACKAGE / "data" / "loading.py") >= {"launcher.config", "launcher.data.batches"}
    assert [stage_of(n) for n in ("launcher.config", "launcher.train", "launcher.run.failures")] == [
        "leaf",
        "entry",
        "run",
    ]
    assert rank_of("leaf") < rank_of("model") < rank_of("run") < rank_of("entry")
