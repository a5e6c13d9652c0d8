"""The import graph of mcpo_jax: no cycle, and no import that runs up a floor (the layering of the README's layout).

Every import counts, the ones inside functions too (a lazy import is still a dependency). Floors, bottom up; a
module may import its own floor and the floors below. The table is the truth: a new module must be placed in it.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

FLOORS = (  # (floor name, module prefixes); a module belongs to the floor of its longest matching prefix
    ("math and sharding", ("mcpo_jax", "mcpo_jax.losses", "mcpo_jax.kernel", "mcpo_jax.logprobs",
                           "mcpo_jax.sharding")),
    ("models and data", ("mcpo_jax.models", "mcpo_jax.data")),
    ("generation and evaluation", ("mcpo_jax.online", "mcpo_jax.online.generate", "mcpo_jax.judges",
                                   "mcpo_jax.evaluate")),
    ("training", ("mcpo_jax.training",)),
    ("online segments", ("mcpo_jax.online.onmcpo",)),
    ("pipeline", ("mcpo_jax.pipeline", "mcpo_jax.compile_only")),
    ("faces", ("mcpo_jax.train", "mcpo_jax.bench", "mcpo_jax.experiments")),
)


def module_files(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted((root / "mcpo_jax").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def floor_of(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    if level is None:
        raise KeyError(module)
    return level


def imports_of(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Modules of mcpo_jax that ``module`` imports (``from pkg import name`` is the submodule pkg.name if it is
    one, else pkg; relative imports resolved; ``importlib.import_module("...")`` literals included)."""
    is_pkg = path.name == "__init__.py"
    here = module if is_pkg else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        else:
            continue
        own_packages = {".".join(module.split(".")[:k]) for k in range(1, module.count(".") + 1)}
        for name in names:
            # importing a.b.c runs a, a.b and a.b.c; the packages of `module` itself are already running
            parts = name.split(".")
            for k in range(1, len(parts) + 1):
                prefix = ".".join(parts[:k])
                if prefix in known and prefix != module and prefix not in own_packages:
                    found.add(prefix)
    return found


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    known = set(files)
    return {m: imports_of(m, p, known) for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, deps in sorted(graph.items()):
        for d in sorted(deps):
            if floor_of(d) > floor_of(m):
                bad.append(f"{m} ({FLOORS[floor_of(m)][0]}) imports {d} ({FLOORS[floor_of(d)][0]})")
    return bad


def test_every_module_has_a_floor():
    unplaced = [m for m in module_files() if not any(
        m == p or m.startswith(p + ".") for _, prefixes in FLOORS for p in prefixes)]
    assert not unplaced, f"place these modules in FLOORS: {unplaced}"


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_upward_import():
    bad = upward_imports(import_graph())
    assert not bad, "imports that run up a floor:\n" + "\n".join(bad)


def test_the_checker_sees_cycles_and_upward_imports(tmp_path):
    """The checker itself: lazy, relative and `from pkg import module` imports are edges."""
    pkg = tmp_path / "mcpo_jax"
    (pkg / "online").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "online" / "__init__.py").write_text("")
    (pkg / "evaluate.py").write_text("def f():\n    from .online import judges\n")
    (pkg / "online" / "judges.py").write_text("from mcpo_jax.evaluate import left_pad\n")
    (pkg / "losses.py").write_text("import importlib\nimportlib.import_module('mcpo_jax.training.loop')\n")
    (pkg / "training").mkdir()
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "training" / "loop.py").write_text("")
    graph = import_graph(tmp_path)
    assert graph["mcpo_jax.evaluate"] == {"mcpo_jax.online", "mcpo_jax.online.judges"}
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"mcpo_jax.evaluate", "mcpo_jax.online.judges"}
    bad = upward_imports(graph)
    assert any(b.startswith("mcpo_jax.losses (math and sharding) imports mcpo_jax.training.loop") for b in bad)


@pytest.mark.parametrize("module", ["mcpo_jax.judges", "mcpo_jax.evaluate", "mcpo_jax.data.text"])
def test_evaluation_floor_imports_nothing_of_training_or_online_segments(module):
    deps = import_graph()[module]
    assert not [d for d in deps if d.startswith(("mcpo_jax.training", "mcpo_jax.online.onmcpo"))], deps
