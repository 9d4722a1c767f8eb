"""The replicas benchmark's parts that need no sidecar: regret against the oracle, the
verdicts, and the redis-server harness (a real one: persistence across a restart)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.policy_sim.ground_truth import BUILTIN_ACCEPTANCE, ground_truth_from_matrix
from benchmarks.replicas.bench import FLEET, NEWCOMER, outcome_report, verdicts
from benchmarks.replicas.traffic import RegretTable


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
