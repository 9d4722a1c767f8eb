"""Arbitrary requests over real gRPC and HTTP: every one is answered or refused with a
status that says whose fault it is (never INTERNAL, UNKNOWN or a 5xx), and the sidecar
keeps serving.

The hand-written cases in ``test_bad_input.py`` pin each known bad input to its status;
this module looks for the ones nobody wrote down, two ways: random requests (hypothesis:
odd Unicode, unknown kinds and options, paths outside the model roots, arbitrary JSON for a
policy, several fields wrong at once), and each field of a served request in turn at the
extremes of its type (NaN, infinities, the largest integers, a NUL character), found from
the message's descriptor so that a field added later is covered too. The second found
what the first did not: a static table's k of 10**30 (every Route then UNKNOWN), a totals
Report of 2**63 drafted tokens (MemoryError), a NUL in a model path, a UCB state saved
under another ``k_max``. The HTTP fronts (TGI's and OpenAI's) get each JSON value of a
served body at its extremes, NaN and infinities included (Python's JSON parser reads
them)."""

from __future__ import annotations

import contextlib
import functools
import http.client
import itertools
import json
import math
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.pb import router_pb2 as pb
from router.pb.router_pb2_grpc import RouterStub
from tests.router.conftest import ADMIN, ServingWorld, SidecarThread

# The statuses a caller's mistake may get; INTERNAL and UNKNOWN mean the sidecar failed.
CALLER_FAULTS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Text that protobuf can carry (valid UTF-8: no lone surrogates).
TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
FLOAT32 = st.floats(width=32)  # NaN, infinities, subnormals and the extremes included
DOUBLE = st.floats()
UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
SMALL = st.integers(0, 40)


def _sampling() -> st.SearchStrategy[pb.SamplingParams]:
    return st.builds(
        pb.SamplingParams,
        do_sample=st.booleans(),
        temperature=st.one_of(st.floats(0.05, 4.0), FLOAT32),
        top_k=st.one_of(st.integers(0, 50), UINT32),
        top_p=st.one_of(st.floats(0.05, 1.0), FLOAT32),
        typical_p=st.one_of(st.floats(0.05, 1.0), FLOAT32),
        seed=st.one_of(st.none(), UINT64),
        stop=st.lists(TEXT, max_size=3),
        ignore_eos=st.booleans(),
        stop_token_ids=st.lists(st.one_of(st.integers(0, 300), UINT32), max_size=3),
        repetition_penalty=st.one_of(st.none(), st.floats(0.5, 2.0), FLOAT32),
        presence_penalty=st.one_of(st.floats(-2, 2), FLOAT32),
        frequency_penalty=st.one_of(st.floats(-2, 2), FLOAT32),
        min_tokens=st.one_of(st.integers(0, 8), UINT32),
        logit_bias=st.dictionaries(
            st.one_of(st.integers(0, 300), UINT32),
            st.one_of(st.floats(-100, 100), FLOAT32),
            max_size=3,
        ),
        min_p=st.one_of(st.floats(0, 1), FLOAT32),
        allowed_token_ids=st.lists(st.one_of(st.integers(0, 300), UINT32), max_size=3),
        bad_words=st.lists(TEXT, max_size=2),
    )


def _prompt_fields(world: ServingWorld) -> st.SearchStrategy[dict[str, Any]]:
    real = st.sampled_from(sorted(world.prompts.values()))
    content = st.one_of(real, st.builds(str.__add__, real, TEXT), TEXT)
    text = st.fixed_dictionaries({"text": content})
    message = st.builds(
        pb.ChatMessage,
        role=st.one_of(st.sampled_from(["user", "system", "assistant"]), TEXT),
        content=content,
    )
    conversation = st.fixed_dictionaries(
        {"conversation": st.lists(message, max_size=4).map(lambda m: pb.Conversation(messages=m))}
    )
    return st.one_of(text, text, conversation, st.just({}))


def _common_fields(world: ServingWorld) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "request_id": st.one_of(st.just(""), TEXT),
            "task_hint": st.one_of(st.just(""), st.sampled_from(world.tasks), TEXT),
            # Mostly small (generation is real), sometimes the extremes.
            "max_new_tokens": st.one_of(st.integers(1, 8), UINT32),
            "sampling": _sampling(),
        }
    )


def _route_requests(world: ServingWorld) -> st.SearchStrategy[pb.RouteRequest]:
    return st.builds(
        lambda common, prompt: pb.RouteRequest(**common, **prompt),
        _common_fields(world),
        _prompt_fields(world),
    )


def _generate_requests(world: ServingWorld) -> st.SearchStrategy[pb.GenerateRequest]:
    drafters = ("none", "ngram", "generic", *world.tasks)
    pins = st.fixed_dictionaries(
        {},
        optional={
            "force_drafter": st.one_of(st.sampled_from(drafters), TEXT),
            "force_draft_length": st.one_of(st.integers(0, 32), UINT32),
            "force_stop_threshold": st.one_of(st.floats(0.0, 0.99), FLOAT32),
            "no_update": st.booleans(),
            "prediction": st.one_of(TEXT, st.sampled_from(sorted(world.prompts.values()))),
        },
    )
    return st.builds(
        lambda common, prompt, pinned: pb.GenerateRequest(**common, **prompt, **pinned),
        _common_fields(world),
        _prompt_fields(world),
        pins,
    )


def _outcomes() -> st.SearchStrategy[dict[str, Any]]:
    """RouteOutcome fields (the request id is set to one the sidecar routed)."""
    counts = st.lists(st.one_of(SMALL, UINT32), max_size=6)
    return st.fixed_dictionaries(
        {},
        optional={
            "steps": st.one_of(SMALL, UINT32),
            "drafted_per_step": counts,
            "accepted_per_step": counts,
            "drafted_tokens": st.one_of(SMALL, UINT64),
            "accepted_tokens": st.one_of(SMALL, UINT64),
            "accepted_per_position": st.lists(st.one_of(SMALL, UINT64), max_size=6),
            "draft_time_s": DOUBLE,
            "verify_time_s": DOUBLE,
            "wall_time_s": DOUBLE,
            "generated_tokens": st.one_of(SMALL, UINT32),
            "plain_token_time_s": DOUBLE,
        },
    )


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT)
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)
        ),
        max_leaves=8,
    )


def _policy_requests() -> st.SearchStrategy[pb.SetPolicyRequest]:
    names = st.one_of(
        st.sampled_from(["thompson", "ucb", "fixed", "static", "oracle", "none"]), TEXT
    )
    known_keys = st.sampled_from(
        ["drafter", "draft_length", "prior_strength", "exploration", "seed", "stop_threshold"]
    )
    config = st.one_of(
        st.dictionaries(st.one_of(known_keys, TEXT), _json_values(), max_size=3).map(json.dumps),
        _json_values().map(json.dumps),
        TEXT,
    )
    return st.builds(
        pb.SetPolicyRequest, policy=names, config_json=config, reset_state=st.booleans()
    )


def _register_requests(world: ServingWorld) -> st.SearchStrategy[pb.RegisterDrafterRequest]:
    paths = st.sampled_from(
        [
            "",
            str(world.spare_dir),
            str(world.outside_dir),
            str(world.mismatched_dir),
            str(world.pickle_dir),
            str(world.extra_root / ".." / "outside" / "spare"),
            str(world.extra_root),
            "/etc/passwd",
            "relative/path",
        ]
    )
    option_keys = st.one_of(
        st.sampled_from(["min_n", "max_n", "exit_layer", "min_match", "model_k", "base"]), TEXT
    )
    option_values = st.one_of(
        st.integers(-(2**70), 2**70).map(str),
        st.floats().map(str),
        TEXT,
        st.sampled_from(world.tasks),
    )
    return st.builds(
        pb.RegisterDrafterRequest,
        name=st.one_of(st.sampled_from(["fuzzed", "generic", "none", "ngram"]), TEXT),
        kind=st.one_of(st.sampled_from(["model", "ngram", "self", "copy-or-model"]), TEXT),
        path=st.one_of(paths, TEXT),
        tasks=st.lists(st.one_of(st.sampled_from(world.tasks), TEXT), max_size=3),
        finetune_sample=st.lists(TEXT, max_size=3),
        options=st.dictionaries(option_keys, option_values, max_size=3),
    )


def _answered_or_refused(call: Callable[[], object]) -> grpc.StatusCode:
    """Run ``call``; the status it ended with (OK when it returned)."""
    try:
        call()
    except grpc.RpcError as error:
        assert error.code() in CALLER_FAULTS, (error.code(), error.details())
        assert error.details(), error.code()
        return error.code()
    return grpc.StatusCode.OK


def _streamed(rpc: Callable[..., Any], request: Message) -> list[Any]:
    """Every message of a server-streaming call."""
    return list(rpc(request, timeout=60))


def _still_serves(sidecar: SidecarThread, world: ServingWorld) -> None:
    request = pb.RouteRequest(text=world.prompts[world.tasks[0]])
    assert sidecar.stub.Route(request, timeout=30).task_cluster


def _none_failed(failed: list[str], sidecar: SidecarThread, world: ServingWorld) -> None:
    """No call got a server's fault, and the sidecar still routes."""
    assert not failed, "\n".join(failed)
    _still_serves(sidecar, world)


def _fuzz(
    sidecar: SidecarThread,
    world: ServingWorld,
    requests: st.SearchStrategy[Any],
    call: Callable[[Any], object],
) -> None:
    """``call`` on each drawn request is answered or refused; then the sidecar still routes."""

    @FUZZ
    @given(request=requests)
    def check(request: Any) -> None:
        _answered_or_refused(lambda: call(request))

    check()
    _still_serves(sidecar, world)


def test_any_route_is_answered_or_refused(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    route = sidecar.stub.Route
    _fuzz(sidecar, serving_world, _route_requests(serving_world), lambda r: route(r, timeout=30))


def test_any_generate_is_answered_or_refused(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    generate = sidecar.stub.Generate
    requests = _generate_requests(serving_world)
    _fuzz(sidecar, serving_world, requests, lambda r: list(generate(r, timeout=60)))


def test_any_report_is_answered_or_refused(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    stub, text = sidecar.stub, serving_world.prompts[serving_world.tasks[1]]

    def report(fields: dict[str, Any]) -> object:
        routed = stub.Route(pb.RouteRequest(text=text))
        return stub.Report(pb.RouteOutcome(request_id=routed.request_id, **fields), timeout=30)

    _fuzz(sidecar, serving_world, _outcomes(), report)


def test_any_admin_call_is_answered_or_refused(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    world = serving_world
    before = {
        d.name for d in sidecar.stub.ListDrafters(pb.ListDraftersRequest(), metadata=ADMIN).drafters
    }

    @FUZZ
    @given(
        register=_register_requests(world),
        policy=_policy_requests(),
        classifier_path=st.one_of(
            st.sampled_from(["", str(world.spare_dir), str(world.world.root), "/etc"]), TEXT
        ),
    )
    def check(
        register: pb.RegisterDrafterRequest, policy: pb.SetPolicyRequest, classifier_path: str
    ) -> None:
        stub = sidecar.stub
        if (
            _answered_or_refused(lambda: stub.RegisterDrafter(register, metadata=ADMIN))
            == grpc.StatusCode.OK
        ):
            stub.RemoveDrafter(pb.RemoveDrafterRequest(name=register.name), metadata=ADMIN)
        _answered_or_refused(lambda: stub.SetPolicy(policy, metadata=ADMIN))
        reload = pb.ReloadClassifierRequest(path=classifier_path)
        _answered_or_refused(lambda: stub.ReloadClassifier(reload, metadata=ADMIN))
        _answered_or_refused(
            lambda: stub.RemoveDrafter(pb.RemoveDrafterRequest(name=register.name), metadata=ADMIN)
        )

    check()
    after = {
        d.name for d in sidecar.stub.ListDrafters(pb.ListDraftersRequest(), metadata=ADMIN).drafters
    }
    assert after <= before
    _still_serves(sidecar, world)


# One field at a time: from a request that is served, each field in turn (nested ones
# too, found from the message's descriptor, so a new field is covered when it is added)
# set to each extreme of its type.
EXTREMES: dict[int, tuple[Any, ...]] = {
    FieldDescriptor.TYPE_FLOAT: (math.nan, math.inf, -math.inf, -1.0, 0.0, 3.4e38, -1e-45),
    FieldDescriptor.TYPE_DOUBLE: (math.nan, math.inf, -math.inf, -1.0, 0.0, 1e308, -5e-324),
    FieldDescriptor.TYPE_UINT32: (0, 1, 2**31, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**63, 2**64 - 1),
    FieldDescriptor.TYPE_BOOL: (False, True),
    FieldDescriptor.TYPE_STRING: ("", " ", "\x00", "<|im_end|>", "é" * 5000),
}
M = TypeVar("M", bound=Message)
# Option values and JSON values, as an operator could mistype them.
NUMBERS_AS_TEXT = ("-1", "0", "1e400", "nan", "99999999999999999999", "3.5", "", "x")
JSON_EXTREMES: tuple[Any, ...] = (
    None,
    -1,
    0,
    10**30,
    -(10**30),
    -1e308,
    1e308,
    math.nan,
    math.inf,
    0.5,
    "x",
    "\x00",
    "\ud800",  # a lone surrogate: JSON's escapes can spell it, UTF-8 cannot
    [],
    {},
    True,
)


def _copy(message: M) -> M:
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _mutants(message: Message) -> Iterator[tuple[str, Message]]:
    """(what changed, ``message`` with one field set to an extreme), for every field."""
    for field in message.DESCRIPTOR.fields:
        repeated = field.is_repeated
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for key in getattr(message, field.name):
                for value in NUMBERS_AS_TEXT:
                    copy = _copy(message)
                    getattr(copy, field.name)[key] = value
                    yield f"{field.name}[{key}]={value!r}", copy
        elif field.message_type is not None:
            items = getattr(message, field.name)
            present = bool(items) if repeated else message.HasField(field.name)
            if not present:
                continue
            inner_message = items[0] if repeated else items
            for path, inner in _mutants(inner_message):
                copy = _copy(message)
                target = getattr(copy, field.name)
                (target[0] if repeated else target).CopyFrom(inner)
                yield f"{field.name}.{path}", copy
        else:
            for value in EXTREMES.get(field.type, ()):
                copy = _copy(message)
                if repeated:
                    items = getattr(copy, field.name)
                    items[:] = [value] * max(len(items), 1)
                else:
                    setattr(copy, field.name, value)
                yield f"{field.name}={value!r}"[:60], copy


def _failures(mutants: Iterator[tuple[str, Message]], call: Callable[[Any], object]) -> list[str]:
    """What each mutant got that is not OK or a caller's fault."""
    failed = []
    for what, request in mutants:
        try:
            call(request)
        except grpc.RpcError as error:
            if error.code() not in CALLER_FAULTS or not error.details():
                failed.append(f"{what}: {error.code().name} {error.details()}")
    return failed


def _sampled(world: ServingWorld) -> dict[str, Any]:
    return {
        "text": world.prompts[world.tasks[0]],
        "task_hint": world.tasks[0],
        "max_new_tokens": 4,
        "sampling": pb.SamplingParams(
            do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=7, stop=["\n\n"]
        ),
    }


def _conversation(world: ServingWorld) -> pb.Conversation:
    return pb.Conversation(
        messages=[
            pb.ChatMessage(role="system", content="Be brief."),
            pb.ChatMessage(role="user", content=world.prompts[world.tasks[1]]),
        ]
    )


def test_each_generate_field_at_its_extremes(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    pinned = pb.GenerateRequest(
        **_sampled(serving_world),
        force_drafter="generic",
        force_draft_length=3,
        force_stop_threshold=0.5,
    )
    chat = pb.GenerateRequest(conversation=_conversation(serving_world), max_new_tokens=4)
    mutants = [*_mutants(pinned), *_mutants(chat)]
    failed = _failures(iter(mutants), lambda r: list(sidecar.stub.Generate(r, timeout=60)))
    _none_failed(failed, sidecar, serving_world)


def test_each_route_field_at_its_extremes(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    sampled = pb.RouteRequest(**_sampled(serving_world))
    chat = pb.RouteRequest(conversation=_conversation(serving_world), max_new_tokens=4)
    mutants = [*_mutants(sampled), *_mutants(chat)]
    failed = _failures(iter(mutants), lambda r: sidecar.stub.Route(r, timeout=30))
    _none_failed(failed, sidecar, serving_world)


def test_each_report_field_at_its_extremes(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    per_step = pb.RouteOutcome(
        steps=3,
        drafted_per_step=[3, 3, 2],
        accepted_per_step=[3, 1, 0],
        generated_tokens=7,
        plain_token_time_s=0.01,
        draft_time_s=0.01,
        verify_time_s=0.03,
        wall_time_s=0.05,
    )
    totals = pb.RouteOutcome(
        steps=3,
        drafted_tokens=8,
        accepted_tokens=4,
        accepted_per_position=[2, 1, 1],
        draft_time_s=0.01,
        verify_time_s=0.03,
        wall_time_s=0.05,
    )
    route = pb.RouteRequest(text=serving_world.prompts[serving_world.tasks[2]])

    def report(outcome: pb.RouteOutcome) -> pb.ReportAck:
        if not outcome.request_id:
            outcome.request_id = sidecar.stub.Route(route).request_id
        return sidecar.stub.Report(outcome, timeout=30)

    for outcome in (per_step, totals):
        assert report(_copy(outcome)).policy_version  # the baselines are served
    mutants = [*_mutants(per_step), *_mutants(totals)]
    _none_failed(_failures(iter(mutants), report), sidecar, serving_world)


def _policy_configs() -> dict[str, dict[str, Any]]:
    """A served configuration per policy, every key set (so each can be mutated)."""
    return {
        "thompson": {
            "gamma": 0.99,
            "gamma_drift": 0.8,
            "drift_z": 3.0,
            "k_max": 8,
            "seed": 0,
            "prior_alpha": 1.0,
            "prior_beta": 1.0,
            "similarity_weight": 8.0,
            "similarity_low": 0.2,
            "similarity_high": 0.9,
            "evidence_cap": 10.0,
            "transfer_weight": 16.0,
            "cost_window": 512,
            "per_request": True,
            "overhead_ewma": 0.05,
            "overhead_window": 16,
            "verify_slope_ratio": 0.05,
            "default_draft_cost_ratio": 0.1,
            "draft_cost_ratio": {"generic": 0.1},
            "similarity": {"generic": {"math": 0.5}},
            "copy_drafters": ["ngram"],
            "copy_k_max": 16,
            "draft_length": {"generic": 3},
            "cost_shape": {"math": "generic"},
            "copy_prior_weight": 2.0,
            "explore_length": "draw",
        },
        "ucb": {"k_max": 8, "exploration": 1.0, "gamma": 1.0, "seed": 0},
        "fixed": {"drafter": "generic", "k": 4},
        "static": {"table": {"code/0": ["code", 4]}, "default": ["generic", 4]},
    }


def _route_and_report(stub: RouterStub, route: pb.RouteRequest) -> None:
    """Route, then Report a measured outcome of the decision: the policy learns from it
    (a setting can break the learning and not the choosing)."""
    decision = stub.Route(route, timeout=30)
    k = decision.draft_length
    stub.Report(
        pb.RouteOutcome(
            request_id=decision.request_id,
            drafted_per_step=[k] * 4,
            accepted_per_step=[k, k // 2, 0, 0],
            draft_time_s=0.002 * 4 * k,
            verify_time_s=0.04,
            plain_token_time_s=0.01,
        ),
        timeout=30,
    )


def _json_mutants(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``value`` with one of its parts (itself, or any item of a dict or list within it,
    at any depth) replaced by an extreme, or one key of a dict left out."""
    for extreme in JSON_EXTREMES:
        yield f"{path}={extreme!r}", extreme
    items: list[tuple[Any, Any]] = []
    if isinstance(value, dict):
        items = list(value.items())
        for key in value:
            yield f"{path}.{key} left out", {k: v for k, v in value.items() if k != key}
    elif isinstance(value, list):
        items = list(enumerate(value))
    for key, item in items:
        for where, mutant in _json_mutants(item, f"{path}.{key}"):
            copy = dict(value) if isinstance(value, dict) else list(value)
            copy[key] = mutant
            yield where, copy


def test_each_policy_setting_at_its_extremes(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    stub = sidecar.stub
    failed = []
    for policy, config in _policy_configs().items():
        assert (
            stub.SetPolicy(
                pb.SetPolicyRequest(policy=policy, config_json=json.dumps(config)), metadata=ADMIN
            ).policy
            == policy
        )  # the baseline is served
        for what, mutant in _json_mutants(config):
            if not isinstance(mutant, dict):
                continue  # not an object: refused before any policy reads it (tested above)
            request = pb.SetPolicyRequest(policy=policy, config_json=json.dumps(mutant))
            failed += _failures(
                iter([(f"{policy} {what}", request)]),
                lambda r: stub.SetPolicy(r, metadata=ADMIN),
            )
            route = pb.RouteRequest(text=serving_world.prompts[serving_world.tasks[0]])
            failed += _failures(
                iter([(f"{policy} {what}: Route and Report", route)]),
                lambda r: _route_and_report(stub, r),
            )
    stub.SetPolicy(pb.SetPolicyRequest(policy="thompson"), metadata=ADMIN)
    _none_failed(failed, sidecar, serving_world)


def test_each_registration_field_at_its_extremes(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    stub = sidecar.stub
    baselines = [
        pb.RegisterDrafterRequest(
            name="fuzz-ngram", kind="ngram", options={"min_n": "2", "max_n": "4"}
        ),
        pb.RegisterDrafterRequest(
            name="fuzz-copy",
            kind="copy-or-model",
            path=str(serving_world.spare_dir),
            tasks=[serving_world.tasks[0]],
            finetune_sample=["a sample"],
            options={"min_match": "3", "model_k": "3"},
        ),
    ]

    def register(request: pb.RegisterDrafterRequest) -> object:
        info = stub.RegisterDrafter(request, metadata=ADMIN)
        stub.RemoveDrafter(pb.RemoveDrafterRequest(name=info.name), metadata=ADMIN)
        return info

    for baseline in baselines:
        register(_copy(baseline))  # the baseline is served
    mutants = [m for baseline in baselines for m in _mutants(baseline)]
    failed = _failures(iter(mutants), register)
    _none_failed(failed, sidecar, serving_world)


def test_each_classifier_path_at_its_extremes(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    stub = sidecar.stub
    served = pb.ReloadClassifierRequest(path=str(serving_world.world.root / "classifier"))
    assert stub.ReloadClassifier(served, metadata=ADMIN).labels  # the baseline is served
    failed = _failures(_mutants(served), lambda r: stub.ReloadClassifier(r, metadata=ADMIN))
    stub.ReloadClassifier(served, metadata=ADMIN)
    _none_failed(failed, sidecar, serving_world)


def _http_failure(url: str, body: Any) -> str | None:
    """Why POSTing ``body`` (bytes: as they are) to ``url`` got a server's fault (5xx; TGI's
    424, a generation that failed; a broken reply), or None."""
    # NaN and Infinity as Python writes them
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
            return None
    except urllib.error.HTTPError as error:
        failed = error.code >= 500 or error.code == 424
        return f"{error.code} {error.read()[:200]!r}" if failed else None
    except (http.client.HTTPException, ConnectionError) as error:
        return f"broken reply: {error!r}"


def test_each_http_body_value_at_its_extremes(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    prompt = serving_world.prompts[serving_world.tasks[0]]
    sampled = {"temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 7, "stop": ["\n\n"]}
    # Every served vLLM / OpenAI extension, each at its extremes in turn.
    extended = {
        **sampled,
        "min_p": 0.05,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "repetition_penalty": 1.1,
        "min_tokens": 1,
        "logit_bias": {"5": 1.5},
        "stop_token_ids": [5],
        "bad_words": ["zebra"],
        "ignore_eos": False,
        "include_stop_str_in_output": False,
        "n": 2,
    }
    bodies = {
        "/generate": {
            "inputs": prompt,
            "parameters": {"do_sample": True, "max_new_tokens": 4, **sampled},
        },
        "/v1/completions": {"model": "target", "prompt": [prompt], "max_tokens": 4, **extended},
        "/v1/chat/completions": {
            "model": "target",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 4,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "chat_template_kwargs": {"enable_thinking": False},
            **extended,
        },
        "/v1/responses": {
            "model": "target",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": prompt}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Yes."}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "done"},
                {"type": "message", "role": "user", "content": "Go on."},
            ],
            "tool_choice": "auto",
            "parallel_tool_calls": True,
            "include": ["message.output_text.logprobs"],
            "top_logprobs": 2,
            "max_output_tokens": 4,
            "temperature": 0.8,
            "top_p": 0.9,
            "top_k": 20,
            "presence_penalty": 0.5,
            "logit_bias": {"5": 1.5},
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
            "metadata": {"k": "v"},
        },
    }
    bodies["/v1/messages"] = {
        "model": "target",
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": prompt}]},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "done"}],
            },
        ],
        "max_tokens": 4,
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 20,
        "stop_sequences": ["\n\n"],
        "tool_choice": {"type": "auto"},
        "metadata": {"user_id": "u"},
    }
    failed = []
    for route, body in bodies.items():
        url = sidecar.http_url + route
        assert _http_failure(url, body) is None  # the baseline is served
        for what, mutant in _json_mutants(body):
            if isinstance(mutant, dict) and (why := _http_failure(url, mutant)):
                failed.append(f"{route} {what}: {why}")
    _none_failed(failed, sidecar, serving_world)


# Deeper than Python's JSON parser recurses: RecursionError, a 500 and UNKNOWN before.
TOO_DEEP = "[" * 100_000 + "]" * 100_000
# An integer past the 4,300 digits Python converts from text: a ValueError, a 500 before.
TOO_LONG_AN_INTEGER = '{"model": "target", "prompt": "hi", "x": ' + "1" * 5000 + "}"


def test_json_nested_deeper_than_the_parser_goes_is_refused(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    failed = [
        f"{route}: {why}"
        for route in ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/messages")
        for body in (TOO_DEEP, TOO_LONG_AN_INTEGER)
        if (why := _http_failure(sidecar.http_url + route, body.encode()))
    ]
    request = pb.SetPolicyRequest(policy="thompson", config_json=TOO_DEEP)
    failed += _failures(
        iter([("SetPolicy", request)]), lambda r: sidecar.stub.SetPolicy(r, metadata=ADMIN)
    )
    _none_failed(failed, sidecar, serving_world)


def test_a_body_that_is_not_in_its_content_encoding_is_refused(
    sidecar: SidecarThread, serving_world: ServingWorld, caplog: pytest.LogCaptureFixture
) -> None:
    """A body sent as gzip that is not gzip failed reading it (a 500 on every route; found
    by fuzzing the HTTP fronts); one that is gzip is read. The refusal logs no error (the
    server's read of the rest re-raised it as an "Unhandled exception" with a traceback)."""
    import gzip
    import logging

    body = json.dumps({"inputs": "x", "parameters": {"max_new_tokens": 2}}).encode()
    failed = []
    for route in ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/messages"):
        connection = http.client.HTTPConnection(sidecar.http_url.split("//")[1], timeout=60)
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        connection.request("POST", route, body=body, headers=headers)
        reply = connection.getresponse()
        text = reply.read().decode()
        if reply.status not in (400, 422) or "the body cannot be read" not in text:
            failed.append(f"{route}: {reply.status} {text[:200]}")
        connection.close()
    connection = http.client.HTTPConnection(sidecar.http_url.split("//")[1], timeout=60)
    connection.request("POST", "/generate", body=gzip.compress(body), headers=headers)
    reply = connection.getresponse()
    assert reply.status == 200, reply.read()
    connection.close()
    _none_failed(failed, sidecar, serving_world)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# Bytes none of these methods' messages parses from: field 1 (a string in each) holding a
# lone surrogate's UTF-8-like encoding, and a field header whose length runs past the end.
NOT_A_MESSAGE = (b"\x0a\x05hi\xed\xa0\x80", b"\xff\xff\xff")


def test_bytes_that_are_not_the_methods_message_are_invalid_argument(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    """A request whose bytes do not parse as the method's message (a client built from
    another proto, a broken proxy) is INVALID_ARGUMENT naming the method, on unary and
    streaming methods and admin ones alike (grpc.aio answered UNKNOWN and logged a
    traceback); a call without the admin token is still UNAUTHENTICATED first."""
    raw = {"request_serializer": None, "response_deserializer": None}
    methods = {
        "Route": sidecar.channel.unary_unary("/specroute.v1.Router/Route", **raw),
        "Report": sidecar.channel.unary_unary("/specroute.v1.Router/Report", **raw),
        "SetPolicy": sidecar.channel.unary_unary("/specroute.v1.Router/SetPolicy", **raw),
        "Generate": sidecar.channel.unary_stream("/specroute.v1.Router/Generate", **raw),
    }
    for name, method in methods.items():
        for data in NOT_A_MESSAGE:
            with pytest.raises(grpc.RpcError) as refused:
                answer = method(data, timeout=30, metadata=ADMIN)
                list(answer) if name == "Generate" else None
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert f"/specroute.v1.Router/{name} is not its message" in refused.value.details()
    with pytest.raises(grpc.RpcError) as anonymous:
        methods["SetPolicy"](NOT_A_MESSAGE[0], timeout=30)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    _still_serves(sidecar, serving_world)


def test_admin_changes_under_traffic_fail_no_request(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    """Drafters registered and removed, policies switched and classifiers reloaded while
    Generate, Route and Report run in other threads: every call is answered or refused as
    a caller's fault (a request pinned to a drafter just removed is NOT_FOUND). A 60-second
    version of this ran 1,038 Generate, 5,138 Route + Report and 1,790 admin calls cleanly
    (2026-12-04); this one runs a few seconds."""
    import threading
    import time

    stub, world = sidecar.stub, serving_world
    prompts = sorted(world.prompts.values())
    deadline = time.monotonic() + 8
    failed: list[str] = []
    served = {"generate": 0, "route": 0, "admin": 0}

    def call(kind: str, make: Callable[[], object]) -> None:
        try:
            make()
            served[kind] += 1
        except grpc.RpcError as error:
            if error.code() not in CALLER_FAULTS:
                failed.append(f"{kind}: {error.code().name} {error.details()}")

    def generating(offset: int) -> None:
        for n in itertools.count(offset):
            if time.monotonic() > deadline:
                return
            request = pb.GenerateRequest(
                text=prompts[n % len(prompts)],
                max_new_tokens=8,
                force_drafter=["", "spare", "live-ngram", "generic"][n % 4],
                sampling=pb.SamplingParams(do_sample=bool(n % 2), temperature=0.9, seed=n),
            )
            call("generate", functools.partial(_streamed, stub.Generate, request))

    def routing() -> None:
        for n in itertools.count():
            if time.monotonic() > deadline:
                return

            def route_and_report(text: str = prompts[n % len(prompts)]) -> None:
                decision = stub.Route(pb.RouteRequest(text=text))
                k = decision.draft_length
                outcome = pb.RouteOutcome(
                    request_id=decision.request_id,
                    drafted_per_step=[k, k],
                    accepted_per_step=[k, 0],
                    draft_time_s=0.01,
                    verify_time_s=0.02,
                )
                stub.Report(outcome, timeout=30)

            call("route", route_and_report)

    def administering() -> None:
        spare = pb.RegisterDrafterRequest(name="spare", kind="model", path=str(world.spare_dir))
        classifiers = [world.classifier_v2_dir, world.world.root / "classifier"]
        changes: list[Callable[[], object]] = [
            lambda: stub.RegisterDrafter(spare, metadata=ADMIN),
            lambda: stub.RegisterDrafter(
                pb.RegisterDrafterRequest(name="live-ngram", kind="ngram"), metadata=ADMIN
            ),
            lambda: stub.SetPolicy(pb.SetPolicyRequest(policy="ucb"), metadata=ADMIN),
            lambda: stub.ReloadClassifier(
                pb.ReloadClassifierRequest(path=str(classifiers[0])), metadata=ADMIN
            ),
            lambda: stub.RemoveDrafter(pb.RemoveDrafterRequest(name="spare"), metadata=ADMIN),
            lambda: stub.SetPolicy(pb.SetPolicyRequest(policy="thompson"), metadata=ADMIN),
            lambda: stub.RemoveDrafter(pb.RemoveDrafterRequest(name="live-ngram"), metadata=ADMIN),
            lambda: stub.ReloadClassifier(
                pb.ReloadClassifierRequest(path=str(classifiers[1])), metadata=ADMIN
            ),
        ]
        for n in itertools.count():
            if time.monotonic() > deadline:
                return
            call("admin", changes[n % len(changes)])

    threads = [threading.Thread(target=generating, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=routing), threading.Thread(target=administering)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert min(served.values()) > 0, served
    _none_failed(failed, sidecar, serving_world)
    stub.SetPolicy(pb.SetPolicyRequest(policy="thompson"), metadata=ADMIN)
    # The session's sidecar serves the world's classifier again (the loop may have ended
    # on v2; a later test of this process compares with the world's).
    world_classifier = str(serving_world.world.root / "classifier")
    stub.ReloadClassifier(pb.ReloadClassifierRequest(path=world_classifier), metadata=ADMIN)
    for name in ("spare", "live-ngram"):
        with contextlib.suppress(grpc.RpcError):
            stub.RemoveDrafter(pb.RemoveDrafterRequest(name=name), metadata=ADMIN)
