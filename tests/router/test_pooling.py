"""Replicas that pool what they learn through a real Redis (router.pooling), end to end:
two or three in-process sidecars on the tiny world, real gRPC on free ports, one
``redis-server`` for the module (each test on its own stream names); one TLS-only
``redis-server`` with a password for the ``rediss://`` tests, and ``specroute serve``
subprocesses for the SIGKILL test."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from pydantic import SecretStr

from router.pb import router_pb2 as pb
from router.pb import router_pb2_grpc
from router.pooling.entries import EntrySigner
from router.settings import PoolingSettings
from tests.router.conftest import ADMIN, ADMIN_TOKEN, ServingWorld, SidecarThread, self_signed_tls

if TYPE_CHECKING:
    from benchmarks.replicas.redis_server import RedisClusterServers, RedisServer
    from router.launch import LaunchedSidecar

SECRET = "fleet-secret"
TLS_PASSWORD = "tls-redis-password"
pytestmark = pytest.mark.e2e


def _redis_binary() -> str:
    """The redis-server binary (the test is skipped where there is none)."""
    from benchmarks.replicas.redis_server import redis_binary

    binary = redis_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (make install installs it as root)")
    return binary


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from benchmarks.replicas.redis_server import RedisServer

    _redis_binary()
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def tls_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """``redis-server`` on TLS only (``--port 0 --tls-port``), with a password."""
    from benchmarks.replicas.redis_server import RedisServer, redis_tls_supported

    binary = _redis_binary()
    if not redis_tls_supported(binary):
        pytest.skip(f"{binary} was built without TLS (tls-port is a bad directive)")
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI, which makes the test certificates, is not installed")
    directory = tmp_path_factory.mktemp("redis-tls")
    tls = self_signed_tls(directory)
    with RedisServer(directory, password=TLS_PASSWORD, tls=tls) as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """Three redis-servers in cluster mode, the hash slots split among them."""
    from benchmarks.replicas.redis_server import RedisClusterServers

    _redis_binary()
    with RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


class Fleet:
    """Sidecars of one test, sharing the module's Redis on this test's own streams."""

    def __init__(
        self,
        serving_world: ServingWorld,
        components: Any,
        redis_url: str,
        tmp: Path,
        tls_ca_file: Path | None = None,
    ) -> None:
        self.serving_world = serving_world
        self.components = components
        self.tmp = tmp
        self.prefix = f"test-{uuid.uuid4().hex[:8]}"
        self.pooling = PoolingSettings(
            enabled=True,
            redis_url=redis_url,
            tls_ca_file=tls_ca_file,
            secret=SECRET,
            outcome_stream=f"{self.prefix}:outcomes",
            registry_stream=f"{self.prefix}:drafters",
            replay_timeout_s=2.0,
            reconnect_max_s=0.2,
        )
        self.sidecars: list[SidecarThread] = []

    def start(self, name: str, components: Any = None, **overrides: Any) -> SidecarThread:
        pooling = overrides.pop("pooling", self.pooling)
        settings = self.serving_world.settings(self.tmp / name, pooling=pooling, **overrides)
        sidecar = SidecarThread(settings, components or self.components)
        self.sidecars.append(sidecar)
        return sidecar

    @contextlib.contextmanager
    def serve(self, name: str, state_dir: Path, config: Path) -> Iterator[ServeProcess]:
        """``specroute serve`` on this fleet's Redis and streams, as a subprocess."""
        from benchmarks.replicas.fleet import PoolingTarget
        from router.launch import launch_sidecar

        url = self.pooling.redis_url.get_secret_value()
        with (
            launch_sidecar(
                state_dir=state_dir,
                config_file=config,
                admin_token=ADMIN_TOKEN,
                http=False,
                env=PoolingTarget(url, SECRET, self.prefix).env(),
                log_path=self.tmp / f"{name}.log",
            ) as launched,
            grpc.insecure_channel(launched.grpc_address) as channel,
        ):
            yield ServeProcess(launched, router_pb2_grpc.RouterStub(channel))

    def stop(self) -> None:
        for sidecar in self.sidecars:
            sidecar.stop()


@dataclasses.dataclass
class ServeProcess:
    """A ``specroute serve`` subprocess of a fleet and its client."""

    launched: LaunchedSidecar
    stub: router_pb2_grpc.RouterStub

    def counters(self) -> dict[str, float]:
        """Its pooling counters (published, applied, dropped, buffered), from /metrics."""
        from benchmarks.replicas.fleet import scrape_counters

        return scrape_counters(self.launched.metrics_url or "")


@pytest.fixture
def fleet(
    serving_world: ServingWorld, components: Any, redis_server: Any, tmp_path: Path
) -> Iterator[Fleet]:
    started = Fleet(serving_world, components, redis_server.url, tmp_path)
    yield started
    started.stop()


@pytest.fixture
def tls_fleet(
    serving_world: ServingWorld, components: Any, tls_redis_server: RedisServer, tmp_path: Path
) -> Iterator[Fleet]:
    """A fleet configured with ``rediss://:password@127.0.0.1:PORT`` and the test CA."""
    assert tls_redis_server.tls is not None
    url, ca_file = tls_redis_server.url, tls_redis_server.tls.ca_file
    started = Fleet(serving_world, components, url, tmp_path, tls_ca_file=ca_file)
    yield started
    started.stop()


def metric(sidecar: SidecarThread, name: str, **labels: str) -> float:
    value = sidecar.service.metrics.registry.get_sample_value(name, labels or None)
    return float(value or 0.0)


def published(sidecar: SidecarThread) -> float:
    return metric(sidecar, "specroute_pooled_outcomes_published_total")


def applied(sidecar: SidecarThread) -> float:
    return metric(sidecar, "specroute_pooled_outcomes_applied_total")


def wait_until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def context_requests(sidecar: SidecarThread | ServeProcess, cluster: str) -> int:
    state = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest())
    return sum(c.requests for c in state.contexts if c.task_cluster == cluster)


def route_and_report(
    sidecar: SidecarThread | ServeProcess, task: str, steps: int = 6
) -> pb.RouteDecision:
    """Route a prompt with a task hint and report a run where every draft was accepted."""
    decision = sidecar.stub.Route(pb.RouteRequest(text=f"{task} prompt", task_hint=task))
    k = decision.draft_length
    sidecar.stub.Report(
        pb.RouteOutcome(
            request_id=decision.request_id,
            drafted_per_step=[k] * steps,
            accepted_per_step=[k] * steps,
            draft_time_s=0.001 * steps,
            verify_time_s=0.01 * steps,
        )
    )
    return decision


def test_report_on_one_replica_changes_the_others_policy(fleet: Fleet) -> None:
    a, b = fleet.start("a"), fleet.start("b")
    assert context_requests(b, "math") == 0
    for _ in range(3):
        route_and_report(a, "math")
    # a's published counter moves after Redis took the entry, so b may apply it first.
    wait_until(lambda: context_requests(b, "math") == 3 and published(a) == 3 and applied(b) == 3)
    # B's own outcomes flow back to A, which never applies its own twice.
    route_and_report(b, "code")
    wait_until(lambda: context_requests(a, "code") == 1)
    assert applied(a) == 1 and context_requests(a, "math") == 3


def test_replicas_pool_through_a_redis_cluster(
    serving_world: ServingWorld,
    components: Any,
    redis_cluster: RedisClusterServers,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given one node of a Redis Cluster (as a managed cluster's endpoint), with
    ``cluster = true`` the replicas pool through it, each stream sent to the node holding
    its slot. Without it every command was answered MOVED and nothing was ever pooled,
    logged as an unexplained refusal: the log now says what to set."""
    fleet = Fleet(serving_world, components, redis_cluster.url, tmp_path)
    other_node = redis_cluster.node_url(fleet.pooling.outcome_stream, holding=False)
    on_cluster = {"redis_url": SecretStr(other_node), "cluster": True}
    clustered = fleet.pooling.model_copy(update=on_cluster)
    try:
        a, b = fleet.start("a", pooling=clustered), fleet.start("b", pooling=clustered)
        for _ in range(2):
            route_and_report(a, "math")
        wait_until(lambda: context_requests(b, "math") == 2 and published(a) == 2)
        assert applied(b) == 2
        unclustered = fleet.pooling.model_copy(update={"redis_url": SecretStr(other_node)})
        with caplog.at_level(logging.WARNING, logger="router.pooling.link"):
            c = fleet.start("c", pooling=unclustered)
            route_and_report(c, "math")
            wait_until(lambda: "node of a Redis Cluster" in caplog.text)
        assert "set pooling.cluster = true" in caplog.text and published(c) == 0
    finally:
        fleet.stop()


def test_a_cluster_with_a_database_other_than_0_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="a Redis Cluster has database 0 only"):
        PoolingSettings(redis_url="redis://node:6379/2", cluster=True)
    assert PoolingSettings(redis_url="redis://node:6379", cluster=True).cluster


@pytest.mark.parametrize(
    ("url", "told"),
    [
        ("redis://:hunter2@node:notaport/0", "Port could not be cast to integer"),
        ("http://node:6379/0", "Redis URL must specify one of the following schemes"),
        ("redis://:hunter2@node:6379/abc", "the database must be a number, not 'abc'"),
    ],
)
def test_a_redis_url_redis_py_would_refuse_stops_the_start_in_one_line(
    tmp_path: Path, url: str, told: str
) -> None:
    """It failed once every model had loaded, exit 1 and the setting unnamed, or (a
    database that is not a number) served database 0 without a word."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "SPECROUTE_STATE_DIR": str(tmp_path / "state"),
        "SPECROUTE_POOLING__ENABLED": "true",
        "SPECROUTE_POOLING__SECRET": "s3cret",
        "SPECROUTE_POOLING__REDIS_URL": url,
    }
    command = [sys.executable, "-m", "router.cli", "serve", "--port", "0"]
    done = subprocess.run(
        [*command, "--http-port", "-1", "--metrics-port", "-1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert f"invalid settings: pooling: redis_url: {told}" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout and "Traceback" not in done.stderr
    assert PoolingSettings(redis_url=url).redis_url  # checked only with pooling enabled


def test_generate_and_counterfactuals_are_pooled(fleet: Fleet, serving_world: ServingWorld) -> None:
    from tests.router.conftest import COMPLETION_PROMPT

    a, b = fleet.start("a"), fleet.start("b")
    request = pb.GenerateRequest(
        text=COMPLETION_PROMPT, task_hint="qa", max_new_tokens=24, force_drafter="generic"
    )
    request.force_draft_length = 3
    list(a.stub.Generate(request))

    def qa_arms(sidecar: SidecarThread) -> dict[str, tuple[float, float, int]]:
        contexts = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest()).contexts
        return {
            arm.drafter: (arm.alpha, arm.beta, arm.decisions)
            for context in contexts
            if context.task_cluster == "qa"
            for arm in context.arms
        }

    def scored() -> float:
        return metric(a, "specroute_reports_total", source="counterfactual")

    # The run itself, then a counterfactual score per other drafter (greedy request), off
    # the request path: wait until A has scored and B has applied all A published.
    wait_until(lambda: scored() >= 1 and published(a) == 1 + scored() == applied(b))
    wait_until(lambda: qa_arms(b) == qa_arms(a))
    arms = qa_arms(b)
    assert arms["generic"][2] == 1
    touched = [d for d, (alpha, beta, _) in arms.items() if d != "generic" and alpha + beta > 2]
    assert touched  # counterfactual scores of other drafters reached B


def test_forged_entries_are_dropped_and_counted(fleet: Fleet, redis_server: Any) -> None:
    import redis

    b = fleet.start("b")
    version = b.stub.GetPolicyState(pb.GetPolicyStateRequest()).version
    payload = {
        "format": 1,
        "replica": "intruder",
        "seq": 1,
        "kind": "outcome",
        "cluster": "forged",
        "bucket": 0,
        "drafter": "generic",
        "k": 8,
        "drafted": [8] * 50,
        "accepted": [8] * 50,
        "tokens": 450,
    }
    data = json.dumps(payload).encode()
    right = EntrySigner(SECRET.encode())
    wrong = EntrySigner(b"not-the-secret")
    client = redis.Redis.from_url(redis_server.url)
    stream = fleet.pooling.outcome_stream
    client.xadd(stream, {"payload": data})  # unsigned
    client.xadd(stream, {"payload": data, "sig": wrong.signature(data)})
    client.xadd(stream, {"payload": data + b" ", "sig": right.signature(data)})
    malformed = {**payload, "accepted": [9] * 50}  # more accepted than drafted
    client.xadd(stream, right.fields(malformed))  # type: ignore[arg-type]
    client.xadd(stream, right.fields({**payload, "seq": "1"}))  # type: ignore[arg-type]
    client.xadd(stream, {"payload": b"{not json", "sig": right.signature(b"{not json")})
    client.xadd(b"%b" % fleet.pooling.registry_stream.encode(), {"payload": b"{}", "sig": b"00"})
    client.close()

    def rejected(reason: str) -> float:
        return metric(b, "specroute_pooled_entries_rejected_total", reason=reason)

    wait_until(lambda: rejected("malformed") == 3 and rejected("bad_signature") == 3)
    assert rejected("unsigned") == 1
    state = b.stub.GetPolicyState(pb.GetPolicyStateRequest())
    assert state.version == version
    assert not [c for c in state.contexts if c.task_cluster == "forged"]
    assert applied(b) == 0
    # A signed entry of another replica is applied: the reader lived through the forgeries.
    good = fleet.pooling.outcome_stream
    client = redis.Redis.from_url(redis_server.url)
    client.xadd(good, right.fields({**payload, "cluster": "math"}))  # type: ignore[arg-type]
    client.close()
    wait_until(lambda: applied(b) == 1)


def names(sidecar: SidecarThread | ServeProcess) -> set[str]:
    return {d.name for d in sidecar.stub.ListDrafters(pb.ListDraftersRequest()).drafters}


def test_drafter_registered_on_one_replica_is_used_by_the_others(
    fleet: Fleet, serving_world: ServingWorld
) -> None:
    a, b = fleet.start("a"), fleet.start("b")
    # C cannot load it: its model roots lack the directory (as if missing on that node).
    world_only = dataclasses.replace(fleet.components, model_roots=(serving_world.world.root,))
    c = fleet.start("c", components=world_only)
    a.stub.RegisterDrafter(
        pb.RegisterDrafterRequest(
            name="shared-spare", kind="model", path=str(serving_world.spare_dir), tasks=["math"]
        ),
        metadata=ADMIN,
    )
    wait_until(lambda: "shared-spare" in names(b), timeout_s=60)
    request = pb.GenerateRequest(
        text="2 + 2 =", task_hint="math", max_new_tokens=8, force_drafter="shared-spare"
    )
    request.force_draft_length = 2
    chunks = list(b.stub.Generate(request))
    assert chunks[0].decision.drafter == "shared-spare"
    wait_until(
        lambda: (
            [u.name for u in c.stub.ListDrafters(pb.ListDraftersRequest()).unavailable]
            == ["shared-spare"]
        ),
        timeout_s=60,
    )
    missing = c.stub.ListDrafters(pb.ListDraftersRequest()).unavailable[0]
    assert "root" in missing.error and missing.path == str(serving_world.spare_dir)
    assert metric(c, "specroute_shared_drafters_unavailable") == 1
    assert "shared-spare" not in names(c)
    c.stub.Route(pb.RouteRequest(text="still serving", task_hint="math"))
    # Removal reaches every replica too, and clears C's unavailable entry.
    a.stub.RemoveDrafter(pb.RemoveDrafterRequest(name="shared-spare"), metadata=ADMIN)
    wait_until(lambda: "shared-spare" not in names(b))
    wait_until(lambda: not c.stub.ListDrafters(pb.ListDraftersRequest()).unavailable)


def test_drafters_are_announced_again_when_redis_comes_back_without_its_data(
    fleet: Fleet, serving_world: ServingWorld, redis_server: Any
) -> None:
    """A Redis restarted without its data lost the registry stream: replicas kept the
    drafters they served, but one started since never heard of them and never served
    them (the docs said a drafter registered on one is registered on all)."""
    a, b = fleet.start("a"), fleet.start("b")
    spec = pb.RegisterDrafterRequest(
        name="lost-spare", kind="model", path=str(serving_world.spare_dir), tasks=["math"]
    )
    a.stub.RegisterDrafter(spec, metadata=ADMIN)
    # B read the entry and loaded the drafter: A's reader, blocked on the same stream,
    # read it (its own) as it came.
    wait_until(lambda: "lost-spare" in names(b), timeout_s=60)
    redis_server.restart()  # no persistence: the streams are gone
    try:
        c = fleet.start("c")  # after the loss
        wait_until(lambda: "lost-spare" in names(c), timeout_s=60)
    finally:
        a.stub.RemoveDrafter(pb.RemoveDrafterRequest(name="lost-spare"), metadata=ADMIN)


def test_redis_down_mid_run_buffers_and_publishes_when_it_returns(
    fleet: Fleet, redis_server: Any
) -> None:
    a, b = fleet.start("a"), fleet.start("b")
    route_and_report(a, "chat")
    wait_until(lambda: applied(b) == 1)
    redis_server.stop()
    try:
        for _ in range(5):  # every request still succeeds, A keeps learning locally
            route_and_report(a, "chat")
        assert context_requests(a, "chat") == 6
        wait_until(lambda: metric(a, "specroute_pooling_connected") == 0)
        assert metric(a, "specroute_pooled_outcomes_buffered") == 5
    finally:
        redis_server.start()  # the same port; no persistence: the streams start empty
    wait_until(lambda: published(a) == 6 and applied(b) == 6, timeout_s=30)
    assert context_requests(b, "chat") == 6
    assert metric(a, "specroute_pooled_outcomes_dropped_total") == 0
    assert metric(a, "specroute_pooled_outcomes_buffered") == 0


def test_new_replica_replays_history_before_serving(fleet: Fleet) -> None:
    a = fleet.start("a")
    for task in ("math", "math", "code", "rag"):
        route_and_report(a, task)
    wait_until(lambda: published(a) == 4)
    c = fleet.start("c")  # returns once health says SERVING
    assert applied(c) == 4
    assert context_requests(c, "math") == 2 and context_requests(c, "rag") == 1


def test_restart_applies_only_what_the_snapshot_lacks(fleet: Fleet) -> None:
    """A restarted replica restores its snapshot and replays the stream beyond the
    snapshot's cursor: nothing twice, nothing it learned from the others lost."""
    a, b = fleet.start("a"), fleet.start("b")
    for _ in range(2):
        route_and_report(b, "qa")
    wait_until(lambda: applied(a) == 2)
    a.stop()  # final snapshot: holds B's two outcomes and the cursor past them
    fleet.sidecars.remove(a)
    route_and_report(b, "qa")  # learned while A is down
    wait_until(lambda: published(b) == 3)
    again = fleet.start("a")  # same state dir
    assert context_requests(again, "qa") == 3
    assert applied(again) == 1


def test_unreachable_redis_at_start_still_serves(fleet: Fleet, serving_world: ServingWorld) -> None:

    nowhere = PoolingSettings.model_validate(
        {
            **fleet.pooling.model_dump(),
            "redis_url": "redis://127.0.0.1:1/0",  # nothing listens there
            "replay_timeout_s": 0.5,
        }
    )
    lone = fleet.start("lone", pooling=nowhere)
    route_and_report(lone, "math")
    assert context_requests(lone, "math") == 1
    wait_until(lambda: metric(lone, "specroute_pooled_outcomes_buffered") == 1)


def test_replicas_pool_through_tls_redis_with_a_password(tls_fleet: Fleet) -> None:
    assert tls_fleet.pooling.redis_url.get_secret_value().startswith(
        f"rediss://:{TLS_PASSWORD}@127.0.0.1:"
    )
    a, b = tls_fleet.start("a"), tls_fleet.start("b")
    for _ in range(3):
        route_and_report(a, "math")
    # a's published counter moves after Redis took the entry, so b may apply it first.
    wait_until(lambda: context_requests(b, "math") == 3 and published(a) == 3 and applied(b) == 3)
    assert metric(a, "specroute_pooling_connected") == metric(b, "specroute_pooling_connected") == 1


def test_tls_replica_with_a_wrong_password_or_without_the_ca_serves_alone(
    tls_fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="router.pooling")
    url = tls_fleet.pooling.redis_url.get_secret_value()
    refused: dict[str, dict[str, Any]] = {
        "wrong-password": {"redis_url": SecretStr(url.replace(TLS_PASSWORD, "not-it"))},
        "no-ca": {"tls_ca_file": None},  # the system's CAs do not know the test CA
    }
    insider = tls_fleet.start("insider")
    outsiders = [
        tls_fleet.start(
            name,
            pooling=tls_fleet.pooling.model_copy(update={**changes, "replay_timeout_s": 0.5}),
        )
        for name, changes in refused.items()
    ]
    for outsider in outsiders:  # every request still succeeds, learned locally
        route_and_report(outsider, "math")
        assert context_requests(outsider, "math") == 1
        wait_until(lambda o=outsider: metric(o, "specroute_pooled_outcomes_buffered") == 1)
    # Redis itself is fine: the insider, with the right settings, publishes meanwhile.
    route_and_report(insider, "code")
    wait_until(lambda: published(insider) == 1)
    time.sleep(1.0)  # several reconnect attempts (reconnect_max_s = 0.2)
    for outsider in outsiders:
        assert published(outsider) == 0 and applied(outsider) == 0
        assert metric(outsider, "specroute_pooled_outcomes_buffered") == 1
        assert metric(outsider, "specroute_pooling_connected") == 0
        assert context_requests(outsider, "code") == 0
    assert applied(insider) == 0 and context_requests(insider, "math") == 0
    # Each says why in its log.
    assert "username-password" in caplog.text and "CERTIFICATE_VERIFY_FAILED" in caplog.text


def pooled_view(
    sidecar: SidecarThread | ServeProcess,
) -> dict[tuple[str, int], tuple[int, list[tuple[str, float, float, int]]]]:
    """Per context: requests, and each arm's acceptance posterior and decisions (what
    pooled outcomes change; the fields that depend on local costs are left out)."""
    state = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest())
    return {
        (context.task_cluster, context.length_bucket): (
            context.requests,
            sorted((arm.drafter, arm.alpha, arm.beta, arm.decisions) for arm in context.arms),
        )
        for context in state.contexts
    }


def test_sigkilled_serve_replica_restarts_with_everything_the_others_learned(
    fleet: Fleet, serving_world: ServingWorld, tmp_path: Path
) -> None:
    """``specroute serve`` B applies what A learns and registers; B is killed with SIGKILL
    (no final snapshot, nothing flushed) and started again on the same state dir. The new
    B has every outcome A published, before the kill and while B was down, each once
    (its last periodic snapshot holds part of them, with the stream cursor), the outcome
    B itself published, and A's drafters."""
    from tests.router.test_durability import _latest_snapshot_version

    a = fleet.start("a")
    state_dir = tmp_path / "b-state"
    config = serving_world.toml(tmp_path / "b.toml", snapshot_interval_s=0.3)
    spare = pb.RegisterDrafterRequest(
        name="pooled-spare", kind="model", path=str(serving_world.spare_dir), tasks=["math"]
    )
    with fleet.serve("b", state_dir, config) as b:
        for _ in range(3):
            route_and_report(a, "math")
        a.stub.RegisterDrafter(spare, metadata=ADMIN)
        route_and_report(b, "rag")  # B's own, published before the kill
        wait_until(
            lambda: (
                b.counters()["applied"] == 3
                and b.counters()["published"] == 1
                and "pooled-spare" in names(b)
            ),
            timeout_s=60,
        )
        version = b.stub.GetPolicyState(pb.GetPolicyStateRequest()).version
        wait_until(lambda: _latest_snapshot_version(state_dir) == version)
        for _ in range(2):  # after that snapshot: maybe in a later one, maybe in none
            route_and_report(a, "code")
        wait_until(lambda: b.counters()["applied"] == 5)
        before_kill = pooled_view(b)
        b.launched.process.send_signal(signal.SIGKILL)
        assert b.launched.process.wait(30) == -signal.SIGKILL
    route_and_report(a, "qa")  # learned while B is down
    a.stub.RegisterDrafter(
        pb.RegisterDrafterRequest(name="pooled-ngram", kind="ngram"), metadata=ADMIN
    )
    wait_until(lambda: published(a) == 6)
    with fleet.serve("b-again", state_dir, config) as again:  # SERVING: caught up
        assert {"pooled-spare", "pooled-ngram"} <= names(again)
        restored = pooled_view(again)
        assert {cluster: requests for (cluster, _), (requests, _) in restored.items()} == {
            "math": 3,
            "code": 2,
            "rag": 1,
            "qa": 1,
        }
        # Apart from qa and the drafter registered while it was down, B is back as it was.
        assert {
            context: (requests, [arm for arm in arms if arm[0] != "pooled-ngram"])
            for context, (requests, arms) in restored.items()
            if context[0] != "qa"
        } == before_kill
        assert restored == pooled_view(a)
        # The snapshot held math and rag: only what came after it was applied again.
        assert 1 <= again.counters()["applied"] <= 3


def test_a_reader_rewinds_a_stream_that_redis_lost_and_wrote_anew(redis_server: Any) -> None:
    """A Redis that comes back without its data, its clock behind the old one's, gives new
    entries ids below the last one a reader saw: they were never read. After a failure
    the reader rewinds such a stream (and a lost one) to its start."""
    import asyncio

    from router.metrics import create_metrics
    from router.pooling.link import RedisLink
    from router.pooling.streams import StreamReader

    settings = PoolingSettings(redis_url=SecretStr(redis_server.url))
    stream = f"rewind-{uuid.uuid4().hex[:8]}"

    async def scenario() -> list[str]:
        link = RedisLink(settings, create_metrics())
        reader = StreamReader(link, stream)
        await link.client.xadd(stream, {"n": "old"}, id="9999999999999-0")  # a clock ahead
        assert [e for e, _ in await reader.read_batch(None)] == ["9999999999999-0"]
        reader.last_id = "9999999999999-0"
        await link.client.delete(stream)  # Redis lost its data
        assert await reader.rewind_if_recreated()  # gone: read from the start
        reader.last_id = "9999999999999-0"
        await link.client.xadd(stream, {"n": "new"})  # written anew, today's clock
        assert await reader.rewind_if_recreated()
        read = [e for e, _ in await reader.read_batch(None)]
        reader.last_id = read[-1]
        assert not await reader.rewind_if_recreated()  # caught up: nothing to do
        await link.close()
        return read

    assert len(asyncio.run(scenario())) == 1


def test_a_redis_out_of_memory_is_a_refusal_said_once_not_an_outage(
    redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis at its ``maxmemory`` (no eviction) refuses every XADD while reads go on. That
    was logged as "unreachable" by the writer and "reachable" by the reader in turn, at
    every retry, and ``specroute_pooling_connected`` flapped with them. Now one line says
    Redis refused (and why), the link stays connected, the outcome stays buffered, and
    the first write that goes through again says so."""
    import asyncio

    from router.metrics import create_metrics
    from router.pooling.link import RedisLink
    from router.pooling.streams import StreamReader, StreamWriter

    settings = PoolingSettings(redis_url=SecretStr(redis_server.url))
    stream = f"oom-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        link = RedisLink(settings, create_metrics())
        writer = StreamWriter(link, EntrySigner(b"secret"), stream, retention=100, capacity=10)
        reader = StreamReader(link, stream)
        writer.append({"n": 1})
        await link.client.config_set("maxmemory-policy", "noeviction")
        await link.client.config_set("maxmemory", "1")
        try:
            for _ in range(3):
                assert not await writer.publish_once()
                assert await reader.read_batch(None) == []  # reads go on
        finally:
            await link.client.config_set("maxmemory", "0")
        assert link.connected and writer.pending == 1
        assert await writer.publish_once()
        assert writer.pending == 0
        await link.close()

    with caplog.at_level(logging.INFO, logger="router.pooling"):
        asyncio.run(scenario())
    refused = [r.getMessage() for r in caplog.records if "refused a command" in r.getMessage()]
    assert len(refused) == 1 and "maxmemory" in refused[0]
    assert "unreachable" not in caplog.text
    assert "takes writes again" in caplog.text
