"""The package's shape: every module imports, no dependency cycles between modules, argument parsing only in the
command modules (ditscale.cli, the demo), and no library module imports a command module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "ditscale"
COMMAND_MODULES = ("ditscale.cli", "ditscale.demo", "ditscale.__main__")


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def is_command(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in COMMAND_MODULES)


def _import_nodes(tree: ast.AST):
    """Import statements anywhere in the code (module level and inside functions), except under TYPE_CHECKING."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def package_imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package modules that module `name` imports."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in _import_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def top_level_imports(path: Path) -> set[str]:
    out = set()
    for node in _import_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_every_module_imports():
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    names = [n for n in modules() if n != "ditscale.__main__"]
    p = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]


def test_no_dependency_cycles():
    mods = modules()
    graph = {n: package_imports(n, p, mods) for n, p in mods.items()}
    cycles, state, stack = [], {}, []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycle = stack[stack.index(v) :] + [v]
                if not all(x.startswith(cycle[0] + ".") or x == cycle[0] for x in cycle):
                    cycles.append(" -> ".join(cycle))  # (a package re-exporting its own modules is not a cycle)
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "\n".join(cycles)


def test_argument_parsing_only_in_command_modules():
    offenders = [n for n, p in modules().items() if not is_command(n) and "argparse" in top_level_imports(p)]
    assert not offenders, f"argparse outside the command modules: {offenders}"


def test_no_library_module_imports_a_command_module():
    mods = modules()
    found = {n: sorted(d for d in package_imports(n, p, mods) if is_command(d)) for n, p in mods.items()}
    offenders = {n: d for n, d in found.items() if d and not is_command(n)}
    assert not offenders, offenders


def test_one_port_picker_for_the_library_and_one_for_the_tests():
    """ditscale.distenv.free_port and tests/ports.py's, used by all: no module picks a free port its own way."""
    owners = {ROOT / "ditscale" / "distenv.py", ROOT / "tests" / "ports.py"}
    found = []
    for path in sorted([*PKG.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "launchers").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") == "free_port" and path not in owners:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not found, found
