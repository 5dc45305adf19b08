"""The package's shape: imports run one way (no circles, no library module importing a command
line), and every documented ``python -m`` command starts."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "fogjax"
# Command-line modules: they may import anything; nothing may import them.
CLI_MODULES = {"fogjax.info", "fogjax.generate"}
COMMANDS = [
    "fogjax.train",
    "fogjax.evaluate",
    "fogjax.generate",
    "fogjax.study",
    "fogjax.bench",
    "fogjax.info",
    "fogjax.data.prepare",
    "fogjax.export",
]


def module_names() -> dict[str, object]:
    """{'fogjax.train.loop': path, 'fogjax.optim': .../optim/__init__.py, ...}"""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the fogjax modules it imports, at module level or inside functions.

    ``from fogjax.a import b`` is an edge to the module ``fogjax.a.b`` when that is a module, else
    to ``fogjax.a`` (a package's ``__init__`` or a module). Relative imports are resolved too.
    """
    modules = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "fogjax"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] != "fogjax":
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    deps.add(sub if sub in modules else base)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        if state.get(node) == "open":
            return trail[trail.index(node) :] + [node]
        if state.get(node) == "done":
            return None
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            found = visit(dep, trail + [node])
            if found:
                return found
        state[node] = "done"
        return None

    for module in sorted(graph):
        found = visit(module, [])
        if found:
            return found
    return None


def is_cli(module: str) -> bool:
    return module.endswith(".__main__") or module in CLI_MODULES


def test_the_graph_sees_the_imports_it_must():
    graph = import_graph()
    assert "fogjax.train.run" in graph["fogjax.train.loop"]
    assert "fogjax.optim.adam_lowp" in graph["fogjax.optim.adamw"]  # from fogjax.optim import x
    assert "fogjax.evaluate.harness" in graph["fogjax.evaluate.__main__"]  # inside a function
    assert "fogjax.precision.fp8_recipes" in graph["fogjax.precision.registry"]


def test_find_circle_finds_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_fogjax_imports_form_no_circle():
    assert find_circle(import_graph()) is None


def test_no_library_module_imports_a_command_line():
    graph = import_graph()
    wrong = sorted(
        f"{module} -> {dep}"
        for module, deps in graph.items()
        if not is_cli(module)
        for dep in deps
        if is_cli(dep)
    )
    assert not wrong, wrong


@pytest.mark.parametrize("command", COMMANDS)
def test_every_documented_command_starts(command):
    """``python -m <command> --help`` exits 0 and prints its usage, with no traceback and no
    warning (e.g. runpy's 'found in sys.modules' for a module its package imports)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.run(
        [sys.executable, "-m", command, "--help"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert command.split(".")[-1] in out.stdout + out.stderr
    assert "Traceback" not in out.stderr and "Warning" not in out.stderr, out.stderr[-2000:]


def test_readme_documents_every_command():
    readme = (REPO_ROOT / "README.md").read_text()
    for command in COMMANDS:
        assert f"python -m {command}" in readme, command
