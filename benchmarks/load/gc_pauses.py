"""The garbage collector's pauses while a sidecar serves Route calls that are never reported.

    python -m benchmarks.load.gc_pauses [--world DIR] [--routes 250000] [--json PATH]

Routes that no Report follows wait in the sidecar's pending table (100,000 by default),
so a serving stack that only asks fills it. This drives ``routes`` Route calls through
the sidecar's servicer in this one process (batches of 7, the mean batch at concurrency
64 on 2 vCPUs, without gRPC: ``benchmarks.load.route_cpu``), after freezing the start-up
heap as ``specroute serve`` does, and times each collection the collector runs on its
own, per generation. A pause stalls the event loop, so every call waiting on it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import module_parser
from benchmarks.load.load_bench import route_requests
from benchmarks.load.route_cpu import build_service, wait_ready
from router.server import freeze_startup_heap
from router.service import RouterService
from router.servicer import RouterServicer

BATCH = 7
GENERATIONS = (0, 1, 2)


@dataclass
class PauseLog:
    """Each automatic collection's wall time in ms, by generation (a ``gc.callbacks``
    entry while installed)."""

    pauses: dict[int, list[float]] = field(default_factory=lambda: {g: [] for g in GENERATIONS})
    _started: float = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            elapsed_ms = (time.perf_counter() - self._started) * 1000.0
            self.pauses[int(info["generation"])].append(elapsed_ms)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            str(g): {
                "collections": len(p),
                "max_ms": round(max(p, default=0.0), 2),
                "total_ms": round(sum(p), 1),
            }
            for g, p in self.pauses.items()
        }


async def drive(service: RouterService, routes: int) -> tuple[PauseLog, float]:
    """Collection pauses over ``routes`` unreported Route calls, and their wall time (s)."""
    await wait_ready(service)
    servicer = RouterServicer(service)
    requests = route_requests(BATCH)
    freeze_startup_heap()
    log = PauseLog()
    gc.callbacks.append(log)
    started = time.perf_counter()
    try:
        for _ in range(routes // BATCH):
            await asyncio.gather(*(servicer.Route(request, None) for request in requests))
    finally:
        gc.callbacks.remove(log)
    return log, time.perf_counter() - started


def format_summary(routes: int, seconds: float, summary: dict[str, dict[str, float]]) -> str:
    lines = [f"{routes} unreported Route calls in {seconds:.1f} s; automatic collections:"]
    for generation, figures in summary.items():
        lines.append(
            f"  generation {generation}: {figures['collections']:.0f}, longest "
            f"{figures['max_ms']:.2f} ms, {figures['total_ms']:.1f} ms in all"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from router.bundle import default_bundle_dir

    parser = module_parser(__doc__)
    parser.add_argument("--world", type=Path, default=None, help="default: the built-in one")
    parser.add_argument("--routes", type=int, default=250_000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="gc-pauses-") as state_dir:
        service = build_service(args.world or default_bundle_dir(), Path(state_dir))
        try:
            log, seconds = asyncio.run(drive(service, args.routes))
        finally:
            service.close()
    summary = log.summary()
    print(format_summary(args.routes, seconds, summary))
    if args.json is not None:
        payload = {"routes": args.routes, "seconds": round(seconds, 1), "generations": summary}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
