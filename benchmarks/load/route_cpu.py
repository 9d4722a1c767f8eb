"""Event-loop CPU per Route call: the sidecar's servicer against the floor servicer.

    python -m benchmarks.load.route_cpu [--world DIR] [--batches 3000] [--json PATH]

Both run in this one process on one event loop, without gRPC: batches of ``size`` calls
are awaited on each servicer's ``Route`` together (so that they form one batch in its
``Coalescer``), and the loop thread's CPU time (``time.thread_time``) is divided by the
calls. The prompt readers' child processes are not counted. The floor servicer
(:class:`benchmarks.load.load_bench.FloorServicer`) does only the token count and
classification, with the sidecar's prompt reader, so the difference is the sidecar's own
per-call Python on the event loop: checks, conversions, the policy decision,
bookkeeping, metrics, the reply.
The policy's ``select_many`` is timed separately. Hot caches: under load and at
concurrency 1 each of these costs more (benchmarks/load/HISTORY.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import module_parser
from benchmarks.load.load_bench import FloorServicer, floor_reader, route_requests
from router.pb import router_pb2 as pb
from router.route_process import ChildProcessReader
from router.service import RouterService
from router.servicer import RouterServicer

SIZES = (7, 1)  # about the mean batch at concurrency 64 on 2 vCPUs, and a lone call
WARMUP_BATCHES = 200


class TimedPolicy:
    """A policy holder whose ``select_many`` adds its thread CPU time to ``seconds``;
    everything else goes to the holder it wraps."""

    def __init__(self, holder: Any) -> None:
        self._holder = holder
        self.seconds = 0.0

    def select_many(self, contexts: Sequence[Any], eligible: Sequence[str]) -> Any:
        started = time.thread_time()
        try:
            return self._holder.select_many(contexts, eligible)
        finally:
            self.seconds += time.thread_time() - started

    def __getattr__(self, name: str) -> Any:
        return getattr(self._holder, name)


async def loop_cpu_per_call(
    servicer: Any, size: int, batches: int, policy: TimedPolicy | None = None
) -> tuple[float, float]:
    """Microseconds of this thread's CPU per ``Route`` call in batches of ``size``, and
    of it in ``policy.select_many`` (0 without one), after warm-up batches."""
    requests = route_requests(size)

    async def batch() -> None:
        await asyncio.gather(*(servicer.Route(request, None) for request in requests))

    for _ in range(WARMUP_BATCHES):
        await batch()
    if policy is not None:
        policy.seconds = 0.0
    started = time.thread_time()
    for _ in range(batches):
        await batch()
    calls = batches * size
    spent = policy.seconds if policy is not None else 0.0
    return (time.thread_time() - started) / calls * 1e6, spent / calls * 1e6


async def wait_ready(service: RouterService, timeout_s: float = 120.0) -> None:
    """Until the sidecar's prompt reader's child answers (it starts in the background)."""
    reader = service.prompt_reader
    deadline = time.monotonic() + timeout_s
    while isinstance(reader, ChildProcessReader) and not reader.process.ready:
        if time.monotonic() > deadline:
            raise RuntimeError("the prompt reader's child did not start")
        await asyncio.sleep(0.05)


async def measure(
    service: RouterService, world_dir: Path, *, batches: int, sizes: Sequence[int] = SIZES
) -> dict[str, Any]:
    """Per batch size: loop CPU per call of the sidecar, of the floor, and of the
    sidecar's policy decisions (service started; its prompt reader's child is awaited)."""
    timed = TimedPolicy(service.policy)
    service.policy = timed  # type: ignore[assignment]
    sidecar = RouterServicer(service)
    reader = await asyncio.to_thread(floor_reader, world_dir)
    try:
        floor = FloorServicer(pb.RouteDecision(), reader)
        await wait_ready(service)
        result: dict[str, Any] = {"batches": batches, "sizes": {}}
        for size in sizes:
            floor_us, _ = await loop_cpu_per_call(floor, size, batches)
            sidecar_us, policy_us = await loop_cpu_per_call(sidecar, size, batches, timed)
            result["sizes"][str(size)] = {
                "sidecar_us": round(sidecar_us, 1),
                "floor_us": round(floor_us, 1),
                "policy_us": round(policy_us, 1),
            }
        return result
    finally:
        service.policy = timed._holder
        reader.close()


def format_measurement(result: dict[str, Any]) -> str:
    lines = ["event-loop CPU per Route call (hot, in one process):"]
    for size, figures in result["sizes"].items():
        lines.append(
            f"  batches of {size}: sidecar {figures['sidecar_us']:.1f} us, floor "
            f"{figures['floor_us']:.1f} us (difference "
            f"{figures['sidecar_us'] - figures['floor_us']:.1f} us, of which the policy "
            f"decision {figures['policy_us']:.1f} us)"
        )
    return "\n".join(lines)


def build_service(world_dir: Path, state_dir: Path) -> RouterService:
    from router.components import build_components
    from router.metrics import create_metrics
    from router.settings import Settings
    from router.store import SidecarStore

    settings = Settings(world_dir=world_dir, state_dir=state_dir)
    components = build_components(settings)
    service = RouterService(settings, components, SidecarStore(state_dir), create_metrics())
    service.start()
    return service


def main(argv: Sequence[str] | None = None) -> None:
    from router.bundle import default_bundle_dir

    parser = module_parser(__doc__)
    parser.add_argument("--world", type=Path, default=None, help="default: the built-in one")
    parser.add_argument("--batches", type=int, default=3000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    world_dir = args.world or default_bundle_dir()
    with tempfile.TemporaryDirectory(prefix="route-cpu-") as state_dir:
        service = build_service(world_dir, Path(state_dir))
        try:
            result = asyncio.run(measure(service, world_dir, batches=args.batches))
        finally:
            service.close()
    print(format_measurement(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
