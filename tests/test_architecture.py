"""The package's layers (pyproject.toml's import-linter contract) hold, and the check has teeth.

``lint-imports`` runs in a subprocess, on the ``oltr`` these tests import: its graph is built
from the files, so an upward import fails it even inside a function. The control copies the
package to a temporary folder, plants one import that breaks the contract, and expects the same
check to fail there, naming that import.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import oltr

SRC = Path(oltr.__file__).resolve().parent.parent
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

pytest.importorskip("importlinter")


def lint_imports(src: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with the contracts of ``cwd/pyproject.toml`` over the oltr in ``src``."""
    path = os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    code = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_layers_contract_is_kept(tmp_path):
    shutil.copy(PYPROJECT, tmp_path / "pyproject.toml")
    result = lint_imports(SRC, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Layers only point down KEPT" in result.stdout
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "planted", "expected"), [
    # a lazy (function-level) upward import: the workaround the contract replaces
    ("runtime.py", "\n\ndef _planted() -> None:\n    from oltr.train import loop  # noqa: F401\n",
     "oltr.runtime is not allowed to import oltr.train"),
    # a top-level import between independent siblings
    ("models/__init__.py", "\nimport oltr.data  # noqa: E402,F401\n",
     "oltr.models is not allowed to import oltr.data"),
    # a new module that no layer names (the contract is exhaustive)
    ("helpers.py", '"""Not in any layer."""\n', "- oltr.helpers"),
])
def test_a_planted_violation_breaks_the_contract(tmp_path, module, planted, expected):
    src = tmp_path / "src"
    shutil.copytree(SRC / "oltr", src / "oltr", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PYPROJECT, tmp_path / "pyproject.toml")
    with (src / "oltr" / module).open("a", encoding="utf-8") as file:
        file.write(planted)
    result = lint_imports(src, tmp_path)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr, result.stdout + result.stderr
