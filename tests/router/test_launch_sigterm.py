"""Stopping: a process that launched a sidecar and is sent SIGTERM stops the sidecar too;
stop lets background tasks finish their cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from router.components import Components
from tests.conftest import process_alive, wait_gone
from tests.router.conftest import ServingWorld, SidecarThread

SCRIPT = """
import sys, time
from router.launch import launch_sidecar
with launch_sidecar(config_file=sys.argv[1], http=False, metrics=False) as sidecar:
    print(sidecar.pid, flush=True)
    # Busy in Python, as a replay is: a signal that lands on one of grpc's threads runs
    # its handler only when the main thread next runs Python code, which one long
    # time.sleep() would put off for its whole length.
    while True:
        time.sleep(0.05)
"""


@pytest.mark.timeout(300)
def test_sigterm_to_the_launcher_stops_its_sidecar(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    config = serving_world.toml(tmp_path / "sidecar.toml")
    launcher = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(config)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "SPECROUTE_STATE_DIR": str(tmp_path / "state")},
    )
    try:
        assert launcher.stdout is not None
        sidecar_pid = int(launcher.stdout.readline())
        assert process_alive(sidecar_pid)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=120) != 0
        assert wait_gone([sidecar_pid], timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_stop_lets_background_tasks_finish_their_cancellation(
    serving_world: ServingWorld, components: Components, tmp_path: Path
) -> None:
    """The auto-distiller kills and reaps its child when cancelled, which takes an await:
    ``stop`` waits for that instead of leaving the task pending as the loop closes
    ("Task was destroyed but it is pending", an unreaped child)."""
    sidecar = SidecarThread(serving_world.settings(tmp_path / "state"), components)
    cleaned = threading.Event()

    async def background() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.2)  # the child's kill and wait
            cleaned.set()

    asyncio.run_coroutine_threadsafe(_append(sidecar, background()), sidecar.loop).result(10)
    sidecar.stop()
    assert cleaned.is_set()


async def _append(sidecar: SidecarThread, work: Coroutine[Any, Any, None]) -> None:
    sidecar.running.tasks.append(asyncio.create_task(work))
    await asyncio.sleep(0)  # let it start


def test_a_failure_once_serving_still_drains_and_saves(monkeypatch: pytest.MonkeyPatch) -> None:
    """What runs once the sidecar serves (writing the ports file, say, into a directory
    that is missing) failed outside the stop's ``finally``: the sidecar exited without its
    drain and its final snapshot."""
    import asyncio
    from types import SimpleNamespace

    import router.server as server_module

    stopped: list[str] = []

    async def started(settings: object) -> object:
        async def stop() -> None:
            stopped.append("drained and saved")

        return SimpleNamespace(stop=stop)

    def unwritable(running: object) -> None:
        raise FileNotFoundError("no such directory: /missing/ports.json")

    monkeypatch.setattr(server_module, "start_sidecar", started)
    monkeypatch.setattr(server_module, "freeze_startup_heap", lambda: None)
    with pytest.raises(FileNotFoundError):
        asyncio.run(server_module.serve(object(), unwritable))  # type: ignore[arg-type]
    assert stopped == ["drained and saved"]


def test_both_ports_drain_at_once_within_the_grace() -> None:
    """The HTTP port drained after gRPC's grace, with aiohttp's own 60 s: a stop with a
    long HTTP generation in flight took grace + 60 s, past Kubernetes' 30 s, whose
    SIGKILL lost the final snapshot; meanwhile the HTTP port took new generations and
    its /health said 200. /health says 503 from the stop's start, and both ports drain
    together, each within the grace."""
    from types import SimpleNamespace

    import aiohttp
    from aiohttp import web

    from router.http_front import SERVICE_KEY, health_route
    from router.server import RunningSidecar, _start_site
    from router.service import RouterService

    grace = 0.5

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(120)  # a long generation
        return web.Response(text="done")

    async def scenario() -> tuple[int, float]:
        closed: list[str] = []
        service = SimpleNamespace(
            stopping=False,
            aclose=lambda: asyncio.sleep(0),
            close=lambda: closed.append("snapshot"),
            store=SimpleNamespace(close=lambda: closed.append("store")),
            cut_generations=lambda grace_s: 0,  # no generation: a handler that sleeps
        )
        service.generation_problem = lambda: RouterService.generation_problem(service)  # type: ignore[arg-type]
        app = web.Application()
        app[SERVICE_KEY] = service
        app.router.add_get("/health", health_route)
        app.router.add_get("/slow", slow)
        runner, port = await _start_site(app, "127.0.0.1", 0, None, "HTTP", grace)

        async def grpc_drain(seconds: float) -> None:
            await asyncio.sleep(seconds)

        running = RunningSidecar(
            settings=SimpleNamespace(grace_s=grace),  # type: ignore[arg-type]
            service=service,  # type: ignore[arg-type]
            server=SimpleNamespace(stop=grpc_drain),  # type: ignore[arg-type]
            health=SimpleNamespace(enter_graceful_shutdown=lambda: asyncio.sleep(0.3)),
            grpc_port=1,
            runners=[runner],
        )
        async with aiohttp.ClientSession() as client:
            base = f"http://127.0.0.1:{port}"
            in_flight = asyncio.create_task(client.get(f"{base}/slow"))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            stopping = asyncio.create_task(running.stop())
            await asyncio.sleep(0.1)  # the gRPC health is being told
            async with client.get(f"{base}/health") as health:
                status = health.status
            await stopping
            took = time.monotonic() - started
            in_flight.cancel()
        assert closed == ["snapshot", "store"]
        return status, took

    status, took = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert status == 503
    assert took < 30, took  # grace + aiohttp's own 60 s before; about a second now


def test_a_health_watch_sees_serving_then_not_serving_at_the_stop(
    serving_world: ServingWorld, components: Components, tmp_path: Path
) -> None:
    """grpc_health's Watch sends with context.write (a coroutine, not an async generator):
    the sidecar's interceptor iterated it and every Watch, gRPC client-side health
    checking's, failed with INTERNAL."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    sidecar = SidecarThread(serving_world.settings(tmp_path / "state"), components)
    channel = grpc.insecure_channel(sidecar.running.address)
    try:
        request = health_pb2.HealthCheckRequest(service="specroute.v1.Router")
        watch = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopper = threading.Thread(target=sidecar.stop)
        stopper.start()
        statuses = []
        with contextlib.suppress(grpc.RpcError):  # the stream ends when the server does
            statuses.extend(reply.status for reply in watch)
        stopper.join(60)
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, statuses
    finally:
        channel.close()
