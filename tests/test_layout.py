"""The package layout's rules, checked on the source: imports run one way and form no cycle.

DESIGN.md: `dags/` -> `tasks/` -> `costopt/`, and `serving/` -> `costopt/`; nothing in `costopt/`
imports Airflow, KServe, `tasks/` or `serving/`; `tasks/` and `serving/` never import each other.
Every import counts, the ones inside functions too (a late import is still a dependency), so a cycle
cannot hide behind one.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("costopt", "tasks", "serving", "dags")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            found[_module_name(path)] = path
    return found


def _imports(path: Path, name: str) -> set[str]:
    """Every module `path` imports, absolute, resolved against the project's own modules."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for imp in _imports(path, name):
            # `import costopt.a.b` depends on costopt.a.b (and its packages, which hold only docstrings)
            if imp in mods and imp != name:
                deps.add(imp)
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


def test_cycle_detector_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"], "a 3-cycle must be found"
    assert _cycle({"a": {"b"}, "b": set()}) is None, "a chain is not a cycle"


def test_imports_run_one_way():
    mods = _modules()
    forbidden = {
        "costopt": ("tasks", "serving", "dags", "airflow", "kserve"),
        "tasks": ("serving", "dags", "kserve"),
        "serving": ("tasks", "dags", "airflow"),
    }
    bad = []
    for name, path in mods.items():
        top = name.split(".")[0]
        for imp in _imports(path, name):
            if imp.split(".")[0] in forbidden.get(top, ()):
                bad.append(f"{name} imports {imp}")
    assert not bad, "imports against the layout rules:\n" + "\n".join(sorted(bad))


def test_costopt_has_no_flat_module_sprawl():
    flat = sorted(p.name for p in (ROOT / "costopt").glob("*.py") if p.name != "__init__.py")
    assert len(flat) <= 4, f"costopt/ top-level modules {flat}: put new code in a subpackage that names its part"
