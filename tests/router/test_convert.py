"""Protobuf -> domain conversions on the Route path."""

from __future__ import annotations

from router import convert
from router.domain import Sampling
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
