"""The package layout is the architecture: no import cycles, and the stage stays free of TensorFlow and learning.

Imports are read from the source (inside functions too), so a lazy import cannot hide
a cycle; the stage packages are also imported in a fresh interpreter to check what
actually gets loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "server"
STAGE = ("server.live", "server.osc", "server.midi")
HEAVY = ("tensorflow", "keras", "tensorflow_probability", "tf_keras")
NOT_ON_STAGE = ("server.learn", "server.model.network", "server.model.export") + HEAVY


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every module `path` imports, anywhere in the file; `from pkg import sub` counts as pkg.sub."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in known)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    out = {}
    for name, path in mods.items():
        # importing a package's submodule runs the package's __init__, which is no edge of ours
        out[name] = {m for m in imports_of(path, known) if m in known and m != name and not name.startswith(m + ".")}
    return out


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_counting_imports_inside_functions():
    assert find_cycle(graph()) is None


def test_stage_packages_import_nothing_from_learning_or_tensorflow():
    mods = modules()
    known = set(mods)
    offenders = []
    for name, path in mods.items():
        if name.startswith(STAGE):
            for imported in imports_of(path, known):
                if imported.startswith(NOT_ON_STAGE):
                    offenders.append(f"{name} imports {imported}")
    assert offenders == []


def test_importing_the_stage_loads_no_tensorflow():
    stage = sorted(m for m in modules() if m.startswith(STAGE)) + ["server.app", "server.config"]
    code = (
        "import importlib, sys\n"
        f"for m in {stage!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m.startswith('server.learn'))\n"
        "print(' '.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""


def test_the_top_of_the_package_is_small():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
    for sub in ("model", "learn", "live", "osc", "midi", "tools"):
        assert (PACKAGE / sub / "__init__.py").is_file(), sub


MAX_CLASS_LINES = 300  # a class a newcomer can read in one sitting


def long_classes(source: str, limit: int = MAX_CLASS_LINES) -> list[str]:
    """The classes in ``source`` longer than ``limit`` lines, with their length."""
    return [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"  # type: ignore[operator]
            for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ClassDef)
            and node.end_lineno - node.lineno + 1 > limit]  # type: ignore[operator]


def engine_assignments(source: str) -> list[int]:
    """Lines that assign to an attribute of something named `engine` (`engine.x = ...`, `engine.a.b += ...`)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for part in (target.elts if isinstance(target, ast.Tuple) else [target]):
                base = part
                while isinstance(base, (ast.Attribute, ast.Subscript)):
                    base = base.value
                if part is not base and isinstance(base, ast.Name) and base.id == "engine":
                    lines.append(node.lineno)
    return lines


def test_the_checks_find_what_they_look_for():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_CLASS_LINES))
    assert long_classes(f"class Big:\n{body}\n") == [f"Big ({MAX_CLASS_LINES + 1} lines)"]
    assert long_classes("class Small:\n    x = 1\n") == []
    assert engine_assignments("engine.sinks = []\nengine.watch.rate += 1\nx = engine.counts\n"
                              "engine.counts['x'] = 1\na, engine.b = 1, 2\n") == [1, 2, 4, 5]


def test_no_class_in_the_server_is_over_300_lines():
    offenders = {str(p.relative_to(REPO)): found for p in PACKAGE.rglob("*.py")
                 if (found := long_classes(p.read_text(encoding="utf-8")))}
    assert offenders == {}


def test_nothing_outside_live_assigns_to_an_engine():
    """The engine is built with its outputs, streams, status sources and learner: nobody wires it afterwards."""
    files = [p for p in (*PACKAGE.rglob("*.py"), *(REPO / "tests").glob("*.py"))
             if (PACKAGE / "live") not in p.parents]
    offenders = {str(p.relative_to(REPO)): lines for p in files
                 if (lines := engine_assignments(p.read_text(encoding="utf-8")))}
    assert offenders == {}
