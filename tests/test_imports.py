"""The gate orchestrates and judges; the job computes. Importing the gate's modules must not
import torch or transformers, so `--help` and `--list-models` start fast and the contract can be
read anywhere."""

import ast
import subprocess
import sys

from harness.runtime.paths import REPO_ROOT

# The gate's packages, whole, and the backends' gate-side halves (probe, commands, collect).
GATE_PACKAGES = ("contract", "gate", "runtime")
GATE_MODULES = tuple(
    sorted(
        f"harness.{package}.{path.stem}"
        for package in GATE_PACKAGES
        for path in (REPO_ROOT / "harness" / package).glob("*.py")
        if path.stem != "__init__"
    )
) + (
    "harness.backends",
    "harness.backends.native",
    "harness.backends.trl",
    "harness.backends.instructlab",
    "harness.backends.checkpoint_eval",
)


def test_the_gate_modules_import_neither_torch_nor_transformers():
    code = (
        "import sys; import "
        + ", ".join(GATE_MODULES)
        + "; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_list_models_and_help_do_not_load_torch():
    code = (
        "import sys; from harness.gate import cli; cli.main(['--list-models']); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False False"


def harness_imports() -> dict[str, set[str]]:
    """Every import of a harness module by another, at any depth of the file (inside functions too)."""
    modules = {}
    for path in (REPO_ROOT / "harness").rglob("*.py"):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    graph[name].add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
        graph[name].discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target] if target in path else [node, target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_module_imports_itself_through_others():
    graph = harness_imports()
    assert len(graph) > 40 and graph["harness.gate.cli"], "the import graph was not read"
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
