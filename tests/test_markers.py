"""The e2e marker (tests/conftest.py) selects the world-building tests and only those."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = (
    "tests/router/test_grpc_api.py",  # a sidecar on the tiny world, through fixtures
    "tests/benchmarks/world/test_world.py",  # builds worlds itself
    "tests/drafters/test_verify.py",  # unit tests
)


def selected(marker_expression: str) -> set[str]:
    """The modules of the tests ``-m marker_expression`` selects among MODULES."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", marker_expression, *MODULES],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return {line.split("::")[0] for line in done.stdout.splitlines() if "::" in line}


def test_e2e_selects_the_world_tests_and_no_unit_test() -> None:
    assert selected("e2e") == set(MODULES[:2])
