"""The package layering (pyproject.toml, [tool.importlinter]) holds, and its check catches a
wrong-way import, also one inside a function.

The rules: router, drafters and classifiers never import benchmarks; drafters and
classifiers never import router, nor each other. ``make lint`` runs the same check.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("router", "classifiers", "drafters", "benchmarks")
RUNTIME_WITHOUT_BENCHMARKS = "router, drafters and classifiers never import benchmarks"
NOT_ROUTER = "drafters and classifiers never import router"
INDEPENDENT = "drafters and classifiers never import each other"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter with ``root``'s pyproject.toml on the packages under ``root``."""
    command = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache", "--no-logo"]
    return subprocess.run(
        command,
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_packages(destination: Path) -> None:
    """The packages' Python files and the contracts, nothing else (no models, no data)."""
    shutil.copy(REPO / "pyproject.toml", destination / "pyproject.toml")
    for package in PACKAGES:
        for source in (REPO / package).rglob("*.py"):
            target = destination / source.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)


def test_the_repository_keeps_every_contract() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    for contract in (RUNTIME_WITHOUT_BENCHMARKS, NOT_ROUTER, INDEPENDENT):
        assert f"{contract} KEPT" in result.stdout


# (module to plant in, import line planted inside a function, the contract it breaks)
VIOLATIONS = [
    ("drafters/ngram.py", "import benchmarks.world.corpus", RUNTIME_WITHOUT_BENCHMARKS),
    ("router/bundle.py", "from benchmarks.world import layout", RUNTIME_WITHOUT_BENCHMARKS),
    ("classifiers/text.py", "from router import bundle", NOT_ROUTER),
    ("drafters/stats.py", "import classifiers.text", INDEPENDENT),
]


@pytest.mark.parametrize(("module", "line", "contract"), VIOLATIONS)
def test_a_planted_wrong_way_import_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    copy_packages(tmp_path)
    assert lint_imports(tmp_path).returncode == 0, "the copy keeps the contracts before planting"
    planted = tmp_path / module
    planted.write_text(planted.read_text() + f"\n\ndef _planted() -> None:\n    {line}  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert f"{contract} BROKEN" in result.stdout, result.stdout
