"""The import graph: imports go one way, down the floors below, with no circle and no project module
imported inside a function (which is how a circle hides). Each module's floor is declared here; a new
module must be given one."""
import ast
import re

import pytest
from conftest import ROOT

import flags

# A module may import modules on its own floor or below, never above.
FLOORS = [
    ("runners and tools", {"run_tofu", "run_hp", "run_harmful", "bench.speed", "bench.__main__", "bench.gpu_check",
                           "bench.evaluation",
                           "examples.hf_trainer_flat"}),
    ("run machinery", {"stages", "flags", "estimate", "attacks", "judges", "alignment", "zeroshot", "tables", "tasks",
                       "books", "plots"}),
    ("the method", {"train", "evaluate", "protocol", "bench.memplan", "bench.measure", "bench"}),
    ("data and models", {"data", "corpora", "models", "adapters", "mia", "distributed"}),
    ("the method table", {"methods"}),
    ("losses and errors", {"flat", "errors"}),
]
FLOOR = {m: len(FLOORS) - i for i, (_, mods) in enumerate(FLOORS) for m in mods}
SKIP = {"tests", "vendored", ".venv", "runs", "docs", ".git"}


def module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """(module -> project modules it imports at module level, [(module, imported, line) inside a function])."""
    files = {module_name(p): p for p in ROOT.rglob("*.py") if not (set(p.relative_to(ROOT).parts) & SKIP)}
    graph, lazy = {}, []
    for mod, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for name in (n for n in names if n in files and n != mod):
                (lazy.append((mod, name, node.lineno)) if node.col_offset else deps.add(name))
        graph[mod] = deps
    return graph, lazy


def test_no_project_module_is_imported_inside_a_function():
    _, lazy = import_graph()
    assert lazy == [], "import these at the top (a lazy import of a project module hides a circle): " + str(lazy)


def test_every_module_has_a_floor_and_imports_only_down():
    graph, _ = import_graph()
    assert sorted(set(graph) - set(FLOOR)) == [], "give each new module a floor in FLOORS"
    up = [(m, d) for m, deps in graph.items() for d in deps if FLOOR[d] > FLOOR[m]]
    assert up == [], f"imports that go up a floor: {up}"


def test_the_import_graph_has_no_circle():
    graph, _ = import_graph()
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError("circle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) != "done":
            state[m] = "open"
            for d in sorted(graph[m]):
                visit(d, path + [m])
            state[m] = "done"
    for m in sorted(graph):
        visit(m, [])


def test_the_checks_catch_a_circle_and_a_lazy_import(tmp_path, monkeypatch):
    """The tests above can fail: a two-module circle and an import inside a function are found."""
    for name, text in {"a.py": "import b\n", "b.py": "def f():\n    import a\n", "c.py": "import a\nimport d\n",
                       "d.py": "import c\n"}.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    graph, lazy = import_graph()
    assert lazy == [("b", "a", 2)] and graph["c"] == {"a", "d"} and graph["d"] == {"c"}
    monkeypatch.setattr(__import__(__name__), "import_graph", lambda: (graph, lazy))
    with pytest.raises(AssertionError, match="circle: c -> d -> c"):
        test_the_import_graph_has_no_circle()


def test_flat_py_imports_torch_and_the_standard_library_only():
    """flat.py is the file people copy: nothing of the project, no flags, ranges or stage keys."""
    tree = ast.parse((ROOT / "flat.py").read_text())
    top = {(a.name if isinstance(n, ast.Import) else n.module).split(".")[0]
           for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert top <= {"__future__", "typing", "torch", "math", "dataclasses"}, top
    text = (ROOT / "flat.py").read_text()
    for word in ("help=", "stage key", "LossParams", "Choices", "only="):
        assert word not in text, word
    assert not re.search(r"--[a-z]+(-[a-z]+)+", text), re.search(r"--[a-z]+(-[a-z]+)+", text)  # a flag such as --npo-retain


def test_a_flag_declared_for_a_stage_that_does_not_exist_fails_at_once():
    """A typo in only= would drop the flag from its stage's key: a stale cache, reused silently."""
    with pytest.raises(ValueError, match=r"only=\('unlean',\) names no stage \['unlean'\]; stages: finetune, unlearn"):
        flags.arg(1e-4, "unlearning learning rate", only=("unlean",))
    assert flags.arg(1e-4, "x", only=("unlearn", "eval")).metadata["only"] == ("unlearn", "eval")
