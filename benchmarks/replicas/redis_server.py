"""A real ``redis-server`` on a free port in a scratch directory: for the replicas
benchmark and the pooling tests (never for production: operators run their own Redis).

``persist=False`` runs it with no snapshots and no append-only file (``--save ""
--appendonly no``): a restart loses the streams, the harshest case for the replicas.
``persist=True`` keeps an append-only file fsynced every second, as a production Redis
would, so a restart keeps the retained history.
``tls=RedisTlsFiles(...)`` serves TLS only (``--port 0 --tls-port PORT``, clients not asked
for certificates): ``url`` is then ``rediss://`` and ``client_options()`` trusts its CA.
``RedisClusterServers`` runs several in cluster mode, the hash slots split among them.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REDIS_BINARY = "redis-server"
START_TIMEOUT_S = 10.0


class RedisUnavailableError(RuntimeError):
    """No redis-server binary on this machine, or it did not start."""


def redis_binary() -> str | None:
    """The redis-server executable on PATH (or /usr/bin, /usr/sbin), else None."""
    found = shutil.which(REDIS_BINARY)
    if found:
        return found
    for directory in ("/usr/bin", "/usr/sbin", "/usr/local/bin"):
        candidate = Path(directory) / REDIS_BINARY
        if candidate.is_file():
            return str(candidate)
    return None


def redis_tls_supported(binary: str) -> bool:
    """Whether ``binary`` was built with TLS: a build without it refuses ``tls-port`` as a
    bad directive, one with it exits because nothing is left to listen on."""
    probe = subprocess.run(
        [binary, "--port", "0", "--tls-port", "0"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )
    return "Bad directive" not in probe.stdout + probe.stderr


@dataclass(frozen=True)
class RedisTlsFiles:
    """A server certificate and key (PEM), and the CA that signed the certificate."""

    cert_file: Path
    key_file: Path
    ca_file: Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """``redis-server`` as a child process; ``stop`` / ``start`` keep the same port."""

    def __init__(
        self,
        directory: Path,
        *,
        persist: bool = False,
        password: str | None = None,
        tls: RedisTlsFiles | None = None,
        cluster: bool = False,
    ) -> None:
        binary = redis_binary()
        if binary is None:
            raise RedisUnavailableError(
                "redis-server is not installed (Debian: apt-get install redis-server)"
            )
        self.binary = binary
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.persist = persist
        self.password = password
        self.tls = tls
        self.cluster = cluster
        self.port = free_port()
        self.bus_port = free_port() if cluster else 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def client_options(self) -> dict[str, Any]:
        """What a redis-py client of ``url`` needs besides it (the CA, for TLS)."""
        return {"ssl_ca_certs": str(self.tls.ca_file)} if self.tls else {}

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        if self.tls:
            command = [self.binary, "--port", "0", "--tls-port", str(self.port)]
            command += ["--tls-cert-file", str(self.tls.cert_file)]
            command += ["--tls-key-file", str(self.tls.key_file)]
            command += ["--tls-ca-cert-file", str(self.tls.ca_file)]
            command += ["--tls-auth-clients", "no", "--bind", "127.0.0.1"]
        else:
            command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self.directory), "--save", ""]
        command += ["--logfile", str(self.directory / "redis.log"), "--daemonize", "no"]
        if self.persist:
            command += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            command += ["--appendonly", "no"]
        if self.password:
            command += ["--requirepass", self.password]
        if self.cluster:
            command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            # Its bus port, else port + 10000, which a free port above 55535 overflows.
            command += ["--cluster-port", str(self.bus_port)]
        return command

    def start(self) -> RedisServer:
        self._process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, **self.client_options())
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if not self.running:
                    raise RedisUnavailableError(f"redis-server exited: {self.log_tail()}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    time.sleep(0.05)
        finally:
            client.close()
        raise RedisUnavailableError(f"redis-server did not answer in {START_TIMEOUT_S} s")

    def stop(self) -> None:
        """SIGTERM (with persist, the append-only file is fsynced on the way out)."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, characters: int = 2000) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace")[-characters:] if path.is_file() else ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


SLOTS = 16384  # a Redis Cluster's hash slots


class RedisClusterServers:
    """``nodes`` redis-servers in cluster mode (no replicas), the hash slots split evenly
    among them in order; ``url`` is the first node's (a client finds the others)."""

    def __init__(self, directory: Path, nodes: int = 3) -> None:
        self.servers = [
            RedisServer(Path(directory) / f"node-{i}", cluster=True) for i in range(nodes)
        ]

    @property
    def url(self) -> str:
        return self.servers[0].url

    def node_url(self, key: str, *, holding: bool) -> str:
        """The URL of a node that holds ``key``'s slot (``holding``), or of one that does not."""
        from redis.crc import key_slot

        owner = key_slot(key.encode()) * len(self.servers) // SLOTS
        index = owner if holding else (owner + 1) % len(self.servers)
        return self.servers[index].url

    def start(self) -> RedisClusterServers:
        import redis

        clients = [redis.Redis(port=server.port) for server in self.servers]
        try:
            for server in self.servers:
                server.start()
            count = len(self.servers)
            for index, client in enumerate(clients):
                first, last = index * SLOTS // count, (index + 1) * SLOTS // count - 1
                client.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
            for server in self.servers[1:]:
                meet = ("CLUSTER MEET", "127.0.0.1", server.port, server.bus_port)
                clients[0].execute_command(*meet)
            deadline = time.monotonic() + START_TIMEOUT_S
            while not all(c.cluster("INFO")["cluster_state"] == "ok" for c in clients):
                if time.monotonic() > deadline:
                    raise RedisUnavailableError("the Redis cluster did not form in time")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        finally:
            for client in clients:
                client.close()
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
