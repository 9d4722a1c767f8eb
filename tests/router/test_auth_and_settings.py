"""Data-plane tokens (gRPC and HTTP), settings precedence, the SQLite store, the CLI."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError
from text_generation import Client
from text_generation.errors import UnknownError
from typer.testing import CliRunner

from router.certificates import ServerCertificate
from router.channel import ClientTls
from router.cli import build_app
from router.errors import AlreadyExistsError, NotFoundError
from router.pb import router_pb2 as pb
from router.pb.router_pb2_grpc import RouterStub
from router.server import grpc_options
from router.service import Components
from router.settings import (
    MAX_C_INT,
    Limits,
    Settings,
    SettingsLoadError,
    TlsSettings,
    load_settings,
)
from router.store import DrafterRecord, SidecarStore
from tests.router.conftest import (
    ADMIN,
    ADMIN_TOKEN,
    DATA_TOKEN,
    ServingWorld,
    SidecarThread,
    self_signed_tls,
)

PROMPT = "def add(a, b):\n    return"


def test_data_token_guards_route_report_generate(guarded: SidecarThread) -> None:
    with pytest.raises(grpc.RpcError) as missing:
        guarded.stub.Route(pb.RouteRequest(text=PROMPT))
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as wrong:
        list(
            guarded.stub.Generate(
                pb.GenerateRequest(text=PROMPT, max_new_tokens=2),
                metadata=(("authorization", "Bearer nope"),),
            )
        )
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
    data = (("authorization", f"Bearer {DATA_TOKEN}"),)
    assert guarded.stub.Route(pb.RouteRequest(text=PROMPT), metadata=data).task_cluster
    assert guarded.stub.Route(pb.RouteRequest(text=PROMPT), metadata=ADMIN).task_cluster


def test_data_token_cannot_call_admin_rpcs(guarded: SidecarThread) -> None:
    with pytest.raises(grpc.RpcError) as denied:
        guarded.stub.RegisterDrafter(
            pb.RegisterDrafterRequest(name="x", kind="ngram"),
            metadata=(("authorization", f"Bearer {DATA_TOKEN}"),),
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_health_checks_need_no_token_and_the_cli_sends_the_data_token(
    guarded: SidecarThread,
) -> None:
    """A load balancer's or Kubernetes' gRPC probe sends no metadata: health is open while
    every other method, listing, policy state and reflection (a streaming method) included,
    needs the data token, which the CLI's client commands send."""
    health = health_pb2_grpc.HealthStub(guarded.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as listing:
        guarded.stub.ListDrafters(pb.ListDraftersRequest())
    assert listing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reflection = reflection_pb2_grpc.ServerReflectionStub(guarded.channel)
    asked = [reflection_pb2.ServerReflectionRequest(list_services="")]
    with pytest.raises(grpc.RpcError) as schema:
        list(reflection.ServerReflectionInfo(iter(asked), timeout=10))
    assert schema.value.code() == grpc.StatusCode.UNAUTHENTICATED
    data = (("authorization", f"Bearer {DATA_TOKEN}"),)
    (answer,) = reflection.ServerReflectionInfo(iter(asked), metadata=data, timeout=10)
    services = {s.name for s in answer.list_services_response.service}
    assert "specroute.v1.Router" in services
    address = guarded.running.address
    listed = CliRunner().invoke(
        build_app(), ["drafters", "list", "--address", address, "--token", DATA_TOKEN]
    )
    assert listed.exit_code == 0 and "generic" in listed.output, listed.output
    shown = CliRunner().invoke(
        build_app(),
        ["policy", "show", "--address", address],
        env={"SPECROUTE_DATA_TOKEN": DATA_TOKEN},
    )
    assert shown.exit_code == 0 and shown.output.startswith("policy "), shown.output
    refused = CliRunner().invoke(build_app(), ["policy", "show", "--address", address])
    assert refused.exit_code != 0 and "UNAUTHENTICATED" in refused.output, refused.output
    clusters = CliRunner().invoke(
        build_app(), ["clusters", "--address", address, "--token", DATA_TOKEN, "--json"]
    )
    assert clusters.exit_code == 0, clusters.output
    # For scripts: the replies as JSON (the tables' columns split badly on paths).
    scripted = {
        command: CliRunner().invoke(
            build_app(), [*command.split(), "--address", address, "--token", DATA_TOKEN, "--json"]
        )
        for command in ("drafters list", "policy show")
    }
    assert all(done.exit_code == 0 for done in scripted.values()), scripted
    listed = json.loads(scripted["drafters list"].stdout)["drafters"]
    assert "generic" in {drafter["name"] for drafter in listed}
    assert json.loads(scripted["policy show"].stdout)["policy"] == "thompson"


def test_http_front_needs_the_data_token(guarded: SidecarThread) -> None:
    with pytest.raises(UnknownError):  # 401 is not one of TGI's codes
        Client(guarded.http_url, timeout=60).generate(PROMPT, max_new_tokens=2)
    client = Client(guarded.http_url, headers={"Authorization": f"Bearer {DATA_TOKEN}"})
    # Served: one or two tokens (the tiny target may end its turn after the first).
    assert 1 <= client.generate(PROMPT, max_new_tokens=2).details.generated_tokens <= 2


def test_settings_precedence_defaults_toml_env_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text('port = 1234\npolicy = "ucb"\n[limits]\nmax_new_tokens = 99\n')
    monkeypatch.setenv("SPECROUTE_PORT", "5555")
    monkeypatch.setenv("SPECROUTE_LIMITS__MAX_PROMPT_TOKENS", "77")
    monkeypatch.setenv("SPECROUTE_DRAFTER_DIRS", '{"a": "/models/a"}')
    settings = load_settings(config, host="0.0.0.0")
    assert settings.port == 5555  # env over TOML
    assert settings.policy == "ucb"  # TOML over defaults
    assert settings.limits.max_new_tokens == 99 and settings.limits.max_prompt_tokens == 77
    assert settings.limits.generation_workers == 1  # default kept inside a nested group
    assert settings.drafter_dirs == {"a": Path("/models/a")}
    assert settings.host == "0.0.0.0"  # explicit (CLI) over everything
    assert load_settings(config, port=7).port == 7


def test_torch_threads_setting_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from router.components import apply_torch_threads

    assert load_settings(None).torch_threads == 1  # tiny models: one intra-op thread
    monkeypatch.setenv("SPECROUTE_TORCH_THREADS", "0")
    assert load_settings(None).torch_threads == 0
    before = torch.get_num_threads()
    try:
        apply_torch_threads(2)
        assert torch.get_num_threads() == 2
        apply_torch_threads(0)  # 0 keeps whatever torch has
        assert torch.get_num_threads() == 2
        apply_torch_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_print_config_masks_tokens(tmp_path: Path) -> None:
    env = {"SPECROUTE_ADMIN_TOKEN": "very-secret", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "router.cli", "serve", "--print-config", "--port", "4321"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    printed = json.loads(out)
    assert printed["port"] == 4321 and printed["admin_token"] == "**********"
    assert "very-secret" not in out


@pytest.mark.parametrize("option", ["--http-port", "--metrics-port"])
def test_a_port_out_of_range_is_refused_before_anything_loads(option: str) -> None:
    """--http-port 70000 passed (the option bypassed the settings' checks), the pre-flight
    probe wrapped it to port 4464, and the start failed with a traceback (OverflowError)
    once every model had loaded."""
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", "serve", "--print-config", option, "70000"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )
    assert done.returncode == 2, done.stderr
    assert f"Invalid value for '{option}'" in done.stderr, done.stderr
    assert "65535" in done.stderr and "Traceback" not in done.stderr


def test_the_http_and_metrics_ports_turn_off_from_a_file_or_the_environment(
    tmp_path: Path,
) -> None:
    """Only --http-port -1 turned the fronts off: TOML has no null, and -1 in a file or a
    SPECROUTE_ variable was refused ("greater than or equal to 0")."""
    config = tmp_path / "sidecar.toml"
    config.write_text("http_port = -1\n")
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", "serve", "--config", str(config), "--print-config"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "SPECROUTE_METRICS_PORT": "-1"},
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["http_port"] is None and printed["metrics_port"] is None


def test_served_model_names_and_a_state_directory_that_is_a_file_read_as_an_operator_means(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPECROUTE_SERVED_MODEL_NAMES=qwen was refused as "Expecting value: line 1 column
    1" (a JSON list only); a state_dir that is a file said "[Errno 17] File exists"."""
    from router.settings import Settings
    from router.store import SidecarStore, StateStoreError

    monkeypatch.setenv("SPECROUTE_SERVED_MODEL_NAMES", "qwen, Qwen/Qwen2.5-7B-Instruct")
    assert Settings().served_model_names == ["qwen", "Qwen/Qwen2.5-7B-Instruct"]
    monkeypatch.setenv("SPECROUTE_SERVED_MODEL_NAMES", '["a,b"]')
    assert Settings().served_model_names == ["a,b"]
    a_file = tmp_path / "state"
    a_file.write_text("")
    with pytest.raises(StateStoreError, match="is a file, not a directory"):
        SidecarStore(a_file, exclusive=True)


def test_a_misspelt_limit_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text("[limits]\nmax_new_token = 99\n")  # "max_new_tokens" misspelt
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", "serve", "--config", str(config), "--print-config"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2
    assert "invalid settings" in done.stderr and "limits.max_new_token" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("config_text", "env", "says"),
    [
        (None, {}, "does not exist"),  # --config names a file that is not there
        ("port = [\n", {}, "is not valid TOML"),
        (
            "",
            {"SPECROUTE_DRAFTER_DIRS": "a=/models/a"},
            'error parsing value for field "drafter_dirs"',
        ),
        ("", {"SPECROUTE_MODEL_ROOTS": '["/models"'}, "model_roots: not a JSON list"),
        # Refused with the settings, not after the models have loaded (exit 1 before).
        ("", {"SPECROUTE_POLICY": "thomson"}, "policy: unknown policy 'thomson'; known: "),
        (
            "",
            {"SPECROUTE_POLICY_CONFIG": '{"gama": 0.99}'},
            "policy_config for 'thompson': gama: Extra inputs are not permitted (got 0.99)",
        ),
        (
            "",
            {"SPECROUTE_LIMITS__MAX_NEW_TOKENS": "-5"},
            "limits.max_new_tokens: Input should be greater than 0 (got '-5')",
        ),
    ],
)
def test_settings_that_cannot_be_read_are_one_line_and_exit_2(
    tmp_path: Path, config_text: str | None, env: dict[str, str], says: str
) -> None:
    """Each printed a traceback from ``specroute serve`` before (only a field of the wrong
    type was caught)."""
    config = tmp_path / "sidecar.toml"
    if config_text is not None:
        config.write_text(config_text)
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", "serve", "--config", str(config), "--print-config"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("invalid settings: ") and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "errors.pydantic.dev" not in done.stderr


def test_a_config_file_named_in_the_environment_must_exist(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``$SPECROUTE_CONFIG`` names the TOML file when --config is not given; one that is
    not there was silently ignored (the defaults served instead, and the CLI's capture
    commands read the default state directory)."""
    monkeypatch.setenv("SPECROUTE_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(SettingsLoadError, match=r"missing.toml \(\$SPECROUTE_CONFIG\) does not"):
        load_settings(None)
    (tmp_path / "there.toml").write_text('policy = "ucb"\n')
    monkeypatch.setenv("SPECROUTE_CONFIG", str(tmp_path / "there.toml"))
    assert load_settings(None).policy == "ucb"


def test_client_commands_give_up_after_their_timeout_and_check_input_first(
    tmp_path: Path,
) -> None:
    """A sidecar that accepts connections and never answers (a stuck event loop) held
    every client command for ever; each now waits ``--timeout`` seconds. Input the client
    can check itself is a usage error (exit 2) before any call."""
    import socket
    import time

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        shown = CliRunner().invoke(
            build_app(), ["policy", "show", "--address", address, "--timeout", "1"]
        )
        assert shown.exit_code == 1 and "DEADLINE_EXCEEDED" in shown.output, shown.output
        assert time.monotonic() - started < 15
    bad_json = CliRunner().invoke(build_app(), ["policy", "set", "ucb", "--config", "{bad"])
    assert bad_json.exit_code == 2 and "--config" in bad_json.output, bad_json.output
    missing = CliRunner().invoke(
        build_app(), ["drafters", "register", "x", "/m", "--sample", str(tmp_path / "none")]
    )
    assert missing.exit_code == 2 and "--sample" in missing.output, missing.output


def test_register_sends_a_relative_path_made_absolute_on_the_client(
    sidecar: SidecarThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sidecar resolves a path against its own working directory and home: a relative
    one typed on the client (``./code-drafter`` from /models) meant something else there,
    and was refused as outside the model roots."""
    sent: list[str] = []

    async def register(spec: Any, announce: Any = None) -> Any:
        sent.append(spec.path)
        raise NotFoundError("recorded")

    monkeypatch.setattr(sidecar.service, "register_drafter", register)
    monkeypatch.chdir(tmp_path)
    address = sidecar.running.address
    for typed in ("./drafter", "~/drafter"):
        CliRunner().invoke(
            build_app(),
            ["drafters", "register", "x", typed, "--address", address, "--token", ADMIN_TOKEN],
        )
    assert sent == [str(tmp_path / "drafter"), str(Path("~/drafter").expanduser().resolve())]


def test_model_roots_from_the_environment_as_json_or_as_a_path_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPECROUTE_MODEL_ROOTS", "/models")  # was a SettingsError (not JSON)
    assert load_settings(None).model_roots == [Path("/models")]
    monkeypatch.setenv("SPECROUTE_MODEL_ROOTS", "/models:/more/models")
    assert load_settings(None).model_roots == [Path("/models"), Path("/more/models")]
    monkeypatch.setenv("SPECROUTE_MODEL_ROOTS", '["/models", "/other"]')
    assert load_settings(None).model_roots == [Path("/models"), Path("/other")]


def test_registry_round_trip_and_refusals(tmp_path: Path) -> None:
    store = SidecarStore(tmp_path)
    record = DrafterRecord(
        name="d1", kind="model", path="/m/d1", tasks=("code",), finetune_sample=("def f",)
    )
    stored = store.add_drafter(record)
    assert stored.created_unix > 0
    with pytest.raises(AlreadyExistsError):
        store.add_drafter(record)
    store.save_policy("thompson", 3, {"a": [1, 2]})
    store.save_policy("thompson", 5, {"a": [3]})
    store.close()

    reopened = SidecarStore(tmp_path)
    assert reopened.drafters() == [stored]
    latest = reopened.latest_policy("thompson")
    assert latest is not None and latest.version == 5 and latest.state == {"a": [3]}
    assert reopened.latest_policy("ucb") is None
    assert reopened.remove_drafter("d1") == stored
    with pytest.raises(NotFoundError):
        reopened.remove_drafter("d1")
    journal = reopened._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert journal == "wal"
    reopened.close()


def test_without_an_admin_token_admin_rpcs_are_closed(
    serving_world: ServingWorld,
    components: Components,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    settings = serving_world.settings(tmp_path_factory.mktemp("no-admin"), admin_token=None)
    running = SidecarThread(settings, components)
    try:
        for metadata in ((), ADMIN):
            with pytest.raises(grpc.RpcError) as refused:
                running.stub.RegisterDrafter(
                    pb.RegisterDrafterRequest(name="x", kind="ngram"), metadata=metadata
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "no admin_token" in str(refused.value.details())
        # The data plane stays open and the server keeps serving.
        assert running.stub.Route(pb.RouteRequest(text=PROMPT)).task_cluster
        assert "x" not in [
            d.name for d in running.stub.ListDrafters(pb.ListDraftersRequest()).drafters
        ]
    finally:
        running.stop()


@pytest.mark.parametrize(
    "setting",
    [
        {"limits": {"max_request_bytes": 2**40}},  # gRPC: OverflowError (a traceback) at start
        {"torch_threads": 100_000},  # torch: a segmentation fault on the first operation
        {"limits": {"generation_workers": 100_000}},
        {"auto_distill": {"cores": 100_000}},  # the distillation child's torch threads
        {"seed": -1},  # numpy and scikit-learn: ValueError when the classifier is trained
        {"seed": 2**40},
        # Served, and failed each connection to Redis later.
        {"pooling": {"tls_ca_file": "/nonexistent/ca.pem"}},
    ],
)
def test_a_setting_that_cannot_work_is_refused_when_read(setting: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Settings(**setting)


def test_the_largest_request_size_allowed_starts_a_grpc_server() -> None:
    async def start() -> None:
        server = grpc.aio.server(
            options=grpc_options(Settings(limits=Limits(max_request_bytes=MAX_C_INT)))
        )
        server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await server.stop(0)

    asyncio.run(start())


def _tls_files(directory: Path, names: str = "IP:127.0.0.1, DNS:localhost") -> Any:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI, which makes the test certificates, is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    return self_signed_tls(directory, names)


def test_a_certificate_for_another_name_is_checked_against_the_server_name_given(
    serving_world: ServingWorld, components: Components, tmp_path: Path
) -> None:
    """A sidecar whose certificate names it by DNS (sidecar.internal), reached at an IP
    address or through a load balancer: the client commands could not connect at all
    (the name checked was the address's). $SPECROUTE_TLS_SERVER_NAME names it."""
    files = _tls_files(tmp_path / "tls", names="DNS:sidecar.internal")
    tls = TlsSettings(cert_file=files.cert_file, key_file=files.key_file)
    running = SidecarThread(serving_world.settings(tmp_path / "state", tls=tls), components)
    try:
        command = ["drafters", "list", "--address", running.running.address]
        trusting = {"SPECROUTE_CA_FILE": str(files.ca_file)}
        by_address = CliRunner().invoke(build_app(), command, env=trusting)
        assert by_address.exit_code != 0 and "generic" not in by_address.output
        named = {**trusting, "SPECROUTE_TLS_SERVER_NAME": "sidecar.internal"}
        listed = CliRunner().invoke(build_app(), command, env=named)
        assert listed.exit_code == 0 and "generic" in listed.output, listed.output
        wrong = {**trusting, "SPECROUTE_TLS_SERVER_NAME": "other.internal"}
        assert CliRunner().invoke(build_app(), command, env=wrong).exit_code != 0
        alone = {"SPECROUTE_TLS_SERVER_NAME": "sidecar.internal", "SPECROUTE_CA_FILE": ""}
        refused = CliRunner().invoke(build_app(), command, env=alone)
        assert refused.exit_code == 2 and "SPECROUTE_CA_FILE is not" in refused.output
    finally:
        running.stop()


def test_routes_over_tls_and_refuses_plaintext(
    serving_world: ServingWorld, components: Components, tmp_path: Path
) -> None:
    files = _tls_files(tmp_path / "tls")
    tls = TlsSettings(cert_file=files.cert_file, key_file=files.key_file)
    running = SidecarThread(serving_world.settings(tmp_path / "state", tls=tls), components)
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=files.ca_file.read_bytes())
        with grpc.secure_channel(running.running.address, credentials) as channel:
            decision = RouterStub(channel).Route(pb.RouteRequest(text=PROMPT), timeout=30)
            assert decision.request_id
        with pytest.raises(grpc.RpcError) as plaintext:
            running.stub.Route(pb.RouteRequest(text=PROMPT), timeout=5)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
        # The CLI's client commands, given the CA, connect with TLS.
        listed = CliRunner().invoke(
            build_app(),
            ["drafters", "list", "--address", running.running.address],
            env={"SPECROUTE_CA_FILE": str(files.ca_file)},
        )
        assert listed.exit_code == 0 and "generic" in listed.output, listed.output
        # So does the replay's client, for a sidecar given by address.
        from benchmarks.replay.client import ReplayClient

        tls = ClientTls(files.ca_file.read_bytes())
        with ReplayClient(running.running.address, ADMIN_TOKEN, tls) as c:
            c.wait_ready(timeout_s=30)
            assert "generic" in {d.name for d in c.list_drafters()}
        missing = CliRunner().invoke(
            build_app(),
            [
                "replay",
                "--trace",
                "uniform",
                "--address",
                running.running.address,
                "--world",
                str(serving_world.world.root),
            ],
            env={"SPECROUTE_CA_FILE": str(tmp_path / "absent.pem"), "SPECROUTE_ADMIN_TOKEN": "x"},
        )
        assert missing.exit_code == 2 and "error: SPECROUTE_CA_FILE:" in missing.output, (
            missing.output
        )
        # The HTTP fronts and the metrics speak TLS too: no port stays plaintext.
        trusted = ssl.create_default_context(cafile=str(files.ca_file))
        for port, path in (
            (running.running.http_port, "/v1/models"),
            (running.running.metrics_port, "/metrics"),
        ):
            with urllib.request.urlopen(
                f"https://127.0.0.1:{port}{path}", context=trusted, timeout=30
            ) as reply:
                assert reply.status == 200
            with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30).read()
    finally:
        running.stop()


def test_a_renewed_certificate_is_served_without_a_restart(
    serving_world: ServingWorld,
    components: Components,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The certificate and key were read once at start: a certificate manager that renewed
    the files (cert-manager, a secret volume) left the sidecar serving the old certificate
    until it expired and every client failed. New connections now get the files' current
    pair on every port; a new pair that does not load is logged and the last good one
    keeps serving."""
    old, new = _tls_files(tmp_path / "old"), _tls_files(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.crt", live / "server.key"

    def install(cert_from: Path, key_from: Path) -> None:
        key.write_bytes(key_from.read_bytes())
        cert.write_bytes(cert_from.read_bytes())

    def routes_trusting(ca: Path) -> bool:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        with grpc.secure_channel(running.running.address, credentials) as channel:
            try:
                RouterStub(channel).Route(pb.RouteRequest(text=PROMPT), timeout=10)
            except grpc.RpcError:
                return False
        return True

    def https_trusting(ca: Path) -> bool:
        trusted = ssl.create_default_context(cafile=str(ca))
        url = f"https://127.0.0.1:{running.running.http_port}/v1/models"
        try:
            with urllib.request.urlopen(url, context=trusted, timeout=10) as reply:
                return bool(reply.status == 200)
        except urllib.error.URLError:
            return False

    install(old.cert_file, old.key_file)
    tls = TlsSettings(cert_file=cert, key_file=key, reload_interval_s=0.2)
    running = SidecarThread(serving_world.settings(tmp_path / "state", tls=tls), components)
    try:
        assert routes_trusting(old.ca_file) and https_trusting(old.ca_file)
        install(new.cert_file, new.key_file)  # renewed: another CA signed it
        # A new gRPC connection looks at the files; the HTTP ports every reload_interval_s.
        assert routes_trusting(new.ca_file) and not routes_trusting(old.ca_file)
        deadline = time.monotonic() + 30
        while not https_trusting(new.ca_file):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert not https_trusting(old.ca_file)
        with caplog.at_level(logging.INFO, logger="router"):
            install(old.cert_file, new.key_file)  # a pair that does not belong together
            assert routes_trusting(new.ca_file)
            time.sleep(0.5)  # the HTTP ports have looked at the files too
            assert https_trusting(new.ca_file)
        assert "the previous certificate keeps serving" in caplog.text
    finally:
        running.stop()


def test_tls_files_that_do_not_make_a_pair_are_refused_before_serving(tmp_path: Path) -> None:
    """A certificate without its key was accepted and served plaintext; files that do not
    load, or a certificate with another key, stopped the start with gRPC's "Failed to
    bind to address" after the models had loaded."""
    files = _tls_files(tmp_path)
    with pytest.raises(ValidationError, match="set together"):
        Settings(tls=TlsSettings.model_validate({"cert_file": files.cert_file}))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("garbage")
    ca_key = tmp_path / "ca.key"  # the CA's key: not the certificate's
    for cert, key in (
        (garbage, files.key_file),
        (files.cert_file, garbage),
        (files.cert_file, ca_key),
    ):
        with pytest.raises(ValueError, match="tls: cannot use"):
            ServerCertificate.from_settings(TlsSettings(cert_file=cert, key_file=key))
    assert ServerCertificate.from_settings(
        TlsSettings(cert_file=files.cert_file, key_file=files.key_file)
    )


def test_whitespace_around_a_token_is_dropped() -> None:
    """A token from a Kubernetes secret with its trailing newline was kept as it was:
    no client can send the newline (gRPC metadata cannot carry it, the sidecar strips
    what a client presents), so every call needing it was refused."""
    from router.settings import Settings

    settings = Settings(admin_token="secret\n", data_token="  data ")
    assert settings.admin_token is not None and settings.data_token is not None
    assert settings.admin_token.get_secret_value() == "secret"
    assert settings.data_token.get_secret_value() == "data"
