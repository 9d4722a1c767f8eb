"""The event-loop CPU benchmark of Route runs on the tiny world and reports every figure."""

from __future__ import annotations

import asyncio
from pathlib import Path

from benchmarks.load.route_cpu import build_service, format_measurement, measure
from router.bundle import ModelBundle


def test_route_cpu_measures_the_sidecar_the_floor_and_the_policy(
    tiny_world: ModelBundle, tmp_path: Path
) -> None:
    from classifiers import ensure_world_classifier

    ensure_world_classifier(tiny_world.root, tiny_world.corpus_dir)
    service = build_service(tiny_world.root, tmp_path)
    holder = service.policy
    try:
        result = asyncio.run(measure(service, tiny_world.root, batches=5, sizes=(3, 1)))
    finally:
        service.close()
    assert service.policy is holder  # the timing wrapper is taken off again
    for size in ("3", "1"):
        figures = result["sizes"][size]
        assert figures["sidecar_us"] > 0 and figures["floor_us"] > 0
        # the policy decided every call of the sidecar, and costs part of its time
        assert 0 < figures["policy_us"] < figures["sidecar_us"]
    assert "batches of 3: sidecar" in format_measurement(result)
