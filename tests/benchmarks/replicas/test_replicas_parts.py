"""The replicas benchmark's parts that need no sidecar: regret against the oracle, the
verdicts, and the redis-server harness (a real one: persistence across a restart)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.policy_sim.ground_truth import BUILTIN_ACCEPTANCE, ground_truth_from_matrix
from benchmarks.replicas.bench import FLEET, NEWCOMER, outcome_report, verdicts
from benchmarks.replicas.traffic import RegretTable
from router.bundle import ModelBundle
from tests.conftest import process_alive, wait_gone


def test_regret_is_zero_on_the_oracle_arm_and_positive_elsewhere() -> None:
    truth = ground_truth_from_matrix(BUILTIN_ACCEPTANCE, "built-in table")
    table = RegretTable(truth, list(truth.drafters))
    cell = table.cell("code", 10)
    drafter, k = truth.oracle_arms(list(truth.drafters))[cell]
    assert table.regret(cell, drafter, k, 100) == pytest.approx(0.0)
    best = float(table.best[cell])
    plain = table.regret(cell, "none", 0, 100)
    assert plain == pytest.approx(100 * truth.t_ar * (1.0 - 1.0 / best))
    assert table.regret(cell, "translation", 8, 100) > 0.0
    # Without the best drafter served, the oracle is the best of the others.
    others = [d for d in truth.drafters if d != drafter]
    assert RegretTable(truth, others).best[cell] < best
    assert np.all(table.best >= 1.0)


def test_verdicts_read_the_report() -> None:
    survivors = [FLEET[0], FLEET[1], NEWCOMER]
    published = {FLEET[0]: 10, FLEET[1]: 12, FLEET[2]: 5, NEWCOMER: 3}
    total = sum(published.values())
    counters = {
        name: {"published": published[name], "applied": total - published[name], "dropped": 0}
        for name in survivors
    }
    killed = {"published": 5, "applied": 20, "dropped": 0}
    report = {
        "shared": {"regret": 1.0, "per_replica_regret": {}},
        "isolated": {"regret": 3.0, "per_replica_regret": {}},
        "new_replica_first50_regret": {"warm": 0.2, "cold": 1.0},
        "outcomes": outcome_report(counters, killed),
        "errors": 0,
    }
    assert [met for _, met in verdicts(report)] == [True, True, True, True]
    report["outcomes"]["applied"][FLEET[0]] -= 1  # one outcome lost on one replica
    report["isolated"]["regret"] = 1.5
    assert [met for _, met in verdicts(report)] == [False, True, False, True]


def test_redis_harness_keeps_streams_across_a_restart_when_persistent(tmp_path: Path) -> None:
    from benchmarks.replicas.redis_server import RedisServer, redis_binary

    if redis_binary() is None:
        pytest.skip("redis-server is not installed (make install installs it as root)")
    import redis

    with RedisServer(tmp_path / "persistent", persist=True) as server:
        client = redis.Redis.from_url(server.url)
        client.xadd("s", {"a": "1"})
        client.close()
        port = server.port
        server.restart()
        assert server.port == port
        client = redis.Redis.from_url(server.url)
        assert client.xlen("s") == 1
        client.close()
    with RedisServer(tmp_path / "volatile") as server:
        client = redis.Redis.from_url(server.url)
        client.xadd("s", {"a": "1"})
        server.restart()
        assert client.xlen("s") == 0
        client.close()


LAUNCHER = """
import contextlib, sys, time
from pathlib import Path
from benchmarks.replicas.fleet import start_replicas
with contextlib.ExitStack() as stack:
    fleet = start_replicas({"a": 0, "b": 1}, Path(sys.argv[1]), Path(sys.argv[2]), None, stack)
    print(" ".join(str(r.launched.pid) for r in fleet.values()), flush=True)
    while True:  # busy in Python, as the bench is: the handler runs between bytecodes
        time.sleep(0.05)
"""


@pytest.mark.timeout(300)
def test_sigterm_to_the_bench_stops_its_sidecars(tiny_world: ModelBundle, tmp_path: Path) -> None:
    """The replicas are launched on worker threads, where ``launch_sidecar`` cannot install
    its SIGTERM handler: a bench sent SIGTERM (``kill``, a job scheduler) left them
    serving, and Redis with them."""
    import os
    import signal
    import subprocess
    import sys

    from classifiers import ensure_world_classifier

    ensure_world_classifier(tiny_world.root, tiny_world.corpus_dir)
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(tiny_world.root), str(tmp_path / "state")],
        stdout=subprocess.PIPE,
        text=True,
    )
    pids: list[int] = []
    try:
        assert launcher.stdout is not None
        pids = [int(pid) for pid in launcher.stdout.readline().split()]
        assert len(pids) == 2
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=120) != 0
        assert wait_gone(pids, timeout=30), [pid for pid in pids if process_alive(pid)]
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in filter(process_alive, pids):  # not left serving when the test fails
            os.kill(pid, signal.SIGKILL)
