"""The package's layers, read from the source: kernels -> ops -> trainers, data flowing one way.

Every ``import`` of every module (at the top or inside a function: a lazy import closes a circle as well)
is parsed and resolved to a module of the installed package (``kernels/`` is ``rlhf_fast.kernels``,
``benchmarks/`` is ``rlhf_fast.benchmarks``). Checked: no import circle between modules; the kernels import
nothing of the op layer; the op layer imports nothing of the trainers, the CLI, the demo, the integrations
or the benchmarks; and no source file passes the size at which the style guide splits one.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as
PACKAGES = {"rlhf_fast": "rlhf_fast", "kernels": "rlhf_fast.kernels", "benchmarks": "rlhf_fast.benchmarks"}
# Above the op layer: a module of the op layer importing one of these points upwards.
UPPER = ("rlhf_fast.train", "rlhf_fast.cli", "rlhf_fast.demo", "rlhf_fast.integrations", "rlhf_fast.benchmarks",
         "rlhf_fast.__main__")  # fmt: skip
MAX_LINES = 520  # the style guide's "~500 lines", with a little slack


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join([package, *parts])] = path
    return mods


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.AST) -> set[str]:
    """The package modules an import statement of ``module`` loads (the longest known prefix of each name)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if _is_package(module) else module.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
    out = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)
    return out


def _imports() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps |= _resolve(name, node)
        # a module's own package __init__ runs first anyway: importing it is no edge of a circle
        graph[name] = {d for d in deps if not (_is_package(d) and name.startswith(d + "."))}
    return graph


GRAPH = _imports()


def _layer(name: str) -> str:
    if name.startswith("rlhf_fast.kernels"):
        return "kernels"
    if name.startswith(UPPER):
        return "upper"
    return "ops"


def test_the_import_graph_is_read():
    """The parser finds the edges it must (a sanity check: an empty graph would pass everything below)."""
    assert "rlhf_fast.kernels.logprobs" in GRAPH["rlhf_fast.logprobs_op"] or any(
        "rlhf_fast.kernels" in d for d in GRAPH["rlhf_fast.logprobs_op"]
    )
    assert "rlhf_fast.kernels._build" in GRAPH["rlhf_fast.kernels.logprobs"]
    assert "rlhf_fast.train.rollout" in GRAPH["rlhf_fast.train.ppo"]
    assert "rlhf_fast.sampling" in GRAPH["rlhf_fast.train.rollout"]


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("lower", ["kernels", "ops"])
def test_no_import_from_a_lower_layer_to_a_higher_one(lower):
    order = {"kernels": 0, "ops": 1, "upper": 2}
    bad = [f"{m} imports {d}" for m, deps in GRAPH.items() if _layer(m) == lower for d in sorted(deps)
           if order[_layer(d)] > order[lower]]  # fmt: skip
    assert not bad, "\n".join(bad)



def test_no_source_file_is_too_long():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_module_is_shadowed_by_a_public_name():
    """``import rlhf_fast.X as m`` gives a module for every module X of the package: no public name of
    ``rlhf_fast`` (an op re-exported from its module) has a module's dotted name (issue 23)."""
    import importlib
    import pkgutil
    import types

    import rlhf_fast

    names = [m.name for m in pkgutil.iter_modules(rlhf_fast.__path__) if m.name != "__main__"]  # (runs the CLI)
    shadowed = [n for n in names if not isinstance(getattr(rlhf_fast, n, None) or importlib.import_module(f"rlhf_fast.{n}"),
                                                   types.ModuleType)]  # fmt: skip
    assert not shadowed, f"rlhf_fast.<name> is not the module for: {shadowed}"
