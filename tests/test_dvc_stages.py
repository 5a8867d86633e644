"""dvc.yaml says what each stage really depends on: every module a stage's command imports (directly or
through other project modules, at module level or inside functions) is one of its deps, or lies under a
folder that is; every stage records its settings from the run's frozen copy (artifacts/run/params.yaml)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
OURS = ("costopt", "tasks", "serving")
STAGES = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
FROZEN = "artifacts/run/params.yaml"


def module_file(name: str) -> Path | None:
    base = PROJECT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path) -> set[str]:
    """Project modules `path` imports anywhere in its body (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PROJECT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base]) if base else ".".join(parent)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from costopt.x import module`
    return {n for n in found if n.split(".")[0] in OURS and module_file(n) is not None}


def closure(module: str) -> set[Path]:
    """Files of `module` and of everything it imports, transitively, with the packages on the way."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            f = module_file(".".join(parts[:i]))
            if f is not None and f not in seen:
                seen.add(f)
                todo.extend(imports_of(f))
    return {p for p in seen if p.name != "__init__.py" or p.stat().st_size > 0}


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(PROJECT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def _deps(stage: dict) -> list[str]:
    return [d for d in stage.get("deps") or []]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_imported_module_is_a_dep_of_its_stage(name):
    stage = STAGES[name]
    m = re.match(r"python -m ([\w.]+)", stage["cmd"])
    assert m, f"stage {name}: expected `python -m tasks.<phase>`, got {stage['cmd']!r}"
    missing = sorted(p.relative_to(PROJECT).as_posix() for p in closure(m.group(1)) if not covered(p, _deps(stage)))
    assert not missing, f"dvc.yaml stage {name!r} imports these but does not list them as deps: {missing}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_records_the_runs_frozen_settings(name):
    stage = STAGES[name]
    if name == "settings":
        assert stage["outs"] == [FROZEN] and "params.yaml" in stage["deps"], stage
        return
    assert "--settings " + FROZEN in stage["cmd"], f"stage {name}: the phase must read the frozen settings"
    params = stage.get("params") or []
    assert params and all(isinstance(p, dict) and list(p) == [FROZEN] for p in params), \
        f"stage {name}: its params must come from {FROZEN}, got {params}"
