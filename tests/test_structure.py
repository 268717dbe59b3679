"""The layout promises of docs/design-notes.md ("a newcomer test"): every CLI verb is implemented in a module
named after it, the package's modules import each other without a cycle, and ``import kernelatlas`` stays light
(no torch, no matplotlib: a user who only calls the engine never pays for them)."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from kernelatlas import cli

PACKAGE = Path(cli.__file__).resolve().parent
HEAVY = ("torch", "matplotlib", "pandas", "pyarrow", "h5py", "onnx", "tflite", "tqdm", "scipy", "dask", "distributed")


def verb_module(verb: str) -> str:
    return "filterdb" if verb in ("import-filterdb", "export-filterdb") else verb.replace("-", "_")


def test_every_verb_is_implemented_in_a_module_named_after_it():
    verbs = set(cli.build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert {"extract", "train", "clusters", "assign", "quality", "shift", "report", "run"} <= verbs
    expected = {verb_module(v) for v in verbs}
    missing = sorted(m for m in expected if importlib.util.find_spec(f"kernelatlas.jobs.{m}") is None)
    assert not missing, f"verbs without a jobs/ module named after them: {missing}"
    jobs = {p.stem for p in (PACKAGE / "jobs").glob("*.py") if p.stem != "__init__"}
    jobs |= {p.parent.name for p in (PACKAGE / "jobs").glob("*/__init__.py")}  # a verb grown into a package
    assert jobs == expected, f"jobs/ modules that are no verb: {sorted(jobs - expected)}"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The kernelatlas modules a module imports when it is imported: top-level statements only (imports inside
    functions run later, under `if TYPE_CHECKING:` never)."""
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module in modules:
                    out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)

    visit(ast.parse(path.read_text()).body)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files) | {"kernelatlas._core"}
    graph = {name: module_level_imports(path, modules) for name, path in files.items()}
    # a submodule's import of its own parent package is Python's business (the package is mid-import), not a cycle
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    assert sum(len(d) for d in graph.values()) > 20, "the import graph came out empty: the parser is broken"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the checker itself


def test_import_kernelatlas_loads_no_heavy_library():
    code = ("import json, sys, kernelatlas; kernelatlas.normalize, kernelatlas.build_info(); "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert "kernelatlas" in loaded and "numpy" in loaded
    assert not loaded & set(HEAVY), f"`import kernelatlas` (and the engine) loaded {sorted(loaded & set(HEAVY))}"


def test_one_version_everywhere():
    """_version.py is the one place the version is written: the engine (built from pyproject's dynamic version,
    which reads it) and the installed metadata agree with it."""
    from importlib.metadata import version

    import kernelatlas

    assert kernelatlas.build_info()["version"] == kernelatlas.__version__ == version("kernelatlas")
