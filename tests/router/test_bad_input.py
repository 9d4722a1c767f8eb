"""Bad input: each refused with its status code while the server keeps serving."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from router.pb import router_pb2 as pb
from tests.router.conftest import ADMIN, ServingWorld, SidecarThread

PROMPT = "def add(a, b):\n    return"
LONG_PROMPT = "word " * 600  # over the limit of 512 tokens

Call = Callable[[SidecarThread, ServingWorld], object]


def _generate(**fields: object) -> Call:
    def call(sidecar: SidecarThread, world: ServingWorld) -> object:
        return list(sidecar.stub.Generate(pb.GenerateRequest(**fields), timeout=60))

    return call


def _route(**fields: object) -> Call:
    return lambda sidecar, world: sidecar.stub.Route(pb.RouteRequest(**fields))


def _register(kind: str, path_of: Callable[[ServingWorld], str], name: str = "new") -> Call:
    def call(sidecar: SidecarThread, world: ServingWorld) -> object:
        request = pb.RegisterDrafterRequest(name=name, kind=kind, path=path_of(world))
        return sidecar.stub.RegisterDrafter(request, metadata=ADMIN)

    return call


CASES: dict[str, tuple[Call, grpc.StatusCode, str]] = {
    "empty prompt": (_route(text="  "), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "empty conversation": (
        _route(conversation=pb.Conversation()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "empty",
    ),
    "prompt over the token limit": (
        _route(text=LONG_PROMPT),
        grpc.StatusCode.INVALID_ARGUMENT,
        "over the limit",
    ),
    "request over the size limit": (
        _route(text="x" * (1 << 20)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
    "max_new_tokens 0": (
        _generate(text=PROMPT, max_new_tokens=0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_new_tokens",
    ),
    "max_new_tokens over the limit": (
        _generate(text=PROMPT, max_new_tokens=201),
        grpc.StatusCode.INVALID_ARGUMENT,
        "over the limit",
    ),
    "temperature below 0": (
        _generate(text=PROMPT, max_new_tokens=4, sampling=pb.SamplingParams(temperature=-0.5)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "temperature",
    ),
    "top_p above 1": (
        _route(text=PROMPT, sampling=pb.SamplingParams(do_sample=True, top_p=1.5)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_p",
    ),
    "top_p below 0": (
        _route(text=PROMPT, sampling=pb.SamplingParams(do_sample=True, top_p=-0.1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_p",
    ),
    "unknown task hint": (
        _route(text=PROMPT, task_hint="poetry"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "task hint",
    ),
    "unknown drafter": (
        _generate(text=PROMPT, max_new_tokens=4, force_drafter="nope"),
        grpc.StatusCode.NOT_FOUND,
        "nope",
    ),
    "duplicate drafter name": (
        _register("model", lambda w: str(w.spare_dir), name="generic"),
        grpc.StatusCode.ALREADY_EXISTS,
        "generic",
    ),
    "unknown drafter kind": (
        _register("lstm", lambda w: str(w.spare_dir)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "kind",
    ),
    "path outside the model roots": (
        _register("model", lambda w: str(w.outside_dir)),
        grpc.StatusCode.PERMISSION_DENIED,
        "outside the configured model roots",
    ),
    "path escaping the root with ..": (
        _register("model", lambda w: f"{w.extra_root}/../outside/spare"),
        grpc.StatusCode.PERMISSION_DENIED,
        "outside",
    ),
    "pickle-only weights": (
        _register("model", lambda w: str(w.pickle_dir)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "pickle",
    ),
    "tokenizer that does not match": (
        _register("model", lambda w: str(w.mismatched_dir)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "vocabulary sizes differ",
    ),
    "report for an unknown request id": (
        lambda sidecar, world: sidecar.stub.Report(pb.RouteOutcome(request_id="never-routed")),
        grpc.StatusCode.NOT_FOUND,
        "never-routed",
    ),
    "remove a built-in drafter": (
        lambda sidecar, world: sidecar.stub.RemoveDrafter(
            pb.RemoveDrafterRequest(name="generic"), metadata=ADMIN
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "built-in",
    ),
    "bad policy config json": (
        lambda sidecar, world: sidecar.stub.SetPolicy(
            pb.SetPolicyRequest(policy="thompson", config_json="[1"), metadata=ADMIN
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "JSON",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_and_the_server_keeps_serving(
    sidecar: SidecarThread, serving_world: ServingWorld, case: str
) -> None:
    call, code, fragment = CASES[case]
    drafters_before = {d.name for d in sidecar.stub.ListDrafters(pb.ListDraftersRequest()).drafters}
    with pytest.raises(grpc.RpcError) as refused:
        call(sidecar, serving_world)
    assert refused.value.code() == code, refused.value.details()
    assert fragment.lower() in (refused.value.details() or "").lower()
    # Nothing changed, and the server still serves.
    drafters_after = {d.name for d in sidecar.stub.ListDrafters(pb.ListDraftersRequest()).drafters}
    assert drafters_after == drafters_before
    assert sidecar.stub.Route(pb.RouteRequest(text=PROMPT)).task_cluster


def test_report_with_inconsistent_steps_is_invalid_and_can_be_retried(
    sidecar: SidecarThread,
) -> None:
    decision = sidecar.stub.Route(pb.RouteRequest(text=PROMPT, task_hint="code"))
    bad = pb.RouteOutcome(
        request_id=decision.request_id, drafted_per_step=[2, 2], accepted_per_step=[3, 0]
    )
    with pytest.raises(grpc.RpcError) as refused:
        sidecar.stub.Report(bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    good = pb.RouteOutcome(
        request_id=decision.request_id,
        drafted_per_step=[2, 2],
        accepted_per_step=[2, 0],
        verify_time_s=0.01,
    )
    assert sidecar.stub.Report(good).request_id == decision.request_id


ADMIN_CALLS: dict[str, Callable[[SidecarThread, object], object]] = {
    "RegisterDrafter": lambda s, md: s.stub.RegisterDrafter(
        pb.RegisterDrafterRequest(name="x", kind="ngram"), metadata=md
    ),
    "RemoveDrafter": lambda s, md: s.stub.RemoveDrafter(
        pb.RemoveDrafterRequest(name="x"), metadata=md
    ),
    "ReloadClassifier": lambda s, md: s.stub.ReloadClassifier(
        pb.ReloadClassifierRequest(path="/nowhere"), metadata=md
    ),
    "SetPolicy": lambda s, md: s.stub.SetPolicy(pb.SetPolicyRequest(policy="ucb"), metadata=md),
}


@pytest.mark.parametrize("method", list(ADMIN_CALLS))
@pytest.mark.parametrize(
    "metadata",
    [None, (("authorization", "Bearer wrong-token"),), (("authorization", "Basic abc"),)],
    ids=["no token", "wrong token", "not bearer"],
)
def test_admin_calls_need_the_admin_token(
    sidecar: SidecarThread, method: str, metadata: object
) -> None:
    policy_before = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest()).policy
    with pytest.raises(grpc.RpcError) as refused:
        ADMIN_CALLS[method](sidecar, metadata)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest()).policy == policy_before
    assert "x" not in {d.name for d in sidecar.stub.ListDrafters(pb.ListDraftersRequest()).drafters}
