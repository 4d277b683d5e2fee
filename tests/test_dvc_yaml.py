"""dvc.yaml declares what each stage really reads, so DVC re-runs it when that changes."""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def imported_modules(script: Path, found: set[str] | None = None) -> set[str]:
    """Return the ``stages/modisch/*.py`` files that ``script`` imports, directly or not."""
    found = set() if found is None else found
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module == "modisch":
            names = [f"modisch.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("modisch."):
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.startswith("modisch.")]
        for name in names:
            path = f"stages/{name.replace('.', '/')}.py"
            if path not in found and (ROOT / path).is_file():
                found.add(path)
                imported_modules(ROOT / path, found)
    return found


def stage_definition(name: str) -> dict:
    stage = PIPELINE[name]
    return stage["do"] if "foreach" in stage else stage


@pytest.mark.parametrize("name", sorted(PIPELINE))
def test_stage_deps_list_script_and_modules(name):
    deps = set(stage_definition(name)["deps"])
    script = f"stages/{name}.py"

    assert script in deps
    missing = imported_modules(ROOT / script) - deps
    assert not missing, f"dvc.yaml stage {name} lacks deps {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(PIPELINE))
def test_stage_command_runs_its_script(name):
    assert f"python stages/{name}.py" in stage_definition(name)["cmd"]
