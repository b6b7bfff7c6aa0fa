"""The house rules: import layers (import-linter contracts in pyproject.toml) and size limits."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("orchestrator", "trainables", "search_spaces")
NOT_ALGORITHMS = {"__init__.py", "api.py", "loop.py", "registry.py", "spec.py"}
MAX_FUNCTION_LINES = 60
MAX_ALGORITHM_LINES = 350


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the tree at ``root`` (its packages first on the path, no cache)."""
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", script, "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_contracts_are_kept():
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    "module, back_edge, contract",
    [
        ("trainables/api.py", "import orchestrator.config", "the learning side never imports the driver"),
        ("trainables/cc.py", "import mlflow", "never import ray, mlflow or optuna"),
        ("trainables/data/annotation.py", "import trainables.api", "loop -> registry -> spec -> api -> settings -> data"),
        ("trainables/params/coreg.py", "import torch", "the methods' declarations import no torch"),
    ],
)
def test_a_back_edge_breaks_a_contract(tmp_path, module, back_edge, contract):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{back_edge}  # a back edge\n")
    done = _lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout + done.stderr
    _, _, broken = done.stdout.partition("Broken contracts")
    assert contract in " ".join(broken.split()), done.stdout  # the contract the edge crosses is named


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_no_function_above_60_lines_outside_tests():
    sources = [p for d in (*PACKAGES, "scripts", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(sources) > 40
    too_long = [line for path in sources for line in _long_functions(path)]
    assert not too_long, "\n".join(too_long)


def test_no_algorithm_file_above_350_lines():
    algorithms = [p for p in sorted((ROOT / "trainables").glob("*.py")) if p.name not in NOT_ALGORITHMS]
    assert len(algorithms) >= 10
    too_long = [f"{p.name}: {n}" for p in algorithms if (n := len(p.read_text().splitlines())) > MAX_ALGORITHM_LINES]
    assert not too_long, too_long
