"""The suite's own scheduling under pytest-xdist (tests/conftest.py): a file's tests run in
one worker, so its module fixtures are set up once."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tests.conftest import MEMORY_HEAVY_MODULES, MEMORY_HEAVY_UNIT, unit_of

TEST_FILE = """
import os
from pathlib import Path

import pytest

LOG = Path(os.environ["SCHEDULING_LOG"])


@pytest.fixture(scope="module")
def module_setup() -> None:
    with LOG.open("a") as log:
        log.write(f"setup {__name__} {os.environ['PYTEST_XDIST_WORKER']}\\n")


@pytest.mark.parametrize("i", range(8))
def test_one(module_setup: None, i: int) -> None:
    with LOG.open("a") as log:
        log.write(f"ran {__name__} {os.environ['PYTEST_XDIST_WORKER']}\\n")
"""


def test_a_files_tests_run_in_one_worker_and_set_up_once(tmp_path: Path) -> None:
    """xdist's --dist loadgroup named a test's group by renaming its node id, which
    pytest 9 ignores: each test was handed out on its own, and a module's fixtures (the
    fleet's four vLLM servers) were set up in both workers."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(
        "from tests.conftest import pytest_xdist_make_scheduler  # noqa: F401\n"
    )
    for name in ("test_a", "test_b", "test_c", "test_d"):
        (suite / f"{name}.py").write_text(TEST_FILE)
    log = tmp_path / "log"
    repository = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SCHEDULING_LOG": str(log), "PYTHONPATH": str(repository)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", str(suite)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    workers: dict[str, set[str]] = defaultdict(set)
    setups: dict[str, int] = defaultdict(int)
    for kind, module, worker in (line.split() for line in log.read_text().splitlines()):
        if kind == "setup":
            setups[module] += 1
        else:
            workers[module].add(worker)
    assert set(workers) == {"test_a", "test_b", "test_c", "test_d"}
    assert all(len(ran) == 1 for ran in workers.values()), dict(workers)
    assert all(count == 1 for count in setups.values()), dict(setups)


def test_the_memory_heavy_modules_are_one_unit() -> None:
    units = {unit_of(f"{module}::test_x[1]") for module in MEMORY_HEAVY_MODULES}
    assert units == {MEMORY_HEAVY_UNIT}
    without_xdist = subprocess.run(  # the hook is xdist's: optional without it
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "--co", "-q", __file__],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert without_xdist.returncode == 0, without_xdist.stdout + without_xdist.stderr
    assert unit_of("tests/router/test_grpc_api.py::test_x") == "tests/router/test_grpc_api.py"
