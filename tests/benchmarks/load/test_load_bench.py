"""The load benchmark's figures from its runs."""

from __future__ import annotations

from benchmarks.load.load_bench import LoadRun


def test_failed_calls_are_no_throughput() -> None:
    """Errors were counted in calls per second (and so in Route/echo): 8,000 answers and
    2,000 fast failures in 2.5 s read as 4,000 calls/s instead of 3,200."""
    run = LoadRun(latencies=[0.001] * 8_000, errors=2_000, elapsed_s=2.5)
    assert run.rps == 3_200.0
    assert LoadRun([], 5, 0.0).rps == 0.0
