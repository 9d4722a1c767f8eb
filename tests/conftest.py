"""Shared fixtures: small, deterministic, built in seconds, reused for the session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Spinning OpenMP workers make torch 5-10x slower on shared cores; must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The suite's tiny models serve in fp32 ("auto" is bf16 on CPUs with bf16 instructions);
# tests of the dtype setting pass it explicitly.
os.environ.setdefault("SPECROUTE_DTYPE", "float32")

import time
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from router.bundle import ModelBundle


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], timeout: float = 5.0) -> bool:
    """Whether every one of ``pids`` is gone within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(process_alive(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


# End-to-end tests build a world or stand on one: every sidecar, served servicer and
# `specroute serve` process in these tests runs on the tiny world, so a test is end-to-end
# when it uses the world fixture (directly or through another) or lies in a module that
# builds worlds itself. They carry the `e2e` marker: `pytest -m "not e2e"` runs the unit
# tests alone, `make test` both.
END_TO_END_FIXTURES = frozenset({"tiny_world"})
END_TO_END_MODULES = frozenset({"tests/benchmarks/world/test_world.py"})
# The per-test timeout (pyproject) covers fixture setup, and the first end-to-end test of a
# session builds the tiny world there (with the sidecar fixtures, up to about 2 minutes
# measured on 2 busy cores): these tests get room for a build plus their own run, unless
# they set a timeout themselves.
END_TO_END_TIMEOUT_S = 300
# `make test` shares the test files among worker processes (pytest-xdist): each file is
# one unit of work, so its module fixtures are set up once, and the two modules that hold
# gigabytes (four vLLM servers; the 0.5B-shaped checkpoint, 2 GB in /dev/shm plus two
# loaded copies) are one unit, so they never run side by side. The units are this file's
# own scheduler (``pytest_xdist_make_scheduler``): xdist 3.8's ``--dist loadgroup`` marks
# a group by renaming the test's node id, which pytest 9 no longer reads, so every test was
# a unit of its own (the fleet's four servers started once per worker).
MEMORY_HEAVY_MODULES = frozenset(
    {"tests/router/test_fleet_vllm.py", "tests/router/test_qwen25_05b_shape.py"}
)
MEMORY_HEAVY_UNIT = "memory-heavy"


def _module(config: pytest.Config, item: pytest.Item) -> str:
    return item.path.relative_to(config.rootpath).as_posix()


def unit_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its file, or the memory-heavy unit."""
    module = nodeid.split("::", 1)[0]
    return MEMORY_HEAVY_UNIT if module in MEMORY_HEAVY_MODULES else module


@pytest.hookimpl(optionalhook=True)  # xdist's hook: unknown to pytest without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Whole units (``unit_of``) to each worker, in collection order; xdist's own for a
    ``--dist`` mode other than the load modes (``each``, ``worksteal``)."""
    from xdist.scheduler import LoadScopeScheduling

    if config.getoption("dist") not in ("load", "loadscope", "loadfile", "loadgroup"):
        return None

    class FileUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return FileUnits(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The memory-heavy unit first: it is the longest (about 2.5 minutes), and handed out
    # last it ran while the other worker had nothing left to do.
    items.sort(key=lambda item: _module(config, item) not in MEMORY_HEAVY_MODULES)
    for item in items:
        module = _module(config, item)
        uses_world = END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ()))
        if not uses_world and module not in END_TO_END_MODULES:
            continue
        item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(END_TO_END_TIMEOUT_S))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    """The built-in world at tiny scale (corpus, tokenizer, target, 8 drafters), built once
    for the whole run: under `make test` the first worker that needs it builds it while the
    others wait on a file lock, then they all read it (each worker built its own before,
    both at once, on the same two cores; so was the world's classifier, which
    ``ensure_world_classifier`` now trains once too)."""
    import fcntl

    from benchmarks.world.build import build_world

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with (shared / "tiny-world.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # A complete world there is opened as it is (``build_world``'s cache).
        return build_world(shared / "tiny-world", "tiny", progress=False)
