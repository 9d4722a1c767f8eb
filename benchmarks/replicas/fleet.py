"""Sidecar processes of a replica fleet: ``specroute serve`` on the world, pooled through
one Redis (or alone), started side by side, scraped for their pooling counters."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.replicas.traffic import Replica
from router.launch import LaunchedSidecar, launch_sidecar, sigterm_as_exit

logger = logging.getLogger(__name__)

POOLING_COUNTERS = {
    "published": "specroute_pooled_outcomes_published_total",
    "applied": "specroute_pooled_outcomes_applied_total",
    "dropped": "specroute_pooled_outcomes_dropped_total",
    "buffered": "specroute_pooled_outcomes_buffered",
}


@dataclass(frozen=True)
class PoolingTarget:
    """Where a pooled fleet shares: Redis URL, secret and this run's stream names."""

    redis_url: str
    secret: str
    prefix: str

    def env(self) -> dict[str, str]:
        return {
            "SPECROUTE_POOLING__ENABLED": "true",
            "SPECROUTE_POOLING__REDIS_URL": self.redis_url,
            "SPECROUTE_POOLING__SECRET": self.secret,
            "SPECROUTE_POOLING__OUTCOME_STREAM": f"{self.prefix}:outcomes",
            "SPECROUTE_POOLING__REGISTRY_STREAM": f"{self.prefix}:drafters",
            "SPECROUTE_POOLING__RECONNECT_MAX_S": "0.5",
        }


@dataclass
class RunningReplica:
    """A launched sidecar and its client."""

    name: str
    launched: LaunchedSidecar
    replica: Replica

    def counters(self) -> dict[str, float]:
        return scrape_counters(self.launched.metrics_url or "")

    def kill(self) -> None:
        self.replica.close()
        self.launched.kill()


def scrape_counters(metrics_url: str) -> dict[str, float]:
    """The pooling counters of a sidecar's /metrics (0 for any not exported)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {
        sample.name: float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return {key: samples.get(name, 0.0) for key, name in POOLING_COUNTERS.items()}


def replica_env(
    pooling: PoolingTarget | None, seed: int, policy_config: Mapping[str, Any]
) -> dict[str, str]:
    """Environment of one replica: in-process prompt reading (one process per replica on
    a shared CPU), passive OpenMP waits, its own policy seed (replicas with one seed draw
    the same numbers and so explore the same arms at the same time), and the pooling
    settings when pooled."""
    env = {
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "SPECROUTE_LIMITS__PROMPT_READER": "in_process",
        "SPECROUTE_POLICY_CONFIG": json.dumps({**policy_config, "seed": seed}),
        "SPECROUTE_POOLING__ENABLED": "false",
    }
    if pooling is not None:
        env.update(pooling.env())
    return env


def start_replicas(
    names: Mapping[str, int],
    world_dir: Path | None,
    state_root: Path,
    pooling: PoolingTarget | None,
    stack: contextlib.ExitStack,
    policy_config: Mapping[str, Any] | None = None,
) -> dict[str, RunningReplica]:
    """Start one sidecar per name (name -> its policy seed) side by side; ``stack``
    stops them, also when this process is sent SIGTERM meanwhile (they are launched on
    worker threads, where ``launch_sidecar`` cannot install that handler itself)."""
    stack.enter_context(sigterm_as_exit())
    state_root.mkdir(parents=True, exist_ok=True)

    def launch(name: str) -> tuple[Any, LaunchedSidecar]:
        manager = launch_sidecar(
            world_dir,
            state_dir=state_root / name,
            http=False,
            metrics=True,
            env=replica_env(pooling, names[name], policy_config or {}),
            log_path=state_root / f"{name}.log",
        )
        return manager, manager.__enter__()

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        results = list(pool.map(launch, list(names)))
    running = {}
    for name, (manager, launched) in zip(names, results, strict=True):
        stack.push(manager.__exit__)
        running[name] = RunningReplica(name, launched, Replica(name, launched.grpc_address))
        stack.callback(running[name].replica.close)
    logger.info("started %s", {n: r.launched.grpc_address for n, r in running.items()})
    return running


def counters_of(fleet: Mapping[str, RunningReplica]) -> dict[str, dict[str, float]]:
    return {name: replica.counters() for name, replica in fleet.items()}
