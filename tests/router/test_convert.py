"""Protobuf -> domain conversions on the Route path, and what a caller's headers or
metadata say of it (request id, trace context)."""

from __future__ import annotations

import pytest

from router import convert
from router.domain import Prompt, Sampling
from router.pb import router_pb2 as pb


def test_a_route_without_sampling_parameters_gets_the_defaults_of_an_empty_message() -> None:
    """The hot path skips building Sampling when none was sent; the result must be what
    an explicit, empty SamplingParams converts to."""
    bare = convert.route_from_pb(pb.RouteRequest(text="hi"))
    explicit = convert.route_from_pb(pb.RouteRequest(text="hi", sampling=pb.SamplingParams()))
    assert bare.sampling == explicit.sampling == Sampling()
    assert bare.sampling.greedy


def test_sampling_parameters_that_are_sent_are_kept() -> None:
    request = pb.RouteRequest(
        text="hi",
        sampling=pb.SamplingParams(do_sample=True, temperature=0.7, top_p=0.9, seed=3, stop=["."]),
    )
    sampling = convert.route_from_pb(request).sampling
    assert (sampling.do_sample, sampling.top_k, sampling.seed, sampling.stop) == (
        True,
        0,
        3,
        (".",),
    )
    assert abs(sampling.top_p - 0.9) < 1e-6 and abs(sampling.temperature - 0.7) < 1e-6


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("traceparent", "tracestate", "sent"),
    [
        (TRACEPARENT, "congo=t61rcWkgMzE", (TRACEPARENT, "congo=t61rcWkgMzE")),
        (TRACEPARENT, None, (TRACEPARENT,)),
        (TRACEPARENT, "x" * 513, (TRACEPARENT,)),  # over the specification's 512
        (f"{TRACEPARENT}-later-version-field", None, (f"{TRACEPARENT}-later-version-field",)),
        (None, "congo=t61rcWkgMzE", ()),  # tracestate means nothing without a parent
        (TRACEPARENT.upper(), "a=b", ()),  # the ids are lower-case hex
        ("ff" + TRACEPARENT[2:], None, ()),  # version ff is invalid
        ("00-" + "0" * 32 + TRACEPARENT[35:], None, ()),  # an all-zero trace id
        ("00-4bf92f35-00f067aa0ba902b7-01", None, ()),
        (TRACEPARENT + "\r\nX-Injected: 1", None, ()),
    ],
)
def test_only_a_well_formed_trace_context_is_sent_on(
    traceparent: str | None, tracestate: str | None, sent: tuple[str, ...]
) -> None:
    from router.domain import trace_context

    headers = trace_context(traceparent, tracestate)
    assert tuple(value for _, value in headers) == sent
    assert [name for name, _ in headers] == ["traceparent", "tracestate"][: len(sent)]


def test_a_callers_request_id_is_used_when_it_can_be_an_id() -> None:
    from router.domain import Caller, GenerateInput, RouteInput, caller_request_id

    assert caller_request_id("gateway-42") == "gateway-42"
    assert caller_request_id("x" * 120) == "x" * 120
    assert caller_request_id("x" * 121) == caller_request_id("tab\there") == ""
    assert caller_request_id(None) == caller_request_id("") == ""
    asked = GenerateInput(route=RouteInput(prompt=Prompt(text="hi"), request_id="own"))
    caller = Caller("gateway-42", (("traceparent", TRACEPARENT),))
    assert caller.generation(asked).route.request_id == "gateway-42"
    assert caller.generation(asked, 2).route.request_id == "gateway-42-2"
    assert caller.generation(asked).trace == caller.trace
    assert Caller().generation(asked).route.request_id == "own"  # gRPC's own field stays


def test_generate_takes_the_trace_context_of_the_calls_metadata() -> None:
    message = pb.GenerateRequest(text="hi", max_new_tokens=2)
    metadata = (("traceparent", TRACEPARENT), ("tracestate", "a=b"), ("x-bin", b"\x00"))
    asked = convert.generate_from_pb(message, metadata)
    assert asked.trace == (("traceparent", TRACEPARENT), ("tracestate", "a=b"))
    assert convert.generate_from_pb(message).trace == ()
