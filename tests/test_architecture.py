"""The package's shape: imports point one way, the light entry points stay light, files stay
readable. These guard the layout described in docs/architecture.md."""

from __future__ import annotations

import ast
import re
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


# ----------------------------------------------------------------------------- the doc's house
DOC = PKG.parent / "docs" / "architecture.md"
MAX_FUNCTION_LINES = 80


def _code_blocks(text: str) -> list[str]:
    return text.split("```")[1::2]


def doc_layers() -> list[tuple[str, list[str]]]:
    """The "Layers" block of docs/architecture.md, top first: (layer, modules or packages)."""
    section = DOC.read_text().split("## Layers", 1)[1]
    block = _code_blocks(section)[0]
    layers: list[tuple[str, list[str]]] = []
    for line in block.strip().splitlines():
        if line.startswith(" ") and layers:  # a continuation line
            layers[-1][1].extend(m.strip() for m in line.split(",") if m.strip())
            continue
        name, _, rest = line.partition(" ")
        layers.append((name, [m.strip() for m in rest.split(",") if m.strip()]))
    return layers


def _layer_of(module: str, layers: list[tuple[str, list[str]]]) -> int | None:
    """Index (0 = top) of the most specific entry naming `module` or a package above it."""
    best: tuple[int, int] | None = None
    for i, (_, entries) in enumerate(layers):
        for entry in entries:
            full = "qorpo" if entry == "qorpo" else f"qorpo.{entry}"
            if module == full or module.startswith(full + "."):
                if best is None or len(full) > best[1]:
                    best = (i, len(full))
    return None if best is None else best[0]


def test_imports_only_point_down_the_documented_layers() -> None:
    layers = doc_layers()
    graph = import_graph()
    unplaced = sorted(m for m in graph if _layer_of(m, layers) is None)
    assert unplaced == [], f"modules in no layer of docs/architecture.md: {unplaced}"
    upward = [f"{a} ({layers[_layer_of(a, layers)][0]}) imports {d} "
              f"({layers[_layer_of(d, layers)][0]})"
              for a in sorted(graph) for d in sorted(graph[a])
              if _layer_of(d, layers) < _layer_of(a, layers)]
    assert upward == []


def _map_entries() -> dict[str, str]:
    """The module map (the doc's first code block): top-level entry -> its text."""
    entries: dict[str, str] = {}
    current = None
    for line in _code_blocks(DOC.read_text())[0].splitlines()[1:]:  # after "qorpo/"
        head = line[2:].split(" ", 1)[0] if line.startswith("  ") and line[2] != " " else None
        if head:
            current = head
            entries[current] = line[2 + len(head):]
        elif current:
            entries[current] += " " + line.strip()
    return entries


def test_the_module_map_names_every_module_and_only_real_ones() -> None:
    entries = _map_entries()
    real = {p.name for p in PKG.glob("*.py")} | {p.name + "/" for p in PKG.iterdir()
                                                 if p.is_dir() and (p / "__init__.py").exists()}
    assert set(entries) == real, (sorted(set(entries) - real), sorted(real - set(entries)))
    words = {name: set(re.findall(r"[A-Za-z_]+", text)) for name, text in entries.items()}
    missing = [f"{pkg}{p.stem}" for pkg in entries if pkg.endswith("/")
               for p in (PKG / pkg).glob("*.py")
               if p.stem != "__init__" and p.stem not in words[pkg]]
    assert missing == [], f"modules the map of docs/architecture.md does not name: {missing}"


def test_steps_tables_name_real_functions() -> None:
    """Every `module.function` in the doc's step tables exists (a renamed function fails)."""
    import importlib

    text = DOC.read_text().split("## One `qorpo train` call", 1)[1].split("## Rules", 1)[0]
    tops = {p.stem for p in PKG.glob("*.py")} | {p.name for p in PKG.iterdir() if p.is_dir()}
    wrong = []
    for ref in sorted(set(re.findall(r"`([a-z_]+(?:\.[A-Za-z_]+)+)`", text))):
        parts = ref.split(".")
        if parts[0] not in tops:  # a file name such as qorpo_run.json
            continue
        for cut in range(len(parts), 0, -1):  # the longest importable module prefix
            try:
                obj = importlib.import_module("qorpo." + ".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr, None)
            if obj is None:
                wrong.append(ref)
            break
        else:
            wrong.append(ref)
    assert wrong == []


def test_no_function_is_longer_than_80_lines() -> None:
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PKG.parent)}:{node.name} ({lines} lines)")
    assert long == []
