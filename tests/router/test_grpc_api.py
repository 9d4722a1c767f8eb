"""Every Router RPC through the generated client against a real in-process sidecar."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import shutil
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from classifiers.chat import IM_END, render_chat
from router.pb import router_pb2 as pb
from router.pb import router_pb2_grpc
from router.service import Components
from tests.router.conftest import (
    ADMIN,
    COMPLETION_PROMPT,
    ServingWorld,
    SidecarThread,
    counterfactuals_settled,
    greedy_reference,
    target_logprobs,
)


@pytest.fixture(scope="module")
def prompts(serving_world: ServingWorld) -> dict[str, str]:
    return serving_world.prompts


@pytest.fixture(scope="module")
def PROMPT() -> str:
    """A completion prompt on which the (barely trained) tiny target does not stop at once."""
    return COMPLETION_PROMPT


def generate(sidecar: SidecarThread, **fields: object) -> list[pb.GenerateChunk]:
    return list(sidecar.stub.Generate(pb.GenerateRequest(**fields), timeout=120))


def test_route_classifies_and_picks_an_eligible_arm(
    sidecar: SidecarThread, prompts: dict[str, str]
) -> None:
    text = prompts["translation"]
    decision = sidecar.stub.Route(pb.RouteRequest(text=text, max_new_tokens=32))
    expected = sidecar.service.components.classifiers.current.classify(text)
    assert decision.task_cluster == expected.cluster
    assert decision.confidence == pytest.approx(expected.probability, rel=1e-5)
    assert decision.request_id  # assigned by the server
    assert decision.policy == "thompson"
    assert decision.prompt_tokens == len(sidecar.service.tokenizer(text)["input_ids"])
    assert decision.drafter in set(sidecar.service.drafters.names())
    assert (decision.drafter == "none") == (decision.draft_length == 0)


def test_route_with_conversation_and_task_hint(
    sidecar: SidecarThread, prompts: dict[str, str]
) -> None:
    conversation = pb.Conversation(
        messages=[
            pb.ChatMessage(role="system", content="You are a helpful assistant."),
            pb.ChatMessage(role="user", content=prompts["code"]),
        ]
    )
    decision = sidecar.stub.Route(
        pb.RouteRequest(request_id="chat-1", conversation=conversation, task_hint="math")
    )
    assert decision.request_id == "chat-1"
    assert decision.task_cluster == "math" and decision.confidence == pytest.approx(1.0)


def test_a_prompt_in_qwens_chat_format_routes_as_its_conversation(
    sidecar: SidecarThread, prompts: dict[str, str]
) -> None:
    classifier = sidecar.service.components.classifiers.current
    for task in ("code", "translation"):
        messages = [{"role": "user", "content": prompts[task]}]
        text = sidecar.service.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        conversation = pb.Conversation(messages=[pb.ChatMessage(**m) for m in messages])
        as_text = sidecar.stub.Route(pb.RouteRequest(text=text))
        as_chat = sidecar.stub.Route(pb.RouteRequest(conversation=conversation))
        expected = classifier.classify(prompts[task])
        for decision in (as_text, as_chat):
            assert decision.task_cluster == expected.cluster
            assert decision.confidence == pytest.approx(expected.probability, rel=1e-5)
            assert decision.out_of_distribution == expected.out_of_distribution
        assert as_text.prompt_tokens == as_chat.prompt_tokens  # the same model text


def test_concurrent_routes_are_batched_and_a_bad_one_fails_alone(
    sidecar: SidecarThread, prompts: dict[str, str]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    texts = [prompts[task] for task in sorted(prompts)] * 4
    calls = [pb.RouteRequest(text=t, max_new_tokens=16) for t in texts]
    calls.insert(5, pb.RouteRequest(text="   "))  # empty prompt: INVALID_ARGUMENT
    calls.insert(9, pb.RouteRequest(text=texts[0], task_hint="no-such-task"))

    def route(request: pb.RouteRequest) -> pb.RouteDecision | grpc.RpcError:
        try:
            return sidecar.stub.Route(request, timeout=30)
        except grpc.RpcError as error:
            return error

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(route, calls))
    classifier = sidecar.service.components.classifiers.current
    tokenizer = sidecar.service.tokenizer
    for request, result in zip(calls, results, strict=True):
        if request.text.strip() and not request.task_hint:
            assert isinstance(result, pb.RouteDecision)
            assert result.task_cluster == classifier.classify(request.text).cluster
            assert result.prompt_tokens == len(tokenizer(request.text)["input_ids"])
        else:
            assert isinstance(result, grpc.RpcError)
            assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
    batches = sidecar.service.metrics.route_batch_size.collect()[0].samples
    count = next(s.value for s in batches if s.name.endswith("_count"))
    total = next(s.value for s in batches if s.name.endswith("_sum"))
    assert total >= len(calls) and count >= 1
    assert sidecar.stub.Route(pb.RouteRequest(text=texts[0])).task_cluster  # still serving


def test_report_updates_the_policy_once(sidecar: SidecarThread, PROMPT: str) -> None:
    decision = sidecar.stub.Route(pb.RouteRequest(text=PROMPT, task_hint="math"))
    k = decision.draft_length
    steps = 5
    outcome = pb.RouteOutcome(
        request_id=decision.request_id,
        steps=steps,
        drafted_per_step=[k] * steps,
        accepted_per_step=[min(1, k)] * steps,
        draft_time_s=0.01,
        verify_time_s=0.05,
        wall_time_s=0.07,
        generated_tokens=steps * (1 + min(1, k)),
    )
    ack = sidecar.stub.Report(outcome)
    assert ack.request_id == decision.request_id
    assert ack.policy_version > decision.policy_version
    with pytest.raises(grpc.RpcError) as again:
        sidecar.stub.Report(outcome)
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_routes_awaiting_a_report_leave_the_garbage_collector_nothing_to_scan(
    sidecar: SidecarThread, PROMPT: str
) -> None:
    """Routes wait for their Report in a table of up to 100,000. Kept as objects (the
    routed request, its decision, its context) they were 300,000 that each full
    collection scanned, stalling the event loop 14-40 ms every ~50,000 unreported
    Routes; kept as tuples of plain values, a collection stops tracking them. A Report
    still finds its request, and a second one is still told apart."""
    gc.collect()
    before = len(gc.get_objects())
    ids = [
        sidecar.stub.Route(pb.RouteRequest(text=PROMPT, task_hint="math")).request_id
        for _ in range(1000)
    ]
    gc.collect()
    grown = len(gc.get_objects()) - before
    assert grown < 300, f"{grown} more objects tracked after 1000 unreported Routes"
    outcome = pb.RouteOutcome(
        request_id=ids[0],
        steps=1,
        drafted_per_step=[0],
        accepted_per_step=[0],
        wall_time_s=0.01,
        verify_time_s=0.01,
        generated_tokens=1,
    )
    assert sidecar.stub.Report(outcome).request_id == ids[0]
    with pytest.raises(grpc.RpcError) as again:
        sidecar.stub.Report(outcome)
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_a_routed_request_is_the_same_after_waiting_as_a_row() -> None:
    from router.policy.base import Context, Decision
    from router.service import RoutedRequest

    routed = RoutedRequest(
        request_id="r-1",
        task_cluster="math",
        confidence=0.75,
        out_of_distribution=True,
        decision=Decision("math", 5, 1.4, True, 0.3),
        context=Context("math", 2),
        policy="thompson",
        policy_version=7,
        prompt_tokens=300,
        length_bucket=2,
        prompt_ids=(1, 2, 3),
        replica="http://replica-a:8000",
        drafter_serial=4,
    )
    assert RoutedRequest.from_row(routed.as_row()) == routed


def test_an_unexpected_error_is_internal_and_logged_and_serving_goes_on(
    sidecar: SidecarThread,
    PROMPT: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug (an exception no error type covers) answers INTERNAL naming the method, not
    grpc.aio's UNKNOWN, in unary and streaming calls; the traceback goes to the log."""

    def broken_view() -> None:
        raise RuntimeError("a bug")

    async def broken_generation(request: object) -> AsyncIterator[object]:
        raise KeyError("a bug")
        yield  # an async generator, as the service's

    monkeypatch.setattr(sidecar.service, "policy_view", broken_view)
    monkeypatch.setattr(sidecar.service, "generate", broken_generation)
    with pytest.raises(grpc.RpcError) as unary:
        sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest())
    assert unary.value.code() == grpc.StatusCode.INTERNAL
    assert "GetPolicyState failed: RuntimeError" in unary.value.details()
    with pytest.raises(grpc.RpcError) as stream:
        generate(sidecar, text=PROMPT, max_new_tokens=2)
    assert stream.value.code() == grpc.StatusCode.INTERNAL
    assert "Generate failed: KeyError" in stream.value.details()
    assert "RuntimeError: a bug" in caplog.text and "KeyError: 'a bug'" in caplog.text
    monkeypatch.undo()
    assert sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest()).policy  # still serving


def test_stored_drafters_not_served_are_listed_unavailable_with_the_reason(
    sidecar: SidecarThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored drafter this start did not serve (roots narrowed, files moved) was
    invisible; ListDrafters lists it as unavailable, with why."""
    from router.store import DrafterRecord

    kept = DrafterRecord(name="moved", kind="model", path="/models/moved")
    why = "/models/moved is outside the configured model roots"
    monkeypatch.setattr(sidecar.service.drafters, "unserved", lambda: [(kept, why)])
    reply = sidecar.stub.ListDrafters(pb.ListDraftersRequest())
    assert [(d.name, d.kind, d.path, d.error) for d in reply.unavailable] == [
        ("moved", "model", "/models/moved", why)
    ]
    assert "moved" not in {d.name for d in reply.drafters}


def test_a_request_pinned_to_a_stored_drafter_not_served_is_told_why(
    sidecar: SidecarThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was told "no drafter named 'moved'", which ListDrafters contradicts."""
    from router.store import DrafterRecord

    kept = DrafterRecord(name="moved", kind="model", path="/models/moved")
    why = "/models/moved is outside the configured model roots"
    monkeypatch.setitem(sidecar.service.drafters._unserved, "moved", (kept, why))
    request = pb.GenerateRequest(text="Hi", max_new_tokens=2, force_drafter="moved")
    with pytest.raises(grpc.RpcError) as refused:
        list(sidecar.stub.Generate(request))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert refused.value.details().startswith(
        f"drafter 'moved' is registered but not served at this start: {why}; served: "
    )


def test_a_registration_whose_caller_is_cancelled_still_reaches_the_policy(
    sidecar: SidecarThread, serving_world: ServingWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller cancelled while the drafter loads (a client's deadline, pooling's replay
    time limit) left it served and listed but unknown to the policy, so never chosen: the
    load ran on in its thread, the policy's add was the cancelled caller's. So was telling
    the other replicas (pooling's ``announce``), which never heard of it."""
    import asyncio
    import threading

    from router.domain import DrafterSpec

    service = sidecar.service
    loading, go_on = threading.Event(), threading.Event()
    register = service.drafters.register

    def slow_register(spec: DrafterSpec) -> Any:
        loading.set()
        go_on.wait(30)
        return register(spec)

    monkeypatch.setattr(service.drafters, "register", slow_register)
    spec = DrafterSpec(name="late", kind="model", path=str(serving_world.spare_dir))
    announced: list[tuple[str, str]] = []
    call = asyncio.run_coroutine_threadsafe(
        service.register_drafter(spec, lambda s, r: announced.append((s.name, r.identity))),
        sidecar.loop,
    )
    assert loading.wait(30)
    call.cancel()  # the caller gives up while the model loads
    go_on.set()
    deadline = time.monotonic() + 60
    while "late" not in service.policy.state()[2]["drafters"] or not announced:
        assert time.monotonic() < deadline, "the policy or the fleet never learned of it"
        time.sleep(0.05)
    assert "late" in service.drafters.names()
    assert announced == [("late", service.drafters.identity("late"))]
    sidecar.stub.RemoveDrafter(pb.RemoveDrafterRequest(name="late"), metadata=ADMIN)


def test_routes_are_served_while_a_removal_waits_for_a_registration(
    sidecar: SidecarThread,
    serving_world: ServingWorld,
    monkeypatch: pytest.MonkeyPatch,
    PROMPT: str,
) -> None:
    """RemoveDrafter took the pool's write lock on the event loop: while a registration
    held it, loading its model, every call of the sidecar waited."""
    import threading

    from router.domain import DrafterSpec

    service, loading, go_on = sidecar.service, threading.Event(), threading.Event()
    create = service.drafters._create

    def slow_create(*args: Any, **kwargs: Any) -> Any:  # inside the write lock
        loading.set()
        go_on.wait(30)
        return create(*args, **kwargs)

    monkeypatch.setattr(service.drafters, "_create", slow_create)
    waiting = threading.Event()
    remove_drafter = service.remove_drafter

    async def entered(*args: Any, **kwargs: Any) -> Any:  # the removal, about to wait its turn
        waiting.set()
        return await remove_drafter(*args, **kwargs)

    monkeypatch.setattr(service, "remove_drafter", entered)
    spec = DrafterSpec(name="loading", kind="model", path=str(serving_world.spare_dir))
    registering = asyncio.run_coroutine_threadsafe(service.register_drafter(spec), sidecar.loop)
    assert loading.wait(30)
    removing = sidecar.stub.RemoveDrafter.future(
        pb.RemoveDrafterRequest(name="no-such"), metadata=ADMIN, timeout=60
    )
    assert waiting.wait(30)  # the Route below comes while the removal waits, not before
    try:
        assert sidecar.stub.Route(pb.RouteRequest(text=PROMPT), timeout=5).task_cluster
    finally:
        go_on.set()
    with pytest.raises(grpc.RpcError) as missing:
        removing.result()
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    registering.result(60)
    sidecar.stub.RemoveDrafter(pb.RemoveDrafterRequest(name="loading"), metadata=ADMIN)


def _requests_in(sidecar: SidecarThread, cluster: str, bucket: int) -> int:
    state = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest())
    return sum(
        c.requests
        for c in state.contexts
        if c.task_cluster == cluster and c.length_bucket == bucket
    )


def test_a_retried_route_replaces_the_pending_decision(sidecar: SidecarThread, PROMPT: str) -> None:
    """A Route with the request id of one not yet reported (a client retrying a Route
    whose reply it lost) replaces that decision: the one Report is learned once, in the
    context of the decision the client got last."""
    first = sidecar.stub.Route(pb.RouteRequest(request_id="retried", text=PROMPT, task_hint="math"))
    last = sidecar.stub.Route(pb.RouteRequest(request_id="retried", text=PROMPT, task_hint="code"))
    assert first.length_bucket == last.length_bucket
    bucket = last.length_bucket
    before = {cluster: _requests_in(sidecar, cluster, bucket) for cluster in ("math", "code")}
    k = last.draft_length
    outcome = pb.RouteOutcome(
        request_id="retried",
        drafted_per_step=[k] * 3,
        accepted_per_step=[min(1, k)] * 3,
        verify_time_s=0.03,
    )
    sidecar.stub.Report(outcome)
    after = {cluster: _requests_in(sidecar, cluster, bucket) for cluster in ("math", "code")}
    assert after == {"math": before["math"], "code": before["code"] + 1}
    with pytest.raises(grpc.RpcError) as again:
        sidecar.stub.Report(outcome)
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_report_from_totals_and_positions(sidecar: SidecarThread, PROMPT: str) -> None:
    decision = sidecar.stub.Route(pb.RouteRequest(text=PROMPT, task_hint="code"))
    outcome = pb.RouteOutcome(
        request_id=decision.request_id,
        steps=4,
        drafted_tokens=4 * 3,
        accepted_tokens=5,
        accepted_per_position=[3, 2, 0],
        draft_time_s=0.01,
        verify_time_s=0.04,
    )
    assert sidecar.stub.Report(outcome).policy_version > decision.policy_version


def test_a_totals_report_of_plain_decoding_is_learnt_from(
    sidecar: SidecarThread, PROMPT: str
) -> None:
    """Ten steps without a draft (the proto's plain decoding in totals form) were refused
    with INVALID_ARGUMENT "zip() argument 2 is shorter than argument 1"."""
    for drafted, accepted in ((0, 0), (4, 2)):
        decision = sidecar.stub.Route(pb.RouteRequest(text=PROMPT, task_hint="code"))
        outcome = pb.RouteOutcome(
            request_id=decision.request_id,
            steps=10,
            drafted_tokens=drafted,
            accepted_tokens=accepted,
            verify_time_s=0.1,
            generated_tokens=10 + accepted,
        )
        assert sidecar.stub.Report(outcome).policy_version > decision.policy_version


def test_generate_over_grpc_is_exactly_the_greedy_output(
    sidecar: SidecarThread, PROMPT: str
) -> None:
    expected_ids, expected_text = greedy_reference(sidecar, PROMPT, 40)
    assert len(expected_ids) == 40  # a real comparison, not a lone EOS
    chunks = generate(sidecar, text=PROMPT, max_new_tokens=40)
    assert chunks[0].HasField("decision") and chunks[0].decision.task_cluster
    ids = [token.id for chunk in chunks for token in chunk.tokens]
    assert ids == expected_ids
    stats = chunks[-1].stats
    assert stats.generated_text == expected_text
    assert stats.generated_tokens == len(expected_ids)
    assert stats.steps == len(stats.accepted_per_step) > 0
    assert stats.tokens_per_s > 0


def test_generated_tokens_carry_the_engines_text_and_special_tokens_none(
    ending_sidecar: SidecarThread,
) -> None:
    tokenizer = ending_sidecar.service.tokenizer
    ended = 0
    for answer in ("Sure.", "The answer is 391.", "I am fine, thank you."):
        chat = render_chat([{"role": "user", "content": "What is 17 * 23?"}]) + answer
        chunks = generate(ending_sidecar, text=chat, max_new_tokens=8)
        tokens = [token for chunk in chunks for token in chunk.tokens]
        text = "".join(chunk.text for chunk in chunks)
        assert text == "".join(token.text for token in tokens) == chunks[-1].stats.generated_text
        assert IM_END not in text
        if chunks[-1].stats.finish_reason == "eos_token":
            ended += 1
            assert tokens[-1].special and tokens[-1].text == ""
            assert tokenizer.convert_ids_to_tokens(tokens[-1].id) == IM_END
    assert ended


def ended_turn(sidecar: SidecarThread, max_new_tokens: int) -> tuple[str, list[int]]:
    """A prompt whose greedy answer the ending target ends with its end of turn before
    ``max_new_tokens``, and that answer's ids."""
    for answer in ("Sure.", "The answer is 391.", "I am fine, thank you."):
        chat = render_chat([{"role": "user", "content": "What is 17 * 23?"}]) + answer
        chunks = generate(sidecar, text=chat, max_new_tokens=max_new_tokens)
        if chunks[-1].stats.finish_reason == "eos_token":
            return chat, [token.id for chunk in chunks for token in chunk.tokens]
    raise AssertionError("no answer of the ending target ends its turn")


def test_penalties_over_grpc_are_the_targets_own(sidecar: SidecarThread, PROMPT: str) -> None:
    """SamplingParams' penalties: the greedy output under them, whatever the drafter."""
    from drafters.penalties import Penalties
    from router.domain import Prompt

    service = sidecar.service
    reference = service.components.engine.generate(
        service.prompt_ids(Prompt(text=PROMPT)),
        service.drafters.get("none").drafter,
        0,
        max_new_tokens=24,
        penalties=Penalties(repetition=1.2, presence=0.3, frequency=0.6),
    ).collect()
    assert reference != greedy_reference(sidecar, PROMPT, 24)[0]
    sampling = pb.SamplingParams(
        repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.6
    )
    for drafter, k in (("ngram", 4), ("generic", 2)):
        chunks = generate(
            sidecar,
            text=PROMPT,
            max_new_tokens=24,
            sampling=sampling,
            force_drafter=drafter,
            force_draft_length=k,
        )
        assert [t.id for c in chunks for t in c.tokens] == reference, drafter


def test_ignore_eos_runs_past_the_end_of_turn_and_stop_token_ids_end_a_generation(
    ending_sidecar: SidecarThread,
) -> None:
    """vLLM's ignore_eos and stop_token_ids in SamplingParams: a generation the end of
    turn ended runs on to max_new_tokens, its first tokens the same; a stop token id ends
    one where that token first comes (finish reason eos_token)."""
    chat, ended = ended_turn(ending_sidecar, 16)
    going_on = generate(
        ending_sidecar,
        text=chat,
        max_new_tokens=16,
        sampling=pb.SamplingParams(ignore_eos=True),
    )
    ids = [token.id for chunk in going_on for token in chunk.tokens]
    assert len(ids) == 16 and ids[: len(ended)] == ended, (ids, ended)
    assert going_on[-1].stats.finish_reason == "length"
    later = ids[len(ended)]  # the first token after the end of turn
    stopped = generate(
        ending_sidecar,
        text=chat,
        max_new_tokens=16,
        sampling=pb.SamplingParams(ignore_eos=True, stop_token_ids=[later]),
    )
    assert [t.id for c in stopped for t in c.tokens] == ids[: ids.index(later) + 1]
    assert stopped[-1].stats.finish_reason == "eos_token"


def test_a_model_drafters_draft_split_goes_out_in_the_stats_and_in_through_report(
    sidecar: SidecarThread, PROMPT: str
) -> None:
    """GenerationStats carries a model drafter's first forwards timed apart from the
    further ones (lead steps and time, further forwards and time); a Report carrying the
    same fields gives the policy's Outcome that split, in per-step and in totals form
    (where totals read fewer drafting steps than leads timed, as many leads at the same
    time each)."""
    from router.convert import outcome_from_pb
    from router.service import outcome_from_report

    chunks = generate(
        sidecar,
        text=PROMPT,
        max_new_tokens=24,
        force_drafter="math",
        force_draft_length=4,
        no_update=True,
    )
    stats = chunks[-1].stats
    drafting = sum(1 for d in stats.drafted_per_step if d)
    assert 0 < stats.draft_lead_steps <= drafting and stats.draft_further_forwards > 0
    assert stats.draft_lead_time_s + stats.draft_further_time_s <= stats.draft_time_s * 1.000001
    split = {
        "draft_lead_steps": stats.draft_lead_steps,
        "draft_lead_time_s": stats.draft_lead_time_s,
        "draft_further_forwards": stats.draft_further_forwards,
        "draft_further_time_s": stats.draft_further_time_s,
    }
    times = {"draft_time_s": stats.draft_time_s, "verify_time_s": stats.verify_time_s}
    per_step = pb.RouteOutcome(
        request_id="r",
        drafted_per_step=stats.drafted_per_step,
        accepted_per_step=stats.accepted_per_step,
        **times,
        **split,
    )
    outcome = outcome_from_report(outcome_from_pb(per_step, sidecar.service.limits), 4)
    assert outcome.draft_lead_steps == split["draft_lead_steps"]
    assert outcome.draft_lead_time_s == pytest.approx(split["draft_lead_time_s"])
    assert outcome.draft_further_forwards == split["draft_further_forwards"]
    assert outcome.draft_further_time_s == pytest.approx(split["draft_further_time_s"])
    totals = pb.RouteOutcome(
        request_id="r",
        steps=3,
        drafted_tokens=8,
        accepted_tokens=3,
        accepted_per_position=[2, 1],
        draft_time_s=0.03,
        verify_time_s=0.06,
        draft_lead_steps=3,
        draft_lead_time_s=0.012,
        draft_further_forwards=5,
        draft_further_time_s=0.01,
    )
    read = outcome_from_report(outcome_from_pb(totals, sidecar.service.limits), 4)
    leads = sum(1 for d in read.drafted_per_step if d)
    assert read.draft_lead_steps == leads == 2  # 8 tokens at k = 4: two drafting steps
    assert read.draft_lead_time_s == pytest.approx(0.008)  # 4 ms a lead, as reported


def test_special_tokens_text_is_kept_when_not_skipped(ending_sidecar: SidecarThread) -> None:
    """SamplingParams.skip_special_tokens false (vLLM's parameter): the end of turn a
    generation goes past (ignore_eos) is in its text, as the tokenizer decodes the ids
    keeping special tokens; the one that ends a generation is not. Unset: as before."""
    tokenizer = ending_sidecar.service.tokenizer
    chat, ended = ended_turn(ending_sidecar, 16)
    kept = pb.SamplingParams(ignore_eos=True, skip_special_tokens=False)
    chunks = generate(ending_sidecar, text=chat, max_new_tokens=16, sampling=kept)
    ids = [token.id for chunk in chunks for token in chunk.tokens]
    text = chunks[-1].stats.generated_text
    assert IM_END in text and text == tokenizer.decode(ids, skip_special_tokens=False)
    assert "".join(chunk.text for chunk in chunks) == text
    skipped = generate(
        ending_sidecar, text=chat, max_new_tokens=16, sampling=pb.SamplingParams(ignore_eos=True)
    )
    assert IM_END not in skipped[-1].stats.generated_text
    assert [t.id for c in skipped for t in c.tokens] == ids
    at_end = generate(
        ending_sidecar,
        text=chat,
        max_new_tokens=16,
        sampling=pb.SamplingParams(skip_special_tokens=False),
    )
    assert [t.id for c in at_end for t in c.tokens] == ended
    assert at_end[-1].stats.generated_text == tokenizer.decode(ended[:-1])


@pytest.mark.parametrize(("drafter", "k"), [("math", 4), ("generic", 2), ("ngram", 3), ("none", 0)])
def test_generate_with_a_forced_arm_keeps_the_greedy_output(
    sidecar: SidecarThread, PROMPT: str, drafter: str, k: int
) -> None:
    expected_ids, _ = greedy_reference(sidecar, PROMPT, 30)
    chunks = generate(
        sidecar, text=PROMPT, max_new_tokens=30, force_drafter=drafter, force_draft_length=k
    )
    assert chunks[0].decision.drafter == drafter and chunks[0].decision.draft_length == k
    assert [t.id for c in chunks for t in c.tokens] == expected_ids
    if k:
        assert max(chunks[-1].stats.drafted_per_step) <= k


def test_generate_updates_policy_and_scores_other_drafters(
    sidecar: SidecarThread, PROMPT: str
) -> None:
    before = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest())
    generate(sidecar, text=PROMPT, max_new_tokens=20, task_hint="math")
    after = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest())
    assert after.version > before.version
    math_contexts = [c for c in after.contexts if c.task_cluster == "math"]
    assert math_contexts and math_contexts[0].requests >= 1
    deadline = time.monotonic() + 60
    scraped = ""
    while 'reports_total{source="counterfactual"}' not in scraped and time.monotonic() < deadline:
        time.sleep(0.05)
        scraped = urllib.request.urlopen(sidecar.metrics_url, timeout=10).read().decode()
    assert 'specroute_reports_total{source="counterfactual"}' in scraped


def test_generate_with_no_update_leaves_the_policy(sidecar: SidecarThread, PROMPT: str) -> None:
    counterfactuals_settled(sidecar)
    before = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest()).version
    generate(sidecar, text=PROMPT, max_new_tokens=8, no_update=True)
    assert sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest()).version == before


def test_a_generation_of_the_prefills_token_alone_teaches_the_policy_nothing(
    sidecar: SidecarThread, PROMPT: str
) -> None:
    """One token comes from the prefill, before any step: no drafting happened, and its
    time, all prefill, would be learnt as a plain step's."""
    counterfactuals_settled(sidecar)
    before = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest()).version
    chunks = generate(sidecar, text=PROMPT, max_new_tokens=1, task_hint="math")
    stats = chunks[-1].stats
    assert stats.generated_tokens == 1 and stats.steps == 0
    assert sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest()).version == before


def test_drafter_registration_is_hot_and_removable(
    sidecar: SidecarThread, PROMPT: str, serving_world: ServingWorld, prompts: dict[str, str]
) -> None:
    request = pb.RegisterDrafterRequest(
        name="spare",
        kind="model",
        path=str(serving_world.spare_dir),
        tasks=["code"],
        finetune_sample=[prompts["math"]],
    )
    info = sidecar.stub.RegisterDrafter(request, metadata=ADMIN)
    assert info.name == "spare" and not info.builtin
    assert info.parameter_count > 0 and len(info.weights_digest) == 64
    assert info.finetune_sample_size == 1
    listed = {d.name: d for d in sidecar.stub.ListDrafters(pb.ListDraftersRequest()).drafters}
    assert "spare" in listed and listed["generic"].builtin
    # Eligible for the very next request, no restart.
    expected_ids, _ = greedy_reference(sidecar, PROMPT, 12)
    chunks = generate(
        sidecar, text=PROMPT, max_new_tokens=12, force_drafter="spare", force_draft_length=2
    )
    assert [t.id for c in chunks for t in c.tokens] == expected_ids
    # Of the built-in drafters' architecture: priced by their measured drafting cost (one
    # window of the shape) from its first request on.
    costs = sidecar.service.policy._policy.costs_
    assert costs.cost_shape["spare"] == costs.cost_shape["math"]
    spare_cost, math_cost = costs.step_costs(["spare", "math"], 4).t_draft
    assert spare_cost == math_cost
    # Its fine-tuning sample (a math prompt) gives its cold-start prior: the classifier's
    # similarity of the sample to each cluster, highest prior mean in math.
    policy = sidecar.service.policy._policy
    classifier = sidecar.service.components.classifiers.current
    assert policy.similarity_["spare"] == pytest.approx(classifier.similarity([prompts["math"]]))
    means = {
        cluster: alpha / (alpha + beta)
        for cluster in serving_world.tasks
        for alpha, beta in [policy._prior("spare", cluster)]
    }
    assert max(means, key=means.__getitem__) == "math"

    removed = sidecar.stub.RemoveDrafter(pb.RemoveDrafterRequest(name="spare"), metadata=ADMIN)
    assert removed.name == "spare"
    names = {d.name for d in sidecar.stub.ListDrafters(pb.ListDraftersRequest()).drafters}
    assert "spare" not in names
    with pytest.raises(grpc.RpcError) as gone:
        sidecar.stub.RemoveDrafter(pb.RemoveDrafterRequest(name="spare"), metadata=ADMIN)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_logprobs_are_the_targets_whatever_the_drafter(sidecar: SidecarThread, PROMPT: str) -> None:
    """Token.logprob was always 0 (unset). Asked for, each token carries the target's raw
    log-probability and its most likely alternatives: the same for every arm (a verify
    pass scores a drafted token as plain decoding does), equal to a forward pass."""
    expected_ids, _ = greedy_reference(sidecar, PROMPT, 12)
    reference = target_logprobs(sidecar, PROMPT, expected_ids)

    def tokens(**arm: Any) -> list[pb.Token]:
        chunks = generate(
            sidecar, text=PROMPT, max_new_tokens=12, logprobs=2, no_update=True, **arm
        )
        return [t for c in chunks for t in c.tokens]

    for arm in ({"force_drafter": "none"}, {"force_drafter": "math", "force_draft_length": 3}, {}):
        got = tokens(**arm)
        assert [t.id for t in got] == expected_ids
        assert all(t.HasField("logprob") and len(t.top_logprobs) == 2 for t in got)
        assert [t.logprob for t in got] == pytest.approx(reference, abs=1e-4)
        # Greedy: the token emitted is the most likely one, and the alternatives are ranked.
        assert all(t.top_logprobs[0].id == t.id for t in got)
        assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in got)
        texts = sidecar.service.tokenizer.batch_decode([[a.id] for a in got[0].top_logprobs])
        assert [a.text for a in got[0].top_logprobs] == texts
    plain = generate(sidecar, text=PROMPT, max_new_tokens=4, no_update=True)
    assert not any(t.HasField("logprob") or t.top_logprobs for c in plain for t in c.tokens)
    with pytest.raises(grpc.RpcError) as over:
        generate(sidecar, text=PROMPT, max_new_tokens=4, logprobs=21)
    assert over.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "logprobs" in str(over.value.details())


def test_prompt_logprobs_come_back_as_the_prompts_tokens(sidecar: SidecarThread) -> None:
    """``prompt_logprobs``: the second chunk lists the prompt's tokens as the target read
    them (a conversation's template markers flagged special), each after the first with
    the target's log-probability given the tokens before it and its alternatives, as one
    forward pass over the prompt gives it; the output is unchanged. Over 20 alternatives
    is INVALID_ARGUMENT naming the field."""
    import torch

    from router.domain import Prompt

    conversation = pb.Conversation(messages=[pb.ChatMessage(role="user", content="Hi there")])
    asked: dict[str, Any] = {"conversation": conversation, "max_new_tokens": 6, "no_update": True}
    plain = generate(sidecar, **asked)
    chunks = generate(sidecar, **asked, prompt_logprobs=2)
    assert chunks[0].HasField("decision") and not plain[1].prompt_tokens
    prompt = list(chunks[1].prompt_tokens)
    ids = sidecar.service.prompt_ids(Prompt(messages=({"role": "user", "content": "Hi there"},)))
    assert [t.id for t in prompt] == ids
    assert not prompt[0].HasField("logprob") and not prompt[0].top_logprobs
    assert all(t.HasField("logprob") and len(t.top_logprobs) == 2 for t in prompt[1:])
    with torch.inference_mode():
        logits = sidecar.service.components.target.model(torch.tensor([ids])).logits
    rows = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    want = rows.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()
    assert [t.logprob for t in prompt[1:]] == pytest.approx(want, abs=1e-4)
    special = sidecar.service.tokenizer.all_special_ids
    assert [t.special for t in prompt] == [i in special for i in ids] and prompt[0].special
    assert [t.id for c in chunks[2:] for t in c.tokens] == [t.id for c in plain for t in c.tokens]
    with pytest.raises(grpc.RpcError) as over:
        generate(sidecar, **asked, prompt_logprobs=21)
    assert over.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt_logprobs" in str(over.value.details())


def _decisions_of(sidecar: SidecarThread, drafter: str) -> int:
    """How often ``drafter`` was chosen, over every context of the served policy."""
    state = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest())
    return sum(arm.decisions for c in state.contexts for arm in c.arms if arm.drafter == drafter)


def test_a_drafter_registered_again_does_not_inherit_the_removed_ones_arms(
    sidecar: SidecarThread, PROMPT: str, serving_world: ServingWorld
) -> None:
    """Thompson learnt a drafter, the operator switched to ucb (thompson's state saved),
    removed the drafter, registered another under the same name and switched back:
    thompson's snapshot was restored with the old drafter's arms for the new one. (A crash
    between a re-registration and the next periodic snapshot did the same.)"""
    register = pb.RegisterDrafterRequest(
        name="again", kind="model", path=str(serving_world.spare_dir)
    )
    sidecar.stub.RegisterDrafter(register, metadata=ADMIN)
    try:
        generate(
            sidecar, text=PROMPT, max_new_tokens=8, force_drafter="again", force_draft_length=2
        )
        counterfactuals_settled(sidecar)
        assert _decisions_of(sidecar, "again") > 0
        sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="ucb"), metadata=ADMIN)
        sidecar.stub.RemoveDrafter(pb.RemoveDrafterRequest(name="again"), metadata=ADMIN)
        sidecar.stub.RegisterDrafter(register, metadata=ADMIN)
        back = sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="thompson"), metadata=ADMIN)
        assert back.policy == "thompson"
        assert _decisions_of(sidecar, "again") == 0
    finally:
        sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="thompson"), metadata=ADMIN)
        sidecar.stub.RemoveDrafter(pb.RemoveDrafterRequest(name="again"), metadata=ADMIN)


def test_copy_or_model_registration_serves_the_greedy_output(
    sidecar: SidecarThread, PROMPT: str, serving_world: ServingWorld
) -> None:
    """A copy-or-model drafter is registered like a model drafter (its path under the model
    roots, weights counted and hashed), drafts losslessly, and is priced by its own
    measured cost (its copies cost nothing: not its model's cost shape)."""
    request = pb.RegisterDrafterRequest(
        name="spare-copy",
        kind="copy-or-model",
        path=str(serving_world.spare_dir),
        options={"min_match": "2", "model_k": "2"},
    )
    info = sidecar.stub.RegisterDrafter(request, metadata=ADMIN)
    try:
        assert info.kind == "copy-or-model" and dict(info.options) == dict(request.options)
        assert info.parameter_count > 0 and len(info.weights_digest) == 64
        expected_ids, _ = greedy_reference(sidecar, PROMPT, 24)
        chunks = generate(
            sidecar,
            text=PROMPT,
            max_new_tokens=24,
            force_drafter="spare-copy",
            force_draft_length=6,
        )
        assert [t.id for c in chunks for t in c.tokens] == expected_ids
        assert "spare-copy" not in sidecar.service.drafter_hints().cost_shape
        outside = pb.RegisterDrafterRequest(name="far-copy", kind="copy-or-model", path="/etc")
        with pytest.raises(grpc.RpcError) as refused:
            sidecar.stub.RegisterDrafter(outside, metadata=ADMIN)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # the model roots
    finally:
        sidecar.stub.RemoveDrafter(pb.RemoveDrafterRequest(name="spare-copy"), metadata=ADMIN)


def test_a_drafter_whose_weights_link_outside_the_roots_is_refused(
    sidecar: SidecarThread, serving_world: ServingWorld, tmp_path: Path
) -> None:
    """A directory under a model root whose weight file is a symlink to a file outside
    every root: PERMISSION_DENIED naming the link (its weights were loaded before)."""
    linked = serving_world.extra_root / "linked-weights"
    shutil.copytree(serving_world.spare_dir, linked)
    try:
        weights = next(linked.glob("*.safetensors"))
        weights.rename(tmp_path / weights.name)
        weights.symlink_to(tmp_path / weights.name)
        request = pb.RegisterDrafterRequest(name="linked", kind="model", path=str(linked))
        with pytest.raises(grpc.RpcError) as refused:
            sidecar.stub.RegisterDrafter(request, metadata=ADMIN)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"{weights} links to {tmp_path / weights.name}" in refused.value.details()
        assert "linked" not in sidecar.service.drafters.names()
    finally:
        shutil.rmtree(linked)


def test_a_registration_while_the_same_name_is_being_removed_keeps_the_new_drafter(
    sidecar: SidecarThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RemoveDrafter took the drafter out of the pool, then out of the policy (which can
    wait for its lock): a RegisterDrafter of the same name in between found the
    old arms still in the policy (adding is idempotent), and the removal then took them
    away: the new drafter was served but never chosen. Admin changes are now one at a
    time, pool and policy together."""
    import threading

    register = pb.RegisterDrafterRequest(name="swap", kind="ngram")
    sidecar.stub.RegisterDrafter(register, metadata=ADMIN)
    holder = sidecar.service.policy
    removing_from_policy = holder.remove_drafter

    removing = threading.Event()

    def slowly(name: str) -> None:  # as while the policy's lock is held
        removing.set()  # the pool has removed it; the policy has not yet
        time.sleep(0.5)
        removing_from_policy(name)

    monkeypatch.setattr(holder, "remove_drafter", slowly)
    try:
        removal = sidecar.stub.RemoveDrafter.future(
            pb.RemoveDrafterRequest(name="swap"), metadata=ADMIN, timeout=30
        )
        assert removing.wait(30)  # not a sleep: on a loaded machine 0.2 s was not enough
        sidecar.stub.RegisterDrafter(register, metadata=ADMIN, timeout=30)
        removal.result()
        assert "swap" in sidecar.service.drafters.names()
        assert "swap" in holder._policy.drafters_  # chosen like any other
    finally:
        monkeypatch.undo()
        with contextlib.suppress(grpc.RpcError):
            sidecar.stub.RemoveDrafter(pb.RemoveDrafterRequest(name="swap"), metadata=ADMIN)


def test_a_drafter_that_fails_its_probe_generation_is_refused_and_not_kept(
    sidecar: SidecarThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registration drafts on a probe prompt before it serves a drafter: one that fails
    there is FAILED_PRECONDITION, and neither served nor stored."""
    pool = sidecar.service.drafters
    create = pool._create

    class Broken:  # what the real drafter is, except that it cannot draft
        def __init__(self, drafter: Any) -> None:
            self._drafter = drafter

        def __getattr__(self, name: str) -> Any:
            return getattr(self._drafter, name)

        def start(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(pool, "_create", lambda *a, **k: Broken(create(*a, **k)))
    request = pb.RegisterDrafterRequest(name="broken", kind="ngram")
    with pytest.raises(grpc.RpcError) as refused:
        sidecar.stub.RegisterDrafter(request, metadata=ADMIN)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "failed its probe generation" in refused.value.details()
    assert "broken" not in pool.names()
    assert "broken" not in {r.name for r in sidecar.service.store.drafters()}


def test_ngram_registration_with_options(sidecar: SidecarThread) -> None:
    request = pb.RegisterDrafterRequest(name="ngram-4", kind="ngram", options={"max_n": "4"})
    info = sidecar.stub.RegisterDrafter(request, metadata=ADMIN)
    assert info.kind == "ngram" and dict(info.options) == {"max_n": "4"}
    served = sidecar.service.drafters.get("ngram-4").drafter
    assert served.max_n == 4  # the option reached the drafter
    sidecar.stub.RemoveDrafter(pb.RemoveDrafterRequest(name="ngram-4"), metadata=ADMIN)


def test_reload_classifier_swaps_and_refuses_a_broken_one(
    sidecar: SidecarThread, serving_world: ServingWorld, tmp_path: object
) -> None:
    info = sidecar.stub.ReloadClassifier(
        pb.ReloadClassifierRequest(path=str(serving_world.classifier_v2_dir)), metadata=ADMIN
    )
    assert set(info.labels) == set(serving_world.tasks) and info.version
    assert Path(info.path).resolve() == Path(serving_world.classifier_v2_dir).resolve()
    current = sidecar.service.components.classifiers.current
    assert current.metadata.version == info.version
    with pytest.raises(grpc.RpcError) as broken:
        sidecar.stub.ReloadClassifier(
            pb.ReloadClassifierRequest(path=str(serving_world.world.target_dir)), metadata=ADMIN
        )
    assert broken.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert sidecar.service.components.classifiers.current.metadata.version == info.version
    sidecar.stub.ReloadClassifier(
        pb.ReloadClassifierRequest(path=str(serving_world.world.root / "classifier")),
        metadata=ADMIN,
    )


def test_reload_classifier_only_from_under_a_model_root(
    sidecar: SidecarThread, serving_world: ServingWorld, tmp_path: Path
) -> None:
    """A valid classifier outside every model root (or reached by a symlink from inside
    one) is refused, as a drafter there is; it was loaded before."""
    outside = tmp_path / "classifier"
    shutil.copytree(serving_world.classifier_v2_dir, outside)
    link = serving_world.extra_root / "classifier-link"
    link.symlink_to(outside)
    before = sidecar.service.components.classifiers.current.metadata.version
    try:
        for path in (outside, link):
            with pytest.raises(grpc.RpcError) as refused:
                sidecar.stub.ReloadClassifier(
                    pb.ReloadClassifierRequest(path=str(path)), metadata=ADMIN
                )
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "outside the configured model roots" in refused.value.details()
    finally:
        link.unlink()
    assert sidecar.service.components.classifiers.current.metadata.version == before


def test_policy_state_and_switching(sidecar: SidecarThread, PROMPT: str) -> None:
    sidecar.stub.Route(pb.RouteRequest(text=PROMPT, task_hint="summarization"))
    counterfactuals_settled(sidecar)
    state = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest())
    assert state.policy == "thompson"
    ucb = sidecar.stub.SetPolicy(
        pb.SetPolicyRequest(policy="ucb", reset_state=True), metadata=ADMIN
    )
    assert ucb.policy == "ucb"
    assert sidecar.stub.Route(pb.RouteRequest(text=PROMPT)).policy == "ucb"
    with pytest.raises(grpc.RpcError) as unknown:
        sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="nope"), metadata=ADMIN)
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A table naming a drafter not served (a typo) turned speculation off without a word.
    for policy, config in (
        ("fixed", {"drafter": "codee", "k": 4}),
        ("static", {"table": {"chat/0": ["nope", 4]}, "default": ["generic", 3]}),
    ):
        with pytest.raises(grpc.RpcError) as misnamed:
            sidecar.stub.SetPolicy(
                pb.SetPolicyRequest(policy=policy, config_json=json.dumps(config)), metadata=ADMIN
            )
        assert misnamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "config: names drafters this sidecar does not serve" in misnamed.value.details()
    assert sidecar.stub.Route(pb.RouteRequest(text=PROMPT)).policy == "ucb"  # still served
    back = sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="thompson"), metadata=ADMIN)
    assert back.policy == "thompson" and back.version == state.version

    # ucb learns from one report; switched away and back it keeps that, unless reset.
    sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="ucb"), metadata=ADMIN)
    decision = sidecar.stub.Route(pb.RouteRequest(text=PROMPT, task_hint="code"))
    k = decision.draft_length
    outcome = pb.RouteOutcome(
        request_id=decision.request_id,
        steps=3,
        drafted_tokens=3 * k,
        accepted_tokens=min(2, 3 * k),
        draft_time_s=0.01,
        verify_time_s=0.03,
        wall_time_s=0.05,
        generated_tokens=3 + min(2, 3 * k),
    )
    learned = sidecar.stub.Report(outcome).policy_version
    assert learned >= 1
    sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="thompson"), metadata=ADMIN)
    kept = sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="ucb"), metadata=ADMIN)
    assert kept.version == learned and len(kept.contexts) >= 1
    sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="thompson"), metadata=ADMIN)
    reset = sidecar.stub.SetPolicy(
        pb.SetPolicyRequest(policy="ucb", reset_state=True), metadata=ADMIN
    )
    assert reset.version == 0 and list(reset.contexts) == []
    sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="thompson"), metadata=ADMIN)


def test_health_and_reflection(sidecar: SidecarThread) -> None:
    health = health_pb2_grpc.HealthStub(sidecar.channel)
    for service in ("", "specroute.v1.Router"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(sidecar.channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"specroute.v1.Router", "grpc.health.v1.Health"} <= names


def _route_latency_count(sidecar: SidecarThread) -> float:
    text = urllib.request.urlopen(sidecar.metrics_url, timeout=10).read().decode()
    line = next(
        x for x in text.splitlines() if x.startswith("specroute_route_latency_seconds_count")
    )
    return float(line.split()[-1])


def test_route_latency_counts_every_route_call_refused_ones_too(
    sidecar: SidecarThread, PROMPT: str
) -> None:
    before = _route_latency_count(sidecar)
    sidecar.stub.Route(pb.RouteRequest(text=PROMPT))
    sidecar.stub.Route(pb.RouteRequest(text=PROMPT, max_new_tokens=8))
    with pytest.raises(grpc.RpcError) as refused:
        sidecar.stub.Route(pb.RouteRequest(text=""))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _route_latency_count(sidecar) == before + 3


def _decisions_counted(sidecar: SidecarThread) -> float:
    """The sum of every ``specroute_decisions_total`` sample on /metrics."""
    text = urllib.request.urlopen(sidecar.metrics_url, timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("specroute_decisions_total{")
    )


def test_metrics_endpoint(sidecar: SidecarThread, PROMPT: str) -> None:
    before = _decisions_counted(sidecar)
    sidecar.stub.Route(pb.RouteRequest(text=PROMPT))
    # Each Route counts its decision once (the names alone are there with no sample).
    assert _decisions_counted(sidecar) == before + 1
    text = urllib.request.urlopen(sidecar.metrics_url, timeout=10).read().decode()
    for name in (
        "specroute_route_latency_seconds_count",
        "specroute_decisions_total",
        "specroute_spec_decode_num_draft_tokens_total",
        "specroute_spec_decode_num_accepted_tokens_total",
        "specroute_generation_tokens_per_second",
        "specroute_generation_queue_depth",
        "specroute_errors_total",
    ):
        assert name in text


def test_queue_full_then_cancelled_generation_frees_its_slot(
    sidecar: SidecarThread, PROMPT: str
) -> None:
    # Capacity is one generation (one worker, queue size 0).
    generated = sidecar.service.metrics.generated_tokens
    tokens_before = generated._value.get()
    first = sidecar.stub.Generate(
        pb.GenerateRequest(
            text=PROMPT,
            max_new_tokens=200,
            force_drafter="none",
            # Hot sampling, seeded: a long run that does not stop early at EOS.
            sampling=pb.SamplingParams(do_sample=True, temperature=5.0, seed=3),
        ),
        timeout=120,
    )
    assert next(first).HasField("decision")
    # Its tokens flow: the job runs (a job cancelled while it waited for the worker never
    # starts, and is never counted: on a loaded machine that raced the counter below).
    assert next(first).tokens
    with pytest.raises(grpc.RpcError) as full:
        list(sidecar.stub.Generate(pb.GenerateRequest(text=PROMPT, max_new_tokens=4)))
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    first.cancel()
    deadline = time.monotonic() + 60
    while sidecar.service.queue.depth and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sidecar.service.queue.depth == 0
    assert generated._value.get() - tokens_before < 200  # the engine stopped early
    generations = sidecar.service.metrics.generations
    assert generations.labels(finish_reason="cancelled")._value.get() == 1
    after = generate(sidecar, text=PROMPT, max_new_tokens=4)[-1].stats
    assert after.finish_reason in {"length", "eos_token"} and after.generated_tokens >= 1


def test_the_drafters_kinds_configure_the_policy(sidecar: SidecarThread) -> None:
    """At start and on every SetPolicy the sidecar hints each drafter's cost by its kind
    (the n-gram lookup runs no model) and prices its prompt-lookup drafters with the copy
    model; what the policy's configuration says wins."""
    from router.policy.base import DrafterHints

    service = sidecar.service
    hints = service.drafter_hints()
    assert hints == DrafterHints({"ngram": 0.0}, ("ngram",), cost_shape=hints.cost_shape)
    # The world's model drafters share one architecture, so one cost shape.
    models = {d.name for d in service.drafters.records() if d.kind == "model"}
    assert set(hints.cost_shape) == models and len(set(hints.cost_shape.values())) == 1

    def configured() -> tuple[dict[str, float], set[str]]:
        policy = service.policy._policy
        return dict(policy.costs_.draft_cost_ratio), set(policy.copy_drafters)

    assert configured() == ({"ngram": 0.0}, {"ngram"})
    config = json.dumps({"draft_cost_ratio": {"generic": 0.3, "ngram": 0.05}, "copy_drafters": []})
    sidecar.stub.SetPolicy(
        pb.SetPolicyRequest(policy="thompson", config_json=config), metadata=ADMIN
    )
    assert configured() == ({"generic": 0.3, "ngram": 0.05}, set())
    sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="thompson"), metadata=ADMIN)
    assert configured() == ({"ngram": 0.0}, {"ngram"})
    # A drafter registered at run time is hinted at once, as a restart would hint it
    # (tests/router/test_durability.py restarts with one), and forgotten when removed.
    sidecar.stub.RegisterDrafter(
        pb.RegisterDrafterRequest(name="lookup3", kind="ngram", options={"max_n": "4"}),
        metadata=ADMIN,
    )
    try:
        assert configured() == ({"ngram": 0.0, "lookup3": 0.0}, {"ngram", "lookup3"})
    finally:
        sidecar.stub.RemoveDrafter(pb.RemoveDrafterRequest(name="lookup3"), metadata=ADMIN)
    assert configured() == ({"ngram": 0.0}, {"ngram"})


def test_a_request_whose_drafter_is_removed_before_it_runs_is_served_plainly(
    sidecar: SidecarThread, PROMPT: str
) -> None:
    """A Generate routed to a drafter that an admin removed while it waited for a worker
    failed mid-stream with NOT_FOUND for a drafter its caller never named. It runs
    without speculation (lossless) and is learnt from as the no-drafter arm."""
    from dataclasses import replace

    from router.domain import GenerateInput, Prompt, RouteInput
    from router.errors import NotFoundError

    service = sidecar.service
    route = RouteInput(prompt=Prompt(text=PROMPT), max_new_tokens=12)
    routed = asyncio.run_coroutine_threadsafe(
        service._route(route, force_drafter="generic", force_k=3), sidecar.loop
    ).result(timeout=60)
    gone = replace(routed, decision=replace(routed.decision, drafter="removed-meanwhile"))
    emitted: list[Any] = []
    job = service._generation_job(gone, GenerateInput(route=route, no_update=True))
    result = job(emitted.append, lambda: False)
    assert (result.routed.decision.drafter, result.routed.decision.k) == ("none", 0)
    assert list(result.output_ids) == greedy_reference(sidecar, PROMPT, 12)[0]
    assert [t for chunk in emitted for t in chunk.token_ids] == list(result.output_ids)
    # A drafter the caller pinned (force_drafter) and that is gone is still NOT_FOUND.
    pinned = GenerateInput(route=route, no_update=True, force_drafter="removed-meanwhile")
    with pytest.raises(NotFoundError, match="removed-meanwhile"):
        service._generation_job(gone, pinned)(emitted.append, lambda: False)


def test_a_report_for_a_drafter_removed_or_registered_again_is_not_learnt(
    sidecar: SidecarThread, PROMPT: str
) -> None:
    """A late Report for a drafter removed since it was routed brought the drafter's
    figures back into the policy (a drafter registered later under its name inherited
    them); one for the registration before the current one landed on the new drafter.
    Both are acknowledged and dropped (counted as stale)."""
    from dataclasses import replace

    from router.domain import Prompt, RouteInput

    service = sidecar.service

    def register() -> None:
        request = pb.RegisterDrafterRequest(name="late-x", kind="ngram", options={"max_n": "4"})
        sidecar.stub.RegisterDrafter(request, metadata=ADMIN)

    def routed_to_it() -> str:
        route = RouteInput(prompt=Prompt(text=PROMPT), task_hint="code", max_new_tokens=16)
        routed = asyncio.run_coroutine_threadsafe(
            service._route(route, force_drafter="late-x", force_k=3), sidecar.loop
        ).result(timeout=60)
        service._pending.remember(routed)  # as a Route call leaves it for its Report
        return str(routed.request_id)

    def report(request_id: str) -> int:
        outcome = pb.RouteOutcome(
            request_id=request_id,
            drafted_per_step=[3] * 20,
            accepted_per_step=[0] * 20,
            draft_time_s=0.5,
            verify_time_s=0.2,
        )
        return int(sidecar.stub.Report(outcome).policy_version)

    def remove() -> None:
        sidecar.stub.RemoveDrafter(pb.RemoveDrafterRequest(name="late-x"), metadata=ADMIN)

    register()
    try:
        removed_since = routed_to_it()
        remove()
        version = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest()).version
        assert report(removed_since) == version  # acknowledged, not learnt
        register()
        registered_again_since = routed_to_it()
        remove()
        register()
        assert report(registered_again_since) == version
        state = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest())
        assert state.version == version
        arms = [a for c in state.contexts for a in c.arms if a.drafter == "late-x"]
        assert all(arm.decisions == 0 for arm in arms), arms
        current = routed_to_it()
        assert report(current) == version + 1  # the serving registration's is learnt
        # Routed to no registration at all (a fleet replica's drafter not registered here):
        # its serial 0 matched the 0 of a name no longer served.
        unregistered = routed_to_it()
        pending = service._pending.take(unregistered)
        service._pending.remember(replace(pending, drafter_serial=0))
        remove()
        assert report(unregistered) == version + 1
        register()
    finally:
        remove()


def _thompson_after_one_generate(
    sidecar: SidecarThread, **fields: object
) -> tuple[list[pb.GenerateChunk], Any]:
    """A fresh thompson, one Generate of ``fields``, and what it learnt from it settled:
    (the chunks, the serving policy)."""
    counterfactuals_settled(sidecar)
    sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="thompson", reset_state=True), metadata=ADMIN)
    chunks = generate(sidecar, **fields)
    counterfactuals_settled(sidecar)
    return chunks, sidecar.service.policy._policy


def test_a_lookups_counterfactual_score_teaches_how_often_it_matches(
    sidecar: SidecarThread, PROMPT: str
) -> None:
    """The n-gram drafter's score of another drafter's greedy output counts the steps
    whose lookup found nothing (``drafters.base.DraftCounter``), so thompson learns how
    often it matches (c) without playing it: accepts alone left c where its own first
    plays put it, and where those met prompts with nothing to copy, it was never played
    again on a task where it was the best arm."""
    _, policy = _thompson_after_one_generate(
        sidecar,
        text=PROMPT,
        max_new_tokens=30,
        task_hint="math",
        force_drafter="math",
        force_draft_length=3,
    )
    scored = [arms["ngram"] for c, arms in policy.copies_.items() if c.cluster == "math"]
    assert scored, "ngram was not scored"
    starts = sum(float(runs.evidence[:2, 0].sum()) for runs in scored)
    assert starts >= 1


def test_a_greedy_requests_scores_let_thompson_decide_its_context_at_the_posterior_means(
    sidecar: SidecarThread, PROMPT: str
) -> None:
    """Every other drafter is scored on a greedy request's output, so the next decision
    in its context has full information: each arm, the served one too, is decided at
    its posterior mean (no draw, nothing explored). A sampled request is not scored."""
    sampled = pb.SamplingParams(do_sample=True, temperature=0.8, seed=1)
    for sampling, scored in ((pb.SamplingParams(), True), (sampled, False)):
        _, policy = _thompson_after_one_generate(
            sidecar,
            text=PROMPT,
            max_new_tokens=24,
            task_hint="math",
            force_drafter="math",
            sampling=sampling,
        )
        (context,) = policy.contexts_
        informed = policy._informed(context)
        assert informed.all() if scored else not informed.any(), informed


def test_a_lookups_unmatched_steps_tell_the_policy_what_a_plain_step_costs(
    sidecar: SidecarThread, PROMPT: str
) -> None:
    """A step whose lookup found nothing is a one-position target forward, plain
    decoding's step; the engine times those steps apart and the outcome carries their mean
    (``plain_token_time_s``), so thompson prices plain decoding by it instead of by the
    speculative step's intercept, which a one-position forward need not cost."""
    chunks, policy = _thompson_after_one_generate(
        sidecar,
        text=" ".join([PROMPT] * 3),  # something to copy, and new text
        max_new_tokens=40,
        task_hint="chat",
        force_drafter="ngram",
        force_draft_length=4,
    )
    drafted = list(chunks[-1].stats.drafted_per_step)
    assert 0 in drafted and any(drafted), f"wanted matched and unmatched lookups: {drafted}"
    costs = policy.costs_
    assert len(costs.plain_.samples) == len(costs.empty_.samples) == 1
    assert 0.0 < costs.plain_token_time() == costs.empty_step() < 10.0


def test_a_model_drafters_first_forward_reaches_the_policy_apart_from_its_further_tokens(
    sidecar: SidecarThread, PROMPT: str
) -> None:
    """A model drafter's step costs its first forward (the catch-up on the verified
    tokens) plus a cheaper forward per further token: the engine times the lead apart and
    the outcome carries it, so thompson prices a draft of k as t_lead + k t_draft instead of
    k times one mean price per token (which overprices long drafts)."""
    _, policy = _thompson_after_one_generate(
        sidecar,
        text=PROMPT,
        max_new_tokens=24,
        task_hint="math",
        force_drafter="math",
        force_draft_length=4,
    )
    costs = policy.costs_
    key = costs.cost_shape.get("math", "math")
    assert len(costs.lead_[key]) == 1 and len(costs.draft_[key]) == 1
    # Both timed (which one is dearer is the machine's to say: on these CPUs the first
    # forward costs about twice a further one, `benchmarks/engine/HISTORY.md`; one
    # request's figures are no test of that).
    assert costs.lead_[key].value > 0.0 and costs.draft_[key].value > 0.0


def test_a_greedy_requests_loss_guard_prices_plain_decoding_at_the_policys_measure(
    sidecar: SidecarThread, PROMPT: str
) -> None:
    """The loss guard compares drafting with plain decoding inside a request whose own
    steps all drafted: it prices a plain step at the serving policy's measured q (a
    one-position forward against the speculative step's intercept), not at 1. Where q
    says a plain step costs a fifth of the intercept, no draft of 4 can pay, and the
    guard stops drafting; at q = 1 it drafts longer (to the end on an idle machine; the
    guard prices drafts by the request's own timings, so a busy one may trip it early:
    q = 1 is tried up to three times, q = 0.2 trips whatever the timings)."""
    counterfactuals_settled(sidecar)

    def drafted_per_step() -> list[int]:
        chunks = generate(
            sidecar,
            text=PROMPT,
            max_new_tokens=40,
            task_hint="math",
            force_drafter="math",
            force_draft_length=4,
            no_update=True,
        )
        return list(chunks[-1].stats.drafted_per_step)

    sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="thompson", reset_state=True), metadata=ADMIN)
    at_one = [drafted_per_step() for _ in range(3)]
    costs = sidecar.service.policy._policy.costs_
    for _ in range(3):
        costs.plain_.add(0.2)
    assert sidecar.service.policy.plain_step_terms()[0] == pytest.approx(0.2)
    measured = drafted_per_step()
    assert measured[0] == 4 and measured[-2:] == [0, 0]  # drafts first, then trips
    assert max(map(sum, at_one)) > sum(measured), f"q = 1: {at_one}; q = 0.2: {measured}"
    sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="fixed", reset_state=True), metadata=ADMIN)
    assert sidecar.service.policy.plain_step_terms() is None


def test_a_policy_switch_waits_for_the_scores_of_requests_already_served(
    sidecar: SidecarThread, PROMPT: str
) -> None:
    """The counterfactual scores of a greedy Generate are learnt off the request path.
    A SetPolicy right after it (the replay switches policy between requests) switched at
    once: the scores went to the next policy (a baseline ignores them) and the policy
    that served the request, saved at the switch, never had them."""
    counterfactuals_settled(sidecar)
    sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="thompson", reset_state=True), metadata=ADMIN)
    release = threading.Event()
    sidecar.service._learner.submit(release.wait, 60)  # the scores queue behind it
    try:
        generate(sidecar, text=PROMPT, max_new_tokens=20, task_hint="math")
        served = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest()).version
        with ThreadPoolExecutor(1) as pool:
            switch = pool.submit(
                sidecar.stub.SetPolicy, pb.SetPolicyRequest(policy="none"), metadata=ADMIN
            )
            time.sleep(0.3)
            assert not switch.done(), "switched before the served request's scores"
            release.set()
            assert switch.result(timeout=60).policy == "none"
    finally:
        release.set()
        back = sidecar.stub.SetPolicy(pb.SetPolicyRequest(policy="thompson"), metadata=ADMIN)
    assert back.version > served  # thompson learnt the scores of the request it served


def test_a_misspelt_policy_is_refused_without_waiting_for_the_scores(
    sidecar: SidecarThread,
) -> None:
    release = threading.Event()
    sidecar.service._learner.submit(release.wait, 60)  # scoring that has not finished
    try:
        started = time.monotonic()
        for request in (
            pb.SetPolicyRequest(policy="thomson"),
            pb.SetPolicyRequest(policy="thompson", config_json='{"gama": 0.9}'),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                sidecar.stub.SetPolicy(request, metadata=ADMIN, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert time.monotonic() - started < 5  # the wait would be 12.5 s
    finally:
        release.set()


def _drafter_series(sidecar: SidecarThread, drafter: str) -> dict[str, float]:
    """The sidecar's exported samples labelled ``drafter=<drafter>``: name -> sum."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(sidecar.metrics_url, timeout=10) as response:
        text = response.read().decode()
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("drafter") == drafter and not sample.name.endswith("_created"):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


def test_a_removed_drafters_metric_series_go_with_it(sidecar: SidecarThread, PROMPT: str) -> None:
    """A removed drafter's series (decisions, drafted and accepted tokens) stayed exported
    for good, one set per name: with automatic distillation's timestamped names, without
    bound. They go now, and a drafter registered again under the name counts from zero in
    series that are exported (its cached counter went with them)."""
    register = pb.RegisterDrafterRequest(name="short-lived", kind="ngram")
    forced = {"force_drafter": "short-lived", "force_draft_length": 2}
    sidecar.stub.RegisterDrafter(register, metadata=ADMIN)
    try:
        generate(sidecar, text=PROMPT, max_new_tokens=8, **forced)
        before = _drafter_series(sidecar, "short-lived")
        assert before["specroute_decisions_total"] == 1
        assert "specroute_spec_decode_num_draft_tokens_total" in before
        sidecar.stub.RemoveDrafter(pb.RemoveDrafterRequest(name="short-lived"), metadata=ADMIN)
        assert _drafter_series(sidecar, "short-lived") == {}
        sidecar.stub.RegisterDrafter(register, metadata=ADMIN)
        generate(sidecar, text=PROMPT, max_new_tokens=8, **forced)
        assert _drafter_series(sidecar, "short-lived")["specroute_decisions_total"] == 1
    finally:
        sidecar.stub.RemoveDrafter(pb.RemoveDrafterRequest(name="short-lived"), metadata=ADMIN)


def test_admin_changes_waiting_their_turn_leave_scrapes_and_snapshots_served(
    sidecar: SidecarThread,
) -> None:
    """RegisterDrafter and RemoveDrafter wait for one another (one admin change at a time)
    and ran in the event loop's default executor: a burst of them, each loading a model,
    took every one of its threads, and /metrics scrapes and policy snapshots waited
    behind them. They wait in a thread of their own now. Here the turn is held while more changes
    arrive than the default executor has threads."""
    service = sidecar.service
    names = [f"queued-{i}" for i in range(16)]  # the default executor: min(32, cpus + 4)
    with service._admin_lock:
        calls = [
            sidecar.stub.RegisterDrafter.future(
                pb.RegisterDrafterRequest(name=name, kind="ngram"), metadata=ADMIN, timeout=60
            )
            for name in names
        ]
        time.sleep(0.5)  # every call reaches the sidecar and waits for its turn
        with urllib.request.urlopen(sidecar.metrics_url, timeout=10) as response:
            assert response.status == 200
        snapshot = asyncio.run_coroutine_threadsafe(
            asyncio.to_thread(service.snapshot), sidecar.loop
        )
        snapshot.result(timeout=10)
    assert [call.result().name for call in calls] == names
    for name in names:
        sidecar.stub.RemoveDrafter(pb.RemoveDrafterRequest(name=name), metadata=ADMIN)


def test_drafters_that_do_not_fit_are_refused_and_the_sidecar_serves_on(
    serving_world: ServingWorld, components: Components, tmp_path: Path
) -> None:
    """Registered drafters had no bound: one whose weights did not fit in the memory left
    got the sidecar killed for memory (the kernel's OOM killer, a container's limit) with
    every generation in flight, and again at each start that restored it; and each one
    more made every Route price more arms. Now RESOURCE_EXHAUSTED, nothing changed, and a
    stored drafter that no longer fits is kept but not served."""
    from router.settings import Limits

    def sidecar(**limits: int) -> SidecarThread:
        bounded = Limits(**{**serving_world.settings(tmp_path).limits.model_dump(), **limits})
        return SidecarThread(serving_world.settings(tmp_path / "state", limits=bounded), components)

    def register(running: SidecarThread, name: str) -> Any:
        path = str(serving_world.spare_dir)
        request = pb.RegisterDrafterRequest(name=name, kind="model", path=path, tasks=["code"])
        return running.stub.RegisterDrafter(request, metadata=ADMIN, timeout=120)

    def names(running: SidecarThread) -> tuple[set[str], dict[str, str]]:
        listed = running.stub.ListDrafters(pb.ListDraftersRequest())
        return {d.name for d in listed.drafters}, {d.name: d.error for d in listed.unavailable}

    bounded = sidecar(max_registered_drafters=1)
    try:
        assert register(bounded, "first").name == "first"
        served = names(bounded)
        with pytest.raises(grpc.RpcError) as full:
            register(bounded, "second")
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 drafters are registered, limits.max_registered_drafters is 1" in (
            full.value.details() or ""
        )
        assert names(bounded) == served
        assert bounded.stub.Route(pb.RouteRequest(text="Hello"), timeout=30).drafter
    finally:
        bounded.stop()
    # More headroom than this machine has memory: nothing fits.
    starved = sidecar(drafter_memory_headroom_mib=1 << 40)
    try:
        served, unserved = names(starved)
        assert "first" not in served and "first" in unserved
        assert "needs" in unserved["first"] and "GiB is free under" in unserved["first"]
        with pytest.raises(grpc.RpcError) as no_room:
            register(starved, "second")
        assert no_room.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        message = no_room.value.details() or ""
        assert "drafter 'second' needs" in message and "GiB for its weights" in message
        assert "limits.drafter_memory_headroom_mib" in message, message
        assert names(starved) == (served, unserved)
        assert starved.stub.Route(pb.RouteRequest(text="Hello"), timeout=30).drafter
    finally:
        starved.stop()


def test_clients_keepalive_pings_are_accepted_on_idle_connections(
    serving_world: ServingWorld, components: Components, tmp_path: Path
) -> None:
    """gRPC's default server took keepalive pings no more often than every 5 minutes, and
    none on a connection without a call: a client that pings (a grpc-go client with
    keepalive set, a proxy) was sent GOAWAY "too_many_pings" after three, its connection
    closed with any call in flight. Now one every grpc.min_client_ping_interval_s (5 s by
    default; 1 s here, for a short test)."""
    from router.settings import GrpcSettings

    settings = serving_world.settings(
        tmp_path / "state", grpc=GrpcSettings(min_client_ping_interval_s=0.5)
    )
    running = SidecarThread(settings, components)
    pinging = [
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    states: list[grpc.ChannelConnectivity] = []
    try:
        with grpc.insecure_channel(running.running.address, options=pinging) as channel:
            channel.subscribe(states.append, try_to_connect=True)
            stub = router_pb2_grpc.RouterStub(channel)
            assert stub.Route(pb.RouteRequest(text="Hello"), timeout=30).drafter
            time.sleep(8)  # about 8 pings without a call
            assert stub.Route(pb.RouteRequest(text="Hello"), timeout=30).drafter
            ready = states.index(grpc.ChannelConnectivity.READY)
            assert set(states[ready:]) == {grpc.ChannelConnectivity.READY}, states
            channel.unsubscribe(states.append)
    finally:
        running.stop()


def test_connections_past_their_age_are_closed_and_clients_connect_again(
    serving_world: ServingWorld, components: Components, tmp_path: Path
) -> None:
    """grpc.max_connection_age_s: behind a TCP load balancer a client's one connection
    kept it on one replica for good; past the age it is sent GOAWAY and connects again,
    and its calls go on."""
    from router.settings import GrpcSettings

    aged = GrpcSettings(max_connection_age_s=1.0, max_connection_age_grace_s=30.0)
    running = SidecarThread(serving_world.settings(tmp_path / "state", grpc=aged), components)
    states: list[grpc.ChannelConnectivity] = []
    try:
        with grpc.insecure_channel(running.running.address) as channel:
            channel.subscribe(states.append, try_to_connect=True)
            stub = router_pb2_grpc.RouterStub(channel)
            request = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=8)
            assert list(stub.Generate(request, timeout=60))[-1].HasField("stats")
            time.sleep(3)
            assert stub.Route(pb.RouteRequest(text="Hello"), timeout=30).drafter
            ready = [i for i, state in enumerate(states) if state == grpc.ChannelConnectivity.READY]
            assert len(ready) >= 2, states  # connected again
            channel.unsubscribe(states.append)
    finally:
        running.stop()


def test_a_score_of_a_drafter_registered_again_while_scored_is_dropped(
    sidecar: SidecarThread, PROMPT: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drafter removed and registered again under its name while the learner scored it
    (up to counterfactual_budget_s) had the old registration's score put on the new one's
    arms: the Report and Generate paths check the registration, this one did not."""
    import drafters
    from router.domain import DrafterSpec

    service = sidecar.service
    service._register_drafter(DrafterSpec("swap", "ngram"))
    scored = drafters.score_counterfactual_drafts
    swapped: list[str] = []

    def score_and_swap(drafter: Any, *args: Any) -> Any:
        result = scored(drafter, *args)
        if drafter.name == "swap" and not swapped:  # registered again meanwhile
            service._remove_drafter("swap")
            service._register_drafter(DrafterSpec("swap", "ngram", options={"min_n": "1"}))
            swapped.append("swap")
        return result

    monkeypatch.setattr(drafters, "score_counterfactual_drafts", score_and_swap)
    try:
        _, policy = _thompson_after_one_generate(
            sidecar, text=PROMPT, max_new_tokens=30, task_hint="math", force_drafter="math"
        )
        assert swapped, "swap was not scored"
        assert not [c for c, arms in policy.copies_.items() if "swap" in arms]
        assert [c for c, arms in policy.copies_.items() if "ngram" in arms]  # others were
    finally:
        service._remove_drafter("swap")
