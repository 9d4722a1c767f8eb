"""Pooling parts without a world or a Redis: signed entries, the outcome log under the
policy holder (dedupe, the snapshot's cursor, costs kept local), the bounded buffer, and
the refusal to pool unsigned."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from router.metrics import create_metrics
from router.policy.base import Context, Decision, Outcome
from router.policy_holder import LOG_CURSOR_KEY, PolicyHolder
from router.pooling.entries import (
    EntryRejected,
    EntrySigner,
    Origin,
    SharedOutcome,
    outcome_from_payload,
    outcome_payload,
    registration_from_payload,
)
from router.pooling.link import RedisLink
from router.pooling.outcomes import OutcomePool
from router.pooling.streams import StreamReader, StreamWriter
from router.settings import PoolingSettings, Settings
from router.store import SidecarStore

SIGNER = EntrySigner(b"secret")
MATH = Context("math", 0)


def shared(writer: str, number: int, **changes: Any) -> dict[str, Any]:
    outcome = SharedOutcome(
        Origin(writer, number), "outcome", "math", 0, "generic", 4, (4, 4, 4), (4, 2, 4), 13
    )
    return {**outcome_payload(outcome), **changes}


def test_signed_entry_round_trip_and_every_refusal() -> None:
    fields = SIGNER.fields(shared("b", 1))
    assert outcome_from_payload(SIGNER.verified(fields), 32).accepted == (4, 2, 4)
    reasons = {
        "unsigned": {"payload": fields["payload"]},
        "bad_signature": {"payload": fields["payload"], "sig": b"0" * 64},
        "malformed": {"sig": fields["sig"]},
    }
    for reason, forged in reasons.items():
        with pytest.raises(EntryRejected) as caught:
            SIGNER.verified(forged)
        assert caught.value.reason == reason
    other = EntrySigner(b"another secret").fields(shared("b", 1))
    with pytest.raises(EntryRejected, match="bad_signature"):
        SIGNER.verified(other)
    garbage = b"[1, 2"
    with pytest.raises(EntryRejected, match="malformed"):
        SIGNER.verified({"payload": garbage, "sig": SIGNER.signature(garbage).encode()})


def test_dropped_entries_are_logged_once_a_minute_per_reason_and_all_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica with another secret made every other replica log a line per entry: each
    of its requests, and the whole retained stream (up to retention, 100,000) at a start."""
    harness = Harness(tmp_path, "a-1")
    other = EntrySigner(b"another secret")
    forged = [(f"{i}-0", other.fields(shared("b-1", i))) for i in range(1, 51)]
    unsigned = [("99-0", {"payload": SIGNER.fields(shared("c-1", 1))["payload"]})]
    with caplog.at_level(logging.WARNING, logger="router.pooling.outcomes"):
        harness.pool.handle(forged + unsigned)
        harness.pool.handle([("100-0", other.fields(shared("b-1", 51)))])
    lines = [r.getMessage() for r in caplog.records if "dropped outcome entry" in r.getMessage()]
    assert len(lines) == 2, lines  # one per reason
    assert "reason=bad_signature" in lines[0] and "reason=unsigned" in lines[1]
    assert harness.pool.rejected == 52 and harness.pool.applied == 0


@pytest.mark.parametrize(
    "changes",
    [
        {"accepted": [5, 0, 0]},  # more accepted than drafted
        {"drafter": "none"},  # "none" is k = 0 only
        {"k": 33},  # above the largest draft length
        {"seq": True},  # a bool is not a sequence number
        {"seq": 0},
        {"bucket": -1},
        {"drafted": [4, 4]},  # lists that do not pair up
        {"kind": "posterior"},
        {"format": 2},
        {"replica": ""},
        {"cluster": 7},
        {"requested": [4, 4]},  # not one per step
        {"requested": [4, 2, 4]},  # a step drafting more than it asked for
        {"requested": [4, 5, 4]},  # asking for more than k
        {"scored_drafted": [4, 4, 4]},  # drafted counts of a score on an outcome
    ],
)
def test_malformed_outcomes_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(EntryRejected) as caught:
        outcome_from_payload(shared("b", 1, **changes), 32)
    assert caught.value.reason == "malformed"


def counterfactual(**changes: Any) -> dict[str, Any]:
    score = SharedOutcome(
        Origin("b", 1),
        "counterfactual",
        "math",
        0,
        "ngram",
        4,
        (),
        (4, 0, 2),
        0,
        scored_drafted=(4, 0, 4),
    )
    return {**outcome_payload(score), **changes}


def test_a_scores_drafted_counts_travel_and_an_older_reader_ignores_them() -> None:
    """A lookup's counterfactual score carries its drafted counts under a key of its own:
    a replica of the build before reads the entry as a score of accepts alone."""
    read = outcome_from_payload(json.loads(json.dumps(counterfactual())), 32)
    assert read.scored_drafted == (4, 0, 4) and read.accepted == (4, 0, 2)
    without = {k: v for k, v in counterfactual().items() if k != "scored_drafted"}
    assert "scored_drafted" not in outcome_payload(outcome_from_payload(without, 32))
    assert outcome_from_payload(without, 32).scored_drafted is None
    for bad in ([4, 0], [4, 0, 1], [4, 0, 5], [4, -1, 4]):  # unpaired, a > d, d > k
        with pytest.raises(EntryRejected, match="malformed"):
            outcome_from_payload(counterfactual(scored_drafted=bad), 32)


def test_a_structured_contexts_outcome_travels_as_such() -> None:
    """An outcome of a context under a grammar carries the flag (absent for free text,
    as entries were written before it existed); a non-boolean flag is refused."""
    written = SharedOutcome(
        Origin("b", 1), "outcome", "math", 0, "ngram", 4, (4,), (3,), 5, structured=True
    )
    payload = json.loads(json.dumps(outcome_payload(written)))
    assert payload["structured"] is True
    assert outcome_from_payload(payload, 32).structured
    free = replace(written, structured=False)
    assert "structured" not in outcome_payload(free)
    assert not outcome_from_payload(outcome_payload(free), 32).structured
    with pytest.raises(EntryRejected, match="malformed"):
        outcome_from_payload({**payload, "structured": "yes"}, 32)


def test_what_each_step_asked_for_travels_with_the_outcome() -> None:
    """A step that asked for a draft and got none counts as a failure, one that asked for
    nothing does not (``Outcome.acceptance_counts``), so the replicas that apply an
    outcome must know which steps asked; entries written without the field still load."""
    holder_side = Outcome.from_steps(
        [4, 0, 0], [4, 0, 0], draft_time_s=0.0, verify_time_s=0.1, requested_per_step=[4, 4, 0]
    )
    written = SharedOutcome(
        Origin("b", 1), "outcome", "math", 0, "ngram", 4, (4, 0, 0), (4, 0, 0), 7, (4, 4, 0)
    )
    read = outcome_from_payload(json.loads(json.dumps(outcome_payload(written))), 32)
    assert read.requested == holder_side.requested_per_step
    older = {k: v for k, v in outcome_payload(written).items() if k != "requested"}
    assert outcome_from_payload(older, 32).requested == ()


def test_registration_payload_checks() -> None:
    good = {
        "format": 1,
        "replica": "a",
        "seq": 1,
        "kind": "register",
        "name": "x",
        "drafter_kind": "model",
        "path": "/models/x",
        "tasks": ["code"],
        "finetune_sample": [],
        "options": {},
    }
    assert registration_from_payload(good).path == "/models/x"
    for bad in ({"options": {"a": 1}}, {"tasks": "code"}, {"drafter_kind": ""}, {"name": ""}):
        with pytest.raises(EntryRejected):
            registration_from_payload({**good, **bad})


def test_the_largest_registration_a_sidecar_accepts_is_shared_whole() -> None:
    """RegisterDrafter took any sample and any tasks, and every other replica dropped an
    entry past its 1 MiB or 256 tasks as malformed: the drafter never reached them."""
    from router.domain import (
        MAX_DRAFTER_TASKS,
        MAX_SAMPLE_JSON_BYTES,
        MAX_SAMPLE_TEXTS,
        DrafterSpec,
        check_registration_lists,
    )
    from router.pooling.entries import MAX_PAYLOAD_BYTES, SharedRegistration, registration_payload

    # Each character escaped as \uXXXX: the most bytes a text of this size sends.
    text = "\u00e9" * (MAX_SAMPLE_JSON_BYTES // MAX_SAMPLE_TEXTS // 6 - 2)
    sample = (text,) * MAX_SAMPLE_TEXTS
    tasks = tuple(f"task-{i}" for i in range(MAX_DRAFTER_TASKS))
    check_registration_lists(DrafterSpec("x", "ngram", tasks=tasks, finetune_sample=sample))
    event = SharedRegistration(
        Origin("a", 1), "register", "x", "ngram", tasks=tasks, finetune_sample=sample
    )
    fields = SIGNER.fields(registration_payload(event))
    assert len(fields["payload"]) <= MAX_PAYLOAD_BYTES
    read = registration_from_payload(SIGNER.verified(fields))
    assert (read.tasks, read.finetune_sample) == (tasks, sample)


class Harness:
    """A policy holder (thompson over two drafters) with an outcome log attached."""

    def __init__(
        self,
        state_dir: Path,
        identity: str,
        loading: set[str] | None = None,
        drafters: tuple[str, ...] = ("generic", "math"),
        registrations: dict[str, str] | None = None,
        redis_url: str = "redis://127.0.0.1:1/0",  # nothing listens
    ) -> None:
        self.store = SidecarStore(state_dir)
        self.holder = PolicyHolder(self.store, lambda: list(drafters), lambda name: None)
        self.holder.start("thompson")
        self.metrics = create_metrics()
        link = RedisLink(PoolingSettings(redis_url=redis_url), self.metrics)
        self.writer = StreamWriter(link, SIGNER, "s", 100, 8)
        self.loading = loading if loading is not None else set()
        self.pool = OutcomePool(
            identity,
            self.holder,
            self.writer,
            StreamReader(link, "s"),
            SIGNER,
            self.metrics,
            self.loading,
            lambda name: (registrations or {}).get(name, ""),
        )
        self.holder.attach_log(self.pool)

    def arms(self) -> dict[str, tuple[float, float]]:
        _, _, contexts = self.holder.describe()
        return {a.drafter: (a.alpha, a.beta) for c in contexts for a in c.arms}

    def policy(self) -> Any:
        return self.holder._policy


def test_outcomes_are_logged_applied_once_and_resumed_from_the_snapshot(tmp_path: Path) -> None:
    a = Harness(tmp_path / "a", "a-1")
    outcome = Outcome.from_steps([4, 4], [4, 1], draft_time_s=0.01, verify_time_s=0.1)
    a.holder.update(MATH, Decision("math", 4), outcome)
    a.holder.update_counterfactual(MATH, "generic", [2, 0], 4)
    assert a.writer.pending == 2
    logged = [json.loads(SIGNER.fields(p)["payload"]) for p in a.writer._buffer]
    assert [(p["kind"], p["seq"], p["replica"]) for p in logged] == [
        ("outcome", 1, "a-1"),
        ("counterfactual", 2, "a-1"),
    ]
    before = a.arms()["generic"]
    local_costs = {k: a.policy().state_dict()[k] for k in ("costs", "overheads")}
    entry = ("1-0", SIGNER.fields(shared("b-1", 1)))
    a.pool.handle([entry, entry, ("2-0", SIGNER.fields(shared("a-1", 3)))])
    assert a.pool.applied == 1  # the duplicate and its own entry are not applied
    assert a.arms()["generic"] != before
    # Acceptance only: the cost model and the fixed times stay this replica's own.
    assert {k: a.policy().state_dict()[k] for k in ("costs", "overheads")} == local_costs
    a.holder.snapshot()
    snapshot = a.store.latest_policy("thompson")
    assert snapshot is not None
    assert snapshot.state[LOG_CURSOR_KEY] == {"applied": {"a-1": 2, "b-1": 1}, "waiting": []}
    version = a.holder.version
    a.store.close()

    restarted = Harness(tmp_path / "a", "a-2")  # same state dir, a new identity
    assert restarted.holder.version == version
    restarted.pool.handle([entry, ("3-0", SIGNER.fields(shared("b-1", 2)))])
    assert restarted.pool.applied == 1  # b-1 seq 1 is in the snapshot already
    assert restarted.holder.version == version + 1


def test_writers_with_no_entry_left_in_the_stream_leave_the_saved_cursor(tmp_path: Path) -> None:
    """Every process start is a writer of its own, and the cursor every snapshot saves
    kept the highest seq of each writer ever read: one more per restart of any replica,
    for good. The start's catch-up now forgets those none of whose entries is retained
    (none can be read again); the others still deduplicate."""
    import redis

    from benchmarks.replicas.redis_server import RedisServer, redis_binary

    if redis_binary() is None:
        pytest.skip("redis-server is not installed (make install installs it as root)")
    first = Harness(tmp_path / "state", "a-1")
    old = [("1-0", SIGNER.fields(shared("gone-1", 5))), ("2-0", SIGNER.fields(shared("b-1", 1)))]
    first.pool.handle(old)
    first.holder.snapshot()
    first.store.close()
    with RedisServer(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        # What the stream still holds: b-1's first entry (applied already) and later ones.
        for writer, seq in (("b-1", 1), ("b-1", 2), ("c-1", 1)):
            client.xadd("s", SIGNER.fields(shared(writer, seq)))
        restarted = Harness(tmp_path / "state", "a-2", redis_url=server.url)
        assert set(restarted.pool.cursor()["applied"]) == {"gone-1", "b-1"}
        assert asyncio.run(restarted.pool.catch_up()) == 3
        assert restarted.pool.applied == 2  # b-1's first entry was in the snapshot
        assert restarted.pool.cursor()["applied"] == {"b-1": 2, "c-1": 1}
        restarted.holder.snapshot()
        snapshot = restarted.store.latest_policy("thompson")
        assert snapshot is not None
        assert snapshot.state[LOG_CURSOR_KEY]["applied"] == {"b-1": 2, "c-1": 1}
        # Entries read from then on are deduplicated as before, and recorded writers stay.
        restarted.pool.handle([("9-0", SIGNER.fields(shared("d-1", 1)))])
        assert restarted.pool.cursor()["applied"] == {"b-1": 2, "c-1": 1, "d-1": 1}
        restarted.store.close()


def test_outcomes_of_a_drafter_not_served_yet_wait_for_its_registration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drafter registered on replica b reaches replica a through the registry stream and
    loads there while b already learns from it: its outcomes reached a's policy before the
    drafter did, which counted each as a request and dropped its acceptance. They now wait
    (bounded) while its registration loads here and are applied when the drafter joins; a
    drafter neither served nor loading here (removed, or never loadable) has its outcomes
    dropped at once, so none wait to land on a later drafter of that name."""
    from router.pooling import outcomes as outcomes_module

    a = Harness(tmp_path, "a-1", loading={"spare"})
    early = [("1-0", SIGNER.fields(shared("b-1", 1, drafter="spare")))]
    early.append(("2-0", SIGNER.fields(shared("b-1", 2, drafter="spare", accepted=[1, 0, 0]))))
    version = a.holder.version
    a.pool.handle(early)
    assert (a.pool.applied, a.pool.waiting, a.holder.version) == (0, 2, version)
    assert a.metrics.pooled_waiting._value.get() == 2
    a.pool.handle(early)  # delivered again: admitted once, so it does not wait twice
    assert a.pool.waiting == 2

    a.holder.add_drafter("spare", None)  # the registration has loaded here
    a.loading.discard("spare")
    assert (a.pool.applied, a.pool.waiting, a.holder.version) == (2, 0, version + 2)
    reference = PolicyHolder(
        SidecarStore(tmp_path / "ref"), lambda: ["generic", "math", "spare"], lambda name: None
    )
    reference.start("thompson")
    for _, fields in early:
        payload = outcome_from_payload(SIGNER.verified(fields), 32)
        steps = Outcome.from_steps(
            list(payload.drafted), list(payload.accepted), draft_time_s=0.0, verify_time_s=0.0
        )
        reference.update(MATH, Decision("spare", 4), steps)

    def arms(holder: PolicyHolder) -> dict[str, tuple[float, float]]:
        return {x.drafter: (x.alpha, x.beta) for c in holder.describe()[2] for x in c.arms}

    assert arms(a.holder)["spare"] == arms(reference)["spare"]  # as if applied on arrival

    dropped = a.metrics.pooled_rejected.labels(reason="drafter_not_served")
    # Neither served nor loading here (removed before, or one this replica cannot load):
    # dropped at once, never kept for a later drafter of the same name.
    a.pool.handle([("3-0", SIGNER.fields(shared("b-1", 3, drafter="gone")))])
    assert (a.pool.waiting, dropped._value.get(), a.holder.version) == (0, 1, version + 2)
    # Loading, then removed or failed before it loaded: its waiting outcomes are dropped.
    a.loading.add("never")
    a.pool.handle([("4-0", SIGNER.fields(shared("b-1", 4, drafter="never")))])
    assert a.pool.waiting == 1
    a.holder.drafter_not_served("never")
    assert a.pool.waiting == 0 and dropped._value.get() == 2

    # Bounded: past WAITING_MAX the oldest goes, counted.
    monkeypatch.setattr(outcomes_module, "WAITING_MAX", 2)
    for seq in (5, 6, 7):
        a.pool.handle([(f"{seq}-0", SIGNER.fields(shared("b-1", seq, drafter="never")))])
    assert a.pool.waiting == 2 and dropped._value.get() == 3

    # One waiting entry the policy refuses does not fail the registration that applies it.
    real_apply = outcomes_module.apply_to_policy

    def refuse_seq_7(policy: Any, shared_outcome: SharedOutcome) -> None:
        if shared_outcome.origin.seq == 7:
            raise ValueError("refused")
        real_apply(policy, shared_outcome)

    monkeypatch.setattr(outcomes_module, "apply_to_policy", refuse_seq_7)
    applied = a.pool.applied
    a.holder.add_drafter("never", None)
    assert a.pool.waiting == 0 and a.pool.applied == applied + 1
    assert a.metrics.pooled_rejected.labels(reason="malformed")._value.get() == 1


def test_waiting_outcomes_survive_a_crash_in_the_snapshot(tmp_path: Path) -> None:
    """The cursor a snapshot holds counts the waiting outcomes as admitted, so a crash
    before their drafter loaded lost them (the restart skipped them as seen). They are
    now saved with the cursor: they wait again, or are applied at once when the drafter
    is served at the restart (registered after the snapshot, before the crash)."""
    a = Harness(tmp_path, "a-1", loading={"spare"})
    early = [(f"{n}-0", SIGNER.fields(shared("b-1", n, drafter="spare"))) for n in (1, 2)]
    a.pool.handle(early)
    assert a.pool.waiting == 2
    a.holder.snapshot()
    a.store.close()  # a crash: nothing else is saved

    waiting_again = Harness(tmp_path, "a-2", loading={"spare"})
    assert waiting_again.pool.waiting == 2
    waiting_again.pool.handle(early)  # replayed from the stream: admitted already
    assert waiting_again.pool.waiting == 2
    version = waiting_again.holder.version
    waiting_again.holder.add_drafter("spare", None)
    assert waiting_again.pool.waiting == 0 and waiting_again.holder.version == version + 2
    waiting_again.store.close()

    served = Harness(tmp_path, "a-3", drafters=("generic", "math", "spare"))
    assert served.pool.waiting == 0 and served.pool.applied == 2


async def test_unreachable_redis_keeps_a_bounded_buffer(tmp_path: Path) -> None:
    harness = Harness(tmp_path, "a-1")
    for step in range(11):
        harness.writer.append(shared("a-1", step + 1))
    assert harness.writer.pending == 8 and harness.writer.dropped == 3
    assert await harness.writer.publish_once() is False  # nothing listens on port 1
    assert harness.writer.pending == 8 and harness.writer.published == 0
    oldest = harness.writer._buffer[0]
    assert oldest["seq"] == 4  # the oldest were dropped
    await harness.writer._link.close()


def test_pooling_without_a_secret_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from router.cli import build_app
    from router.pooling import pooling_refusal

    assert pooling_refusal(Settings(pooling=PoolingSettings(enabled=True))) is not None
    assert pooling_refusal(Settings(pooling=PoolingSettings(enabled=True, secret="s"))) is None
    monkeypatch.setenv("SPECROUTE_POOLING__ENABLED", "true")
    result = CliRunner().invoke(build_app(), ["serve", "--world", "/nonexistent"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pooling.secret is not set" in lines[0]


@pytest.mark.timeout(30)
def test_catching_up_gives_up_at_its_deadline_whatever_a_call_makes_of_cancellation() -> None:
    """Start-up waits at most ``replay_timeout_s`` for Redis, also when a Redis call
    turns its cancellation into a connection error (the retry loop catches those); the
    failure is logged once with its cause."""
    import asyncio
    import time

    from redis.exceptions import AuthenticationError
    from redis.exceptions import ConnectionError as RedisConnectionError

    from router.pooling import _catch_up_retrying

    failures: list[BaseException] = []

    class Link:
        reconnect_max_s = 0.05

        def failed(self, error: BaseException, reading: bool = False) -> None:
            failures.append(error)

    class Refused:  # a replica whose password Redis refuses, slowly
        link = Link()

        async def catch_up(self) -> None:
            try:
                await asyncio.sleep(0.03)
            except asyncio.CancelledError:
                raise RedisConnectionError("connection closed while reading") from None
            raise AuthenticationError("invalid username-password pair")

    started = time.monotonic()
    assert asyncio.run(_catch_up_retrying(Refused(), 0.5)) is False  # type: ignore[arg-type]
    assert time.monotonic() - started < 10  # it hung past 300 s (a loaded machine: slack)
    assert isinstance(failures[0], AuthenticationError)


def test_a_graceful_stop_publishes_what_the_drain_and_the_learners_record() -> None:
    """The pooling task was cancelled (its one last flush) before the drain and the
    learners' last scores: what they recorded stayed in a buffer nobody read, its
    sequence numbers in the final snapshot's cursor, so never republished. It stops last."""
    import asyncio
    from types import SimpleNamespace

    from router.server import RunningSidecar

    order: list[str] = []

    async def until_cancelled(name: str) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            order.append(f"{name} cancelled")
            raise

    async def graceful() -> None:
        order.append("health")

    async def drained(grace: float) -> None:
        order.append("drain")

    async def nothing_on_the_loop() -> None:
        pass

    async def stop_one() -> None:
        service = SimpleNamespace(
            aclose=nothing_on_the_loop,
            close=lambda: order.append("learners done, final snapshot"),
            store=SimpleNamespace(close=lambda: order.append("store closed")),
        )
        running = RunningSidecar(
            settings=SimpleNamespace(grace_s=1.0),  # type: ignore[arg-type]
            service=service,  # type: ignore[arg-type]
            server=SimpleNamespace(stop=drained),  # type: ignore[arg-type]
            health=SimpleNamespace(enter_graceful_shutdown=graceful),
            grpc_port=1,
            tasks=[asyncio.create_task(until_cancelled("snapshot loop"))],
            pooling_task=asyncio.create_task(until_cancelled("pooling")),
        )
        await asyncio.sleep(0)  # the tasks start
        await running.stop()

    asyncio.run(stop_one())
    assert order == [
        "health",
        "snapshot loop cancelled",
        "drain",
        "learners done, final snapshot",
        "pooling cancelled",
        "store closed",
    ]


def test_pooled_outcomes_are_applied_off_the_event_loop(tmp_path: Path) -> None:
    """A batch of pooled outcomes applied on the event loop stalled Route and Generate
    (~100 ms per 1,000 entries at a catch-up): they are applied in a worker thread, in
    stream order."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from router.pooling.streams import _maybe_await

    harness = Harness(tmp_path, "a-1")
    batches = [
        [("1-0", SIGNER.fields(shared("b-1", 1)))],
        [("2-0", SIGNER.fields(shared("b-1", 2)))],
    ]

    async def catch_up(handle: Any) -> int:
        for batch in batches:
            await _maybe_await(handle(batch))
        return 2

    harness.pool._reader = SimpleNamespace(catch_up=catch_up)  # type: ignore[assignment]
    handled: list[tuple[str, bool]] = []
    handle = harness.pool.handle

    def recording(entries: Any) -> None:
        handled.append((entries[0][0], threading.current_thread() is threading.main_thread()))
        handle(entries)

    harness.pool.handle = recording  # type: ignore[method-assign]
    assert asyncio.run(harness.pool.catch_up()) == 2
    assert handled == [("1-0", False), ("2-0", False)]  # in order, never on the loop's thread
    assert harness.pool.applied == 2


def test_a_loop_that_fails_is_logged_and_started_again_and_the_others_go_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error a pooling loop's own handling let through stopped all four loops, unseen
    until shutdown (the connected gauge still at 1): it is logged with its traceback and
    that loop starts again, while the others run on."""
    import asyncio
    import logging

    import router.pooling as pooling_module

    monkeypatch.setattr(pooling_module.Backoff, "next_delay", lambda self: 0.01)
    started: list[str] = []
    cancelled: list[str] = []

    def loop(name: str, fails: int = 0) -> Any:
        async def run() -> None:
            started.append(name)
            if started.count(name) <= fails:
                raise KeyError("a bug")
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(name)
                raise

        return run

    pooling = _pooling_of(loop("ow"), loop("or", fails=2), loop("rw"), loop("rr"))

    async def run_a_while() -> None:
        task = asyncio.create_task(pooling.run())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if started.count("or") == 3:
                break
        assert not cancelled  # the others were not stopped by the failing one
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.ERROR, logger="router.pooling"):
        asyncio.run(run_a_while())
    assert started.count("or") == 3  # failed twice, started again each time
    assert sorted(cancelled) == ["or", "ow", "rr", "rw"]
    assert caplog.text.count("the outcome reader loop failed") == 2 and "KeyError" in caplog.text


def _pooling_of(
    outcome_writer: Any, outcome_reader: Any, registry_writer: Any, registry_reader: Any
) -> Any:
    """A ``Pooling`` whose four loops are the given coroutine functions (no Redis)."""
    from types import SimpleNamespace

    from router.pooling import Pooling

    async def closed() -> None:
        pass

    return Pooling(
        identity="a-1",
        link=SimpleNamespace(reconnect_max_s=1.0, close=closed),  # type: ignore[arg-type]
        outcomes=SimpleNamespace(run_writer=outcome_writer, run_reader=outcome_reader),  # type: ignore[arg-type]
        registry=SimpleNamespace(run_writer=registry_writer, run_reader=registry_reader),  # type: ignore[arg-type]
    )


def test_a_stop_lets_every_loop_finish_its_last_flush() -> None:
    """A stop cancels the pooling task, whose gather ends as soon as one loop (the
    registry writer with nothing buffered) has: the others were cancelled a second time,
    which cut the outcome writer's last flush short, unlogged, its entries lost."""

    done: list[str] = []

    def loop(name: str, flush_s: float) -> Any:
        async def run() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await asyncio.sleep(flush_s)  # the last flush
                done.append(name)
                raise

        return run

    pooling = _pooling_of(loop("ow", 0.2), loop("or", 0.0), loop("rw", 0.0), loop("rr", 0.0))

    async def stop() -> None:
        task = asyncio.create_task(pooling.run())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(stop(), 10))
    assert sorted(done) == ["or", "ow", "rr", "rw"]


def test_a_refused_read_is_told_apart_from_a_refused_write_once_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An ACL without reads was told as a refused write ("what this replica learns stays
    buffered"), ended by every write that went through and told again after it: 11 lines
    for 3 requests, and never that the replica learnt nothing from the others."""
    from redis.exceptions import NoPermissionError

    link = RedisLink(PoolingSettings(redis_url="redis://127.0.0.1:1/0"), create_metrics())
    refused = NoPermissionError("this user has no permissions to run the 'xread' command")
    with caplog.at_level(logging.INFO, logger="router.pooling.link"):
        for _ in range(3):
            link.failed(refused, reading=True)
            link.succeeded(wrote=True)  # writes go through meanwhile
        link.succeeded()  # a read
    messages = [r.getMessage() for r in caplog.records]
    assert sum("refused a read" in m for m in messages) == 1, messages
    assert any("learns nothing from the others" in m for m in messages), messages
    assert not any("refused a command" in m or "takes writes again" in m for m in messages)
    assert messages[-1].endswith("takes reads again")


class LoadingService:
    """What SharedRegistry reads of a sidecar: its drafters, a registration that loads
    until released, and the policy's ``drafter_not_served``."""

    def __init__(self) -> None:
        self.live: list[str] = ["generic"]
        self.release = asyncio.Event()
        self.not_served: list[str] = []
        self.drafters = SimpleNamespace(
            names=lambda: list(self.live),
            get=self._get,
            identity=lambda name: "",
            unserved_record=lambda name: None,
        )
        self.policy = SimpleNamespace(drafter_not_served=self.not_served.append)

    def _get(self, name: str) -> Any:
        from router.errors import NotFoundError

        if name not in self.live:
            raise NotFoundError(name)
        return SimpleNamespace(record=SimpleNamespace(builtin=False))

    async def register_drafter(self, spec: Any) -> None:
        await self.release.wait()
        self.live.append(spec.name)


async def test_every_registration_read_is_loading_until_it_is_applied() -> None:
    """Registrations are applied one after the other (a model load can take many
    seconds): the outcomes of the second one, published while the first loaded here,
    were dropped, for only the registration being applied counted as loading; so were
    those of one a catch-up out of time left loading in its thread."""
    from router.pooling.entries import SharedRegistration, registration_payload
    from router.pooling.registry import SharedRegistry

    service = LoadingService()
    metrics = create_metrics()
    link = RedisLink(PoolingSettings(redis_url="redis://127.0.0.1:1/0"), metrics)
    registry = SharedRegistry(
        "a-1",
        service,
        StreamWriter(link, SIGNER, "r", 100, 8),
        StreamReader(link, "r"),
        SIGNER,
        metrics,
    )

    def entry(seq: int, kind: str, name: str) -> tuple[str, Any]:
        event = SharedRegistration(
            Origin("b-1", seq), kind, name, "ngram" if kind == "register" else ""
        )
        return (f"{seq}-0", SIGNER.fields(registration_payload(event)))

    applying = asyncio.create_task(
        registry.handle(
            [
                entry(1, "register", "x1"),
                entry(2, "register", "x2"),
                entry(3, "register", "generic"),
            ]
        )
    )
    await asyncio.sleep(0.05)
    assert registry.loading == {"x1", "x2"}  # x2's outcomes wait while x1 loads
    service.release.set()
    await applying
    assert registry.loading == set() and service.live == ["generic", "x1", "x2"]

    # A catch-up cancelled while a registration loads: it goes on, still loading.
    service.release.clear()
    cut = asyncio.create_task(registry.handle([entry(4, "register", "x3")]))
    await asyncio.sleep(0.05)
    cut.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await cut
    assert registry.loading == {"x3"}
    # A removal read before it loads: nothing waits for it any more.
    await registry.handle([entry(5, "remove", "x3")])
    assert registry.loading == set() and service.not_served == ["x3"]
    await link.close()


class _WritingLink:
    """A pooling link whose pipelines run ``execute`` (a Redis that stalls or refuses)."""

    def __init__(self, execute: Callable[[], Awaitable[None]], reconnect_max_s: float) -> None:
        self.reconnect_max_s = reconnect_max_s
        self.client = SimpleNamespace(pipeline=lambda transaction=False: _Pipeline(execute))

    def failed(self, error: BaseException) -> None:
        pass

    def succeeded(self, wrote: bool = False) -> None:
        pass


class _Pipeline:
    def __init__(self, execute: Callable[[], Awaitable[None]]) -> None:
        self.execute = execute

    async def __aenter__(self) -> _Pipeline:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    def xadd(self, *args: Any, **kwargs: Any) -> None:
        pass


def test_a_stop_ends_the_writer_even_when_the_last_flush_times_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A last flush to a Redis that stalls (a partitioned connection) timed out inside
    the cancel's handler: the supervisor took the TimeoutError for a bug and started the
    writer again, so the cancel was lost and the sidecar's stop waited for good. One
    cancel ends it within the flush's bound; the unpublished entries are logged."""
    import router.pooling as pooling_module
    import router.pooling.streams as streams

    monkeypatch.setattr(streams, "LAST_FLUSH_S", 0.2, raising=False)

    async def stalled() -> None:
        await asyncio.sleep(5)  # the socket timeout of a connection nobody answers

    writer = StreamWriter(_WritingLink(stalled, 0.05), SIGNER, "s", 100, 10)  # type: ignore[arg-type]
    writer.append(shared("a-1", 1))

    async def stop_once() -> bool:
        task = asyncio.create_task(
            pooling_module.supervised("outcome writer", writer.run, pooling_module.Backoff(0.05))
        )
        await asyncio.sleep(0.05)  # the first publish stalls
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2.0)
        return bool(done)

    loop = asyncio.new_event_loop()
    try:  # not asyncio.run: without the fix its clean-up would wait on the task for good
        assert loop.run_until_complete(stop_once()) is True
    finally:
        loop.close()
    assert writer.pending == 1  # not published, and said so


def test_entries_a_refusing_redis_does_not_take_at_the_stop_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis that refuses at once (connection refused, an OOM or READONLY reply) ended
    the last flush without a word: the entries lost to the other replicas are logged."""
    from redis.exceptions import ResponseError

    async def refused() -> None:
        raise ResponseError("OOM command not allowed when used memory > 'maxmemory'")

    writer = StreamWriter(_WritingLink(refused, 60.0), SIGNER, "s", 100, 10)  # type: ignore[arg-type]
    writer.append(shared("a-1", 1))
    writer.append(shared("a-2", 2))

    async def stop() -> None:
        task = asyncio.create_task(writer.run())
        await asyncio.sleep(0.1)  # refused once; waiting out its back-off
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=2.0)

    with caplog.at_level(logging.WARNING, logger="router.pooling.streams"):
        asyncio.run(stop())
    assert writer.pending == 2
    assert "pooling: 2 entries of s not published at the stop" in caplog.text


def test_what_was_learnt_of_a_drafter_never_lands_on_another_registered_under_its_name(
    tmp_path: Path,
) -> None:
    """Outcomes named the drafter only: after "remove d, register d" with other weights,
    a replica that read the old d's outcomes late (a new one replaying the stream, one
    behind after an outage) applied them to the new d. Each outcome now carries its
    drafter's identity (kind, weights, options), and one of another registration is
    dropped and counted; outcomes without one (older entries) are taken as before."""
    writer = Harness(tmp_path / "b", "b-1", registrations={"math": "old-weights"})
    writer.holder.update(
        MATH,
        Decision("math", 4),
        Outcome.from_steps([4, 4], [4, 4], draft_time_s=0.01, verify_time_s=0.1),
    )
    sent = json.loads(SIGNER.fields(writer.writer._buffer[0])["payload"])
    assert sent["registration"] == "old-weights"

    reader = Harness(tmp_path / "a", "a-1", registrations={"math": "new-weights"})
    before = reader.arms()
    version = reader.holder.version
    reader.pool.handle(
        [
            ("1-0", SIGNER.fields(sent)),
            ("2-0", SIGNER.fields(shared("b-1", 2, drafter="math", registration="old-weights"))),
        ]
    )
    assert reader.arms() == before and reader.holder.version == version
    other = reader.metrics.pooled_rejected.labels(reason="other_registration")
    assert other._value.get() == 2
    reader.pool.handle(
        [
            ("3-0", SIGNER.fields(shared("b-1", 3, drafter="math", registration="new-weights"))),
            ("4-0", SIGNER.fields(shared("b-1", 4, drafter="math"))),  # names none
        ]
    )
    assert reader.pool.applied == 2 and reader.holder.version == version + 2

    # Waiting for a registration loading here: checked when it joins.
    loading = Harness(tmp_path / "c", "c-1", loading={"spare"}, registrations={"spare": "v2"})
    loading.pool.handle(
        [
            (f"{n}-0", SIGNER.fields(shared("b-1", n, drafter="spare", registration=f"v{n}")))
            for n in (1, 2)
        ]
    )
    assert loading.pool.waiting == 2
    loading.holder.add_drafter("spare", None)
    assert loading.pool.applied == 1  # v2's; v1's is another registration's


class ReplacingService:
    """What SharedRegistry reads of a sidecar, with identities: served and stored-but-not-
    served drafters, registration and removal."""

    def __init__(self, live: dict[str, str], unserved: dict[str, str]) -> None:
        self.live = dict(live)  # name -> identity
        self.unserved = dict(unserved)
        self.calls: list[str] = []
        self.not_served: list[str] = []
        self.drafters = SimpleNamespace(
            names=lambda: list(self.live),
            get=self._get,
            identity=lambda name: self.live.get(name, ""),
            unserved_record=lambda name: (
                SimpleNamespace(identity=self.unserved[name]) if name in self.unserved else None
            ),
        )
        self.policy = SimpleNamespace(drafter_not_served=self.not_served.append)

    def _get(self, name: str) -> Any:
        from router.errors import NotFoundError

        if name not in self.live:
            raise NotFoundError(name)
        return SimpleNamespace(record=SimpleNamespace(builtin=name == "generic"))

    async def register_drafter(self, spec: Any) -> None:
        self.calls.append(f"register {spec.name} {spec.path}")
        self.live[spec.name] = spec.path  # the fake's identity: the path

    async def remove_drafter(self, name: str) -> None:
        self.calls.append(f"remove {name}")
        self.live.pop(name, None)
        self.unserved.pop(name, None)


async def test_a_replica_that_was_away_takes_the_fleets_new_drafter_of_a_name() -> None:
    """The fleet removed d and registered it again from new weights while this replica was
    down: folded to the last registration, the restart found d served (its old weights,
    from its own store) and kept it for good; a stored d it could not serve stayed in its
    store although the fleet removed it. Now the announced identity is compared, the old d
    replaced, and a removal deletes a stored d too; each entry is applied once."""
    from router.pooling.entries import SharedRegistration, registration_payload
    from router.pooling.registry import SharedRegistry

    service = ReplacingService({"generic": "g", "d": "/m/d-v1"}, {"e": "/m/e-v1"})
    metrics = create_metrics()
    link = RedisLink(PoolingSettings(redis_url="redis://127.0.0.1:1/0"), metrics)
    registry = SharedRegistry(
        "a-2",
        service,
        StreamWriter(link, SIGNER, "r", 100, 8),
        StreamReader(link, "r"),
        SIGNER,
        metrics,
    )

    def entry(seq: int, kind: str, name: str, path: str = "") -> tuple[str, Any]:
        event = SharedRegistration(
            Origin("b-1", seq),
            kind,
            name,
            "model" if kind == "register" else "",
            path,
            registration=path,
        )
        return (f"{seq}-0", SIGNER.fields(registration_payload(event)))

    history = [
        entry(1, "register", "d", "/m/d-v1"),
        entry(2, "remove", "d"),
        entry(3, "register", "d", "/m/d-v2"),
        entry(4, "remove", "e"),
    ]
    await registry.handle(history)
    assert service.calls == ["remove d", "register d /m/d-v2", "remove e"]
    assert service.live == {"generic": "g", "d": "/m/d-v2"} and service.unserved == {}

    await registry.handle(history)  # read again (a stream found recreated): applied once
    assert service.calls == ["remove d", "register d /m/d-v2", "remove e"]
    await registry.handle([entry(5, "register", "d", "/m/d-v2")])  # the same drafter
    assert service.calls == ["remove d", "register d /m/d-v2", "remove e"]

    # Entries of several writers folded into one: read again, the folded-away ones do
    # not come back and win (they were never marked applied, and x ended removed).
    def of(writer: str, seq: int, kind: str, name: str, path: str = "") -> tuple[str, Any]:
        event = SharedRegistration(
            Origin(writer, seq), kind, name, "model" if path else "", path, registration=path
        )
        return (f"{seq}-1", SIGNER.fields(registration_payload(event)))

    service.calls.clear()
    mixed = [of("c-1", 1, "register", "x", "/m/x-v1"), of("c-1", 2, "remove", "x")]
    mixed.append(of("e-1", 1, "register", "x", "/m/x-v2"))
    await registry.handle(mixed)
    await registry.handle(mixed)  # a catch-up out of time reads the batch again
    assert service.calls == ["register x /m/x-v2"] and service.live["x"] == "/m/x-v2"

    # This replica's own newer registration wins the fold over another's older one.
    service.calls.clear()
    own = [of("f-1", 1, "register", "y", "/m/y-v1"), of("a-2", 1, "remove", "y")]
    own.append(of("a-2", 2, "register", "y", "/m/y-v2"))
    service.live["y"] = "/m/y-v2"  # registered here, by this replica's own call
    await registry.handle(own)
    assert service.calls == [] and service.live["y"] == "/m/y-v2"
    await link.close()
