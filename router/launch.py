"""Start ``specroute serve`` as a subprocess on free ports and wait until it is healthy.

Used by replays, the demo and durability tests::

    with launch_sidecar(world_dir, state_dir=tmp, policy="thompson") as sidecar:
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(sidecar.grpc_address))
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.settings import host_port

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0


class SidecarLaunchError(RuntimeError):
    """The sidecar process exited or did not become healthy in time."""


@dataclass
class LaunchedSidecar:
    """A running ``specroute serve`` subprocess and where to reach it."""

    process: subprocess.Popen[bytes]
    grpc_address: str
    http_url: str | None
    metrics_url: str | None
    state_dir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = STOP_TIMEOUT_S, signum: int = signal.SIGTERM) -> int:
        """``signum`` (graceful: final policy snapshot), then SIGKILL after ``timeout_s``."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "sidecar %d ignored %s; killing it", self.pid, signal.Signals(signum).name
                )
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def kill(self) -> None:
        """SIGKILL: no cleanup at all (durability tests)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_tail(self, characters: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return ""


def _wait_for_ports(process: subprocess.Popen[bytes], ports_file: Path, deadline: float) -> dict:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SidecarLaunchError(f"specroute serve exited with code {process.returncode}")
        if ports_file.is_file():
            text = ports_file.read_text()
            if text.endswith("\n"):
                return dict(json.loads(text))
        time.sleep(0.1)
    raise SidecarLaunchError("specroute serve did not start in time")


def wait_healthy(address: str, timeout_s: float = 60.0, service: str = "") -> None:
    """Block until the gRPC health service at ``address`` reports SERVING."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise SidecarLaunchError(f"{address} did not report SERVING in {timeout_s}s")
            time.sleep(0.1)


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit while the block runs, so that the ``finally`` that stops
    the sidecar runs when this process is terminated (``kill``, a job scheduler) instead
    of leaving the child serving. Only in the main thread, and only over the default
    action: a handler the program set itself is left alone. Python runs the handler when
    the main thread next executes Python code (not inside one long blocking call)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def exit_on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def launch_sidecar(
    world_dir: str | Path | None = None,
    *,
    state_dir: str | Path | None = None,
    policy: str | None = None,
    admin_token: str | None = None,
    data_token: str | None = None,
    config_file: str | Path | None = None,
    http: bool = True,
    metrics: bool = True,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    log_path: str | Path | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> Iterator[LaunchedSidecar]:
    """Run ``specroute serve`` on free ports; yield once gRPC health says SERVING.

    ``state_dir`` defaults to a fresh temporary directory (removed afterwards). Tokens
    travel in the environment, not the command line. On exit the process gets SIGTERM
    (graceful stop with a final policy snapshot), also when this process is sent SIGTERM
    meanwhile (``sigterm_as_exit``).
    """
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="specroute-sidecar-") as scratch:
        scratch_dir = Path(scratch)
        state = Path(state_dir) if state_dir is not None else scratch_dir / "state"
        ports_file = scratch_dir / "ports.json"
        log = Path(log_path) if log_path is not None else scratch_dir / "sidecar.log"
        command = [sys.executable, "-m", "router.cli", "serve", "--port", "0"]
        command += ["--http-port", "0" if http else "-1"]
        command += ["--metrics-port", "0" if metrics else "-1"]
        command += ["--ports-file", str(ports_file)]
        if world_dir is not None:
            command += ["--world", str(world_dir)]
        if policy is not None:
            command += ["--policy", policy]
        if config_file is not None:
            command += ["--config", str(config_file)]
        command += list(extra_args)
        child_env = {**os.environ, **(env or {}), "SPECROUTE_STATE_DIR": str(state)}
        if admin_token is not None:
            child_env["SPECROUTE_ADMIN_TOKEN"] = admin_token
        if data_token is not None:
            child_env["SPECROUTE_DATA_TOKEN"] = data_token
        with log.open("wb") as log_handle:
            process = subprocess.Popen(
                command, stdout=log_handle, stderr=subprocess.STDOUT, env=child_env
            )
        sidecar: LaunchedSidecar | None = None
        try:
            ports = _wait_for_ports(process, ports_file, time.monotonic() + startup_timeout_s)
            host = ports.get("host", "127.0.0.1")
            sidecar = LaunchedSidecar(
                process=process,
                grpc_address=host_port(host, ports["grpc"]),
                http_url=f"http://{host_port(host, ports['http'])}" if ports.get("http") else None,
                metrics_url=(
                    f"http://{host_port(host, ports['metrics'])}" if ports.get("metrics") else None
                ),
                state_dir=state,
                log_path=log,
            )
            wait_healthy(sidecar.grpc_address, timeout_s=60.0)
        except BaseException as error:
            process.kill()
            process.wait()
            tail = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
            if isinstance(error, SidecarLaunchError):
                raise SidecarLaunchError(f"{error}\n--- sidecar log ---\n{tail}") from None
            raise
        try:
            yield sidecar
        finally:
            sidecar.stop()
