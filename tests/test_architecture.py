"""The package's shape: imports point one way, the light entry points stay light, files stay
readable. These guard the layout described in docs/architecture.md."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "qorpo"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """qorpo module -> the qorpo modules it imports, anywhere in the file (function-level and
    TYPE_CHECKING imports included: a cycle hidden in a function is still a cycle)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def test_no_import_cycles() -> None:
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_nothing_imports_the_package_root() -> None:
    offenders = [name for name, deps in import_graph().items() if "qorpo" in deps]
    assert offenders == []


def test_files_stay_readable() -> None:
    long = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _modules_after(code: str) -> set[str]:
    code += "\nimport sys\nprint(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PKG.parent)
    return set(out.stdout.split())


def test_config_and_package_import_no_torch() -> None:
    loaded = _modules_after("import qorpo, qorpo.config, qorpo.errors")
    assert "torch" not in loaded and "transformers" not in loaded


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["train", "--help"],
                                  ["merge", "--help"]])
def test_cli_help_and_version_import_no_torch(args: list[str]) -> None:
    code = ("from typer.testing import CliRunner\nfrom qorpo.cli import app\n"
            f"r = CliRunner().invoke(app, {args!r})\nassert r.exit_code == 0, r.output\n"
            "assert 'qorpo' in r.output or 'Usage' in r.output")
    loaded = _modules_after(code)
    assert "torch" not in loaded


def test_version_is_written_once() -> None:
    from importlib.metadata import version

    from qorpo._version import __version__

    assert version("qorpo") == __version__
