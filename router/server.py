"""The sidecar process: gRPC (+ health, reflection), TGI HTTP front, metrics, snapshots.

``serve(settings)`` is the whole bootstrap; ``start_sidecar`` / ``RunningSidecar.stop``
are its two halves, used in-process by tests (ports 0 give free ports).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.auto_distill import start_auto_distiller
from router.certificates import ServerCertificate
from router.errors import ListenError, SidecarError
from router.http_front import build_http_app
from router.interceptors import BearerAuth, EdgeInterceptor
from router.metrics import SidecarMetrics, create_metrics
from router.pb import router_pb2, router_pb2_grpc
from router.pooling import start_pooling
from router.service import Components, RouterService
from router.servicer import ADMIN_METHODS, RouterServicer
from router.settings import Settings, host_port
from router.startup import cannot_listen, check_ports_free
from router.store import SidecarStore

logger = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
#: How long ``stop`` waits for its background tasks to finish their cancellation.
TASK_CANCEL_WAIT_S = 10.0
# Each stops the sidecar gracefully; SIGHUP is what a closing terminal sends.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass
class RunningSidecar:
    """A started sidecar: its bound ports and the pieces needed to stop it."""

    settings: Settings
    service: RouterService
    server: aio.Server
    health: Any
    grpc_port: int
    http_port: int | None = None
    metrics_port: int | None = None
    runners: list[web.AppRunner] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Stopped last: what the drain and the learners record is published before it goes.
    pooling_task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return host_port(self.settings.host, self.grpc_port)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new work, drain for ``grace`` seconds, then take the final snapshot; the
        pooling task goes last, so that the outcomes of the drained requests and of the
        learners' last scores are published (its cancellation flushes once)."""
        saved = False
        try:
            self.service.stopping = True  # no new generation is admitted from now on
            await self.health.enter_graceful_shutdown()
            await _cancel_and_wait(self.tasks)
            await self._drain(self.settings.grace_s if grace is None else grace)
            await self.service.aclose()
            saved = await asyncio.to_thread(self.service.close)
            if self.pooling_task is not None:
                await _cancel_and_wait([self.pooling_task])
        finally:
            self.service.store.close()  # and the state directory's lock with it
        if saved:
            logger.info("sidecar stopped; policy state saved")
        else:
            logger.warning("sidecar stopped; policy state NOT saved (the last snapshot stays)")

    async def _drain(self, grace: float) -> None:
        """Let both ports' requests in flight finish within ``grace`` seconds, then end the
        generations still running (``cut_generations``: an HTTP stream's last event says
        why) and wait for their handlers. Both ports drain at once: the HTTP port took new
        generations while gRPC drained, then drained with aiohttp's own 60 s, and the stop
        outran Kubernetes' 30 s (its SIGKILL lost the final snapshot); aiohttp alone waits
        its timeout twice over for a stream still running, then drops it without a word."""
        drained = asyncio.gather(
            self.server.stop(grace), *(runner.cleanup() for runner in self.runners)
        )
        try:
            await asyncio.wait_for(asyncio.shield(drained), grace)
        except TimeoutError:
            cut = self.service.cut_generations(grace)
            if cut:
                logger.warning(
                    "stopping: %d generation(s) still running after the grace of %g s ended",
                    cut,
                    grace,
                )
            await drained


async def _cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and let each finish its cancellation (the auto-distiller kills and
    reaps its child; pooling flushes) before the loop closes, within the drain time."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=TASK_CANCEL_WAIT_S)


def grpc_options(settings: Settings) -> list[tuple[str, Any]]:
    size = settings.limits.max_request_bytes
    kept = settings.grpc
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", size),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", _ms(kept.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(kept.keepalive_timeout_s)),
        # Accept (and send) keepalive pings on connections without a call too.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(kept.min_client_ping_interval_s)),
        # The server's own pings do not stop after two without data: a dead peer of an
        # idle connection is noticed too.
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if kept.max_connection_age_s is not None:
        options.append(("grpc.max_connection_age_ms", _ms(kept.max_connection_age_s)))
    if kept.max_connection_age_grace_s is not None:
        options.append(("grpc.max_connection_age_grace_ms", _ms(kept.max_connection_age_grace_s)))
    return options


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _bind(server: aio.Server, settings: Settings, certificate: ServerCertificate | None) -> int:
    address = host_port(settings.host, settings.port)
    try:
        if certificate is not None:
            return server.add_secure_port(address, certificate.grpc_credentials())
        return server.add_insecure_port(address)
    except RuntimeError as error:  # grpc's "Failed to bind to address ..."
        raise ListenError(
            cannot_listen(settings.host, settings.port, "gRPC (port)", error)
        ) from None


class AnsweredPayloadErrors(logging.Filter):
    """Drops aiohttp's "Unhandled exception" for a body that could not be read (gzip that
    is not, a broken chunked body): the front has answered it (400/422,
    ``http_front.json_body``), and aiohttp's own read of what was left re-raised it, logged
    at ERROR with a traceback, as if the sidecar had failed."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, RequestPayloadError)


def http_server_logger() -> logging.Logger:
    """The logger of the HTTP servers' connections (aiohttp's ``aiohttp.server`` records
    but for ``AnsweredPayloadErrors``)."""
    server_logger = logging.getLogger("router.http_server")
    if not any(isinstance(f, AnsweredPayloadErrors) for f in server_logger.filters):
        server_logger.addFilter(AnsweredPayloadErrors())
    return server_logger


async def _start_site(
    app: web.Application,
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    name: str,
    grace_s: float,
) -> tuple[web.AppRunner, int]:
    # handler_cancellation: a client that leaves a non-streamed request (a timeout, then
    # the client's retry) cancels its handler, which stops the generation and frees its
    # slot; aiohttp leaves handlers running by default.
    # shutdown_timeout: a stop waits for requests in flight within the sidecar's grace.
    runner = web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=grace_s,
        logger=http_server_logger(),
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=tls)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise ListenError(cannot_listen(host, port, name, error)) from None
    server: Any = site._server
    sockets = server.sockets if server is not None else []
    return runner, int(sockets[0].getsockname()[1]) if sockets else port


def _metrics_app(metrics: SidecarMetrics) -> web.Application:
    async def scrape(request: web.Request) -> web.Response:
        # In a worker thread: collectors query SQLite (the capture store's per-cluster
        # figures), which on the event loop held up every call for each scrape.
        body = await asyncio.to_thread(generate_latest, metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app


async def _certificate_loop(certificate: ServerCertificate, interval_s: float) -> None:
    """Renewed certificate files reach the HTTP and metrics ports (gRPC looks at each
    new connection itself); their context changes on this, the loop's, thread."""
    while True:
        await asyncio.sleep(interval_s)
        await asyncio.to_thread(certificate.check_files)
        certificate.update_context()


async def _snapshot_loop(service: RouterService, interval_s: float) -> None:
    """Save the policy every ``interval_s``. A failure is one line each time (a traceback
    only for an unforeseen one), and the first save after failures says so."""
    failures = 0
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(service.snapshot)
        except SidecarError as error:  # full, locked, unwritable: tried again next time
            failures += 1
            logger.error("policy snapshot failed (%d in a row): %s", failures, error)
        except Exception:
            failures += 1
            logger.exception("policy snapshot failed (%d in a row)", failures)
        else:
            if failures:
                logger.info("policy snapshot saved again after %d that failed", failures)
            failures = 0


async def _started_service(
    settings: Settings, components: Components, store: SidecarStore, metrics: SidecarMetrics
) -> RouterService:
    """The in-process or fleet-mode service, started."""
    if settings.fleet_file is not None:
        from router.fleet.service import start_fleet_service

        return await start_fleet_service(settings, components, store, metrics)
    service = RouterService(settings, components, store, metrics)
    try:
        await asyncio.to_thread(service.start)
    except BaseException:
        await service.close_after_failed_start()
        raise
    return service


async def start_sidecar(settings: Settings, components: Components | None = None) -> RunningSidecar:
    """Build components (unless given), start every server, and return the running sidecar."""
    # The TLS files (every port speaks TLS when they are set) and the state store first:
    # either unusable stops the start before the models are loaded.
    certificate = ServerCertificate.from_settings(settings.tls)
    tls = certificate.context if certificate is not None else None
    check_ports_free(settings)
    store = SidecarStore(settings.state_dir, exclusive=True)
    metrics = create_metrics()
    service: RouterService | None = None
    try:
        if components is None:
            from router.components import build_components

            components = await asyncio.to_thread(build_components, settings)
        service = await _started_service(settings, components, store, metrics)
        # Pooled learning: the shared history is replayed here, before anything is served.
        pooling = await start_pooling(settings, service, metrics)
    except BaseException:
        # What started stops, and the state directory is free again for the next start
        # in this process (an embedder's retry, a test).
        if service is not None:
            await service.close_after_failed_start()
        store.close()
        raise

    admin = settings.admin_token.get_secret_value() if settings.admin_token else None
    if admin is None:
        logger.warning(
            "no admin_token set: RegisterDrafter, RemoveDrafter, ReloadClassifier and "
            "SetPolicy are refused (UNAUTHENTICATED) until one is configured"
        )
    data = settings.data_token.get_secret_value() if settings.data_token else None
    server = aio.server(
        interceptors=[EdgeInterceptor(BearerAuth(ADMIN_METHODS, admin, data), metrics)],
        options=grpc_options(settings),
    )
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(service, pooling), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    running = RunningSidecar(settings, service, server, health_servicer, 0)
    try:
        running.grpc_port = _bind(server, settings, certificate)
        await server.start()
        if settings.http_port is not None:
            runner, running.http_port = await _start_site(
                build_http_app(service, data),
                settings.host,
                settings.http_port,
                tls,
                "HTTP",
                settings.grace_s,
            )
            running.runners.append(runner)
        if settings.metrics_port is not None:
            runner, running.metrics_port = await _start_site(
                _metrics_app(metrics),
                settings.host,
                settings.metrics_port,
                tls,
                "metrics",
                settings.grace_s,
            )
            running.runners.append(runner)
    except BaseException:
        # A port taken since the check: what started stops (and the policy is saved).
        if pooling is not None:
            with contextlib.suppress(Exception):
                await pooling.link.close()
        await running.stop(grace=0)
        raise
    port = running.grpc_port
    running.tasks.append(asyncio.create_task(_snapshot_loop(service, settings.snapshot_interval_s)))
    if certificate is not None:
        interval_s = settings.tls.reload_interval_s
        running.tasks.append(asyncio.create_task(_certificate_loop(certificate, interval_s)))
    auto_distill = start_auto_distiller(settings, service, port)
    if auto_distill is not None:
        running.tasks.append(auto_distill)
    if pooling is not None:
        running.pooling_task = asyncio.create_task(pooling.run())
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info(
        "specroute serving: grpc %s:%d, http %s, metrics %s",
        settings.host,
        port,
        running.http_port,
        running.metrics_port,
    )
    return running


def freeze_startup_heap() -> None:
    """Move everything allocated at start-up (models, tokenizers, sessions: hundreds of
    thousands of objects) out of the garbage collector's generations.

    Objects that live as long as the process never become garbage, but every full
    collection scans them; on the route path those scans showed up as stalls. Measured with
    ``specroute bench load`` on the default world: about +10% Route throughput.
    """
    gc.collect()
    gc.freeze()
    logger.info("froze %d start-up objects out of the collector's reach", gc.get_freeze_count())


async def serve(
    settings: Settings, on_ready: Callable[[RunningSidecar], None] | None = None
) -> None:
    """Run the sidecar until SIGTERM, SIGINT or SIGHUP (its terminal closed), then stop
    gracefully (final snapshot)."""
    running = await start_sidecar(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, _on_stop_signal, signum, stopping, settings)
    try:
        # Inside the try: a ports file that cannot be written (its directory missing)
        # failed here with the sidecar serving, and it exited without its drain or its
        # final snapshot.
        freeze_startup_heap()
        if on_ready is not None:
            on_ready(running)
        await stopping.wait()
    finally:
        # The handlers stay through the stop: a second Ctrl-C, or a SIGHUP from the
        # terminal closing meanwhile, killed the process mid-drain (the signal's default
        # action), before its final snapshot.
        stopping.set()
        try:
            await running.stop()
        finally:
            with contextlib.suppress(Exception):
                for signum in STOP_SIGNALS:
                    loop.remove_signal_handler(signum)


def _on_stop_signal(signum: int, stopping: asyncio.Event, settings: Settings) -> None:
    """A stop signal: the first starts the graceful stop, a later one is only logged (the
    stop ends within the grace, then takes the final snapshot)."""
    if not stopping.is_set():
        stopping.set()
        return
    logger.warning(
        "%s: already stopping (requests in flight get up to %g s, then the final snapshot)",
        signal.Signals(signum).name,
        settings.grace_s,
    )
