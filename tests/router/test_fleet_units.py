"""The fleet's pure parts: the fleet file, vLLM's queue gauges, and what the policy learns
from a replica's answer."""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from drafters.grammar import OutputGrammar
from router.domain import Sampling
from router.fleet.client import ReplicaFailedError, completion_body, finish_reason_of
from router.fleet.config import (
    FleetConfigError,
    check_fleet_drafters,
    load_fleet_file,
    normalise_url,
    parse_fleet,
    replica_api_keys,
)
from router.fleet.learning import Timing, outcome_from_replica, positions_from_histogram
from router.fleet.metrics import FleetCollector
from router.fleet.replica import Replica, queue_from_metrics
from router.fleet.service import FleetRouterService, generation_stats

if TYPE_CHECKING:
    from router.bundle import ModelBundle

FLEET = """
request_timeout_s = 30
[[replicas]]
url = "http://127.0.0.1:8001/v1/"
model = "target"
speculative = "none"
[[replicas]]
url = "http://127.0.0.1:8002"
model = "target"
speculative = "ngram"
k = 4
[[replicas]]
name = "code-a"
url = "https://gpu-3.internal:8000"
model = "target"
speculative = "code"
max_in_flight = 2
"""


def test_fleet_file_is_read_and_normalised(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(FLEET)
    fleet = load_fleet_file(path)
    assert [r.url for r in fleet.replicas] == [
        "http://127.0.0.1:8001",
        "http://127.0.0.1:8002",
        "https://gpu-3.internal:8000",
    ]
    assert [r.draft_length for r in fleet.replicas] == [0, 4, 3]  # code: the default k
    assert fleet.drafters() == ["none", "ngram", "code"]
    assert fleet.replicas[2].name == "code-a" and fleet.replicas[0].name.endswith(":8001")
    assert fleet.request_timeout_s == 30 and fleet.replicas[2].max_in_flight == 2
    check_fleet_drafters(fleet, {"none", "ngram", "code", "math"})


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("127.0.0.1:8000", "not an http(s)://host[:port] URL"),
        ("ftp://host:21", "not an http(s)://host[:port] URL"),
        ("http://host:99999", "bad port"),
        ("http://host:8000/?x=1", "query"),
        ("http://", "not an http(s)://host[:port] URL"),
        # The URL labels the replica on the open /metrics and in Route replies.
        ("http://admin:s3cret@10.0.0.1:8000", "must not hold credentials"),
        ("http://admin:s3cret@host:99999", "must not hold credentials"),  # echoed by the port's
        ("http://admin:p#ss@host:8000", "must not hold credentials"),  # '#' hid it from urlsplit
    ],
)
def test_malformed_urls_are_refused(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)) as refused:
        normalise_url(url)
    assert "s3cret" not in str(refused.value) and "p#ss" not in str(refused.value)
    replica = {"url": url, "model": "m", "speculative": "none"}
    with pytest.raises(FleetConfigError) as refused:
        parse_fleet({"replicas": [replica]})
    assert "\n" not in str(refused.value)
    assert "replicas.0.url" in str(refused.value)


@pytest.mark.parametrize(
    ("replicas", "problem"),
    [
        ([], "at least 1"),
        ([{"url": "http://a", "model": "m", "speculative": "none", "k": 2}], "k = 0"),
        ([{"url": "http://a", "model": "m", "speculative": "ngram", "k": 0}], "k >= 1"),
        ([{"url": "http://a", "model": "m", "speculative": "ngram", "k": 40}], "32"),
        (
            [
                {"url": "http://a", "model": "m", "speculative": "ngram", "k": 2},
                {"url": "http://b", "model": "m", "speculative": "ngram", "k": 3},
            ],
            "one drafter runs at one k",
        ),
        (
            [
                {"url": "http://a", "model": "m", "speculative": "none"},
                {"url": "http://b", "model": "other", "speculative": "none"},
            ],
            "same model",
        ),
        (
            [
                {"url": "http://a", "model": "m", "speculative": "none"},
                {"url": "http://a/", "model": "m", "speculative": "none"},
            ],
            "two replicas are named",
        ),
        (
            [
                {"name": "x", "url": "http://a", "model": "m", "speculative": "none"},
                {"name": "y", "url": "http://a/v1", "model": "m", "speculative": "ngram"},
            ],
            "two replicas have the URL 'http://a'",
        ),
        ([{"url": "http://a", "model": "m", "speculative": "none", "colour": 1}], "colour"),
    ],
)
def test_inconsistent_fleets_are_refused(replicas: list[dict[str, object]], problem: str) -> None:
    with pytest.raises(FleetConfigError, match=problem) as refused:
        parse_fleet({"replicas": replicas})
    assert "\n" not in str(refused.value)


def test_fleet_drafters_are_priced_without_a_drafting_cost_at_their_replicas_k() -> None:
    """vLLM reports drafting and verifying as one step time, so the fleet hints a
    drafting cost of 0 for each configuration it offers (none is the k = 0 arm), over
    what the drafters' kinds hint; the copy drafters are the kinds' as without a fleet;
    and each drafter is served at its replicas' k only."""
    from types import SimpleNamespace

    import torch

    from drafters.ngram import NgramDrafter
    from router.policy.base import DrafterHints

    fleet = parse_fleet(
        {
            "replicas": [
                {"url": "http://a", "model": "m", "speculative": "none"},
                {"url": "http://b", "model": "m", "speculative": "code", "k": 3},
                {"url": "http://c", "model": "m", "speculative": "ngram", "k": 4},
            ]
        }
    )
    # The service's drafter pool, reduced to what the hints read: an n-gram drafter and
    # a model drafter ("code"; its kind is all that is asked of it).
    pool = {
        "ngram": NgramDrafter("ngram", torch.device("cpu")),
        "code": SimpleNamespace(kind="model"),
    }
    service = FleetRouterService.__new__(FleetRouterService)
    service.fleet = fleet
    service.drafters = SimpleNamespace(  # type: ignore[assignment]
        eligible=lambda: list(pool),
        get=lambda name: SimpleNamespace(drafter=pool[name], record=SimpleNamespace(builtin=True)),
    )
    assert service.drafter_hints() == DrafterHints(
        {"ngram": 0.0, "code": 0.0}, ("ngram",), {"code": 3, "ngram": 4}
    )
    # Measured from the split of its answers' time: the model drafter's cost, not the
    # lookup's, whose kind states it.
    assert service._draft_cost_unknown("code") and not service._draft_cost_unknown("ngram")


def test_unknown_drafter_and_unreadable_files(tmp_path: Path) -> None:
    fleet = parse_fleet({"replicas": [{"url": "http://a", "model": "m", "speculative": "codex"}]})
    with pytest.raises(FleetConfigError, match="unknown drafter 'codex'"):
        check_fleet_drafters(fleet, {"none", "ngram", "code"})
    with pytest.raises(FleetConfigError, match="No such file"):
        load_fleet_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[replicas]\n")
    with pytest.raises(FleetConfigError, match="not TOML"):
        load_fleet_file(bad)


def test_a_drafter_registered_at_run_time_may_be_named_at_start_and_by_fleet_check(
    tmp_path: Path,
) -> None:
    """A fleet file naming a drafter registered with RegisterDrafter (kept in the state
    database) passes the start-up check that `serve` and `fleet check` make, as the
    running sidecar's reload takes it; an unknown one is still refused."""
    from router.fleet.config import check_fleet_settings
    from router.settings import Settings
    from router.store import DrafterRecord, SidecarStore

    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text('[[replicas]]\nurl = "http://a"\nmodel = "m"\nspeculative = "lookup"\n')
    settings = Settings(state_dir=tmp_path / "state", bundle_drafters=False, fleet_file=fleet_file)
    with pytest.raises(FleetConfigError, match="unknown drafter 'lookup'"):
        check_fleet_settings(settings)
    store = SidecarStore(tmp_path / "state", exclusive=True)  # held, as by a running sidecar
    try:
        store.add_drafter(DrafterRecord(name="lookup", kind="ngram"))
        fleet = check_fleet_settings(settings)
        assert fleet is not None and fleet.drafters() == ["lookup"]
    finally:
        store.close()


def test_api_keys_come_from_the_variables_the_fleet_file_names() -> None:
    fleet = parse_fleet(
        {
            "api_key_env": "FLEET_KEY",
            "replicas": [
                {"url": "http://a", "model": "m", "speculative": "none"},
                {"url": "http://b", "model": "m", "speculative": "ngram", "api_key_env": "B_KEY"},
            ],
        }
    )
    keys = replica_api_keys(fleet, {"FLEET_KEY": "k1", "B_KEY": "k2"})
    assert keys == {"http://a": "k1", "http://b": "k2"}
    assert replica_api_keys(parse_fleet({"replicas": [fleet.replicas[0].model_dump()]}), {}) == {
        "http://a": None
    }
    for environ in ({"B_KEY": "k2"}, {"FLEET_KEY": "", "B_KEY": "k2"}):
        with pytest.raises(FleetConfigError, match="api_key_env names FLEET_KEY, which is not set"):
            replica_api_keys(fleet, environ)
    replica = Replica.from_spec(fleet.replicas[1], fleet, "k2")
    assert replica.headers == {"Authorization": "Bearer k2"} and "k2" not in repr(replica)
    assert "k2" not in str(replica.describe())
    with pytest.raises(FleetConfigError, match="api_key_env"):
        parse_fleet({"api_key_env": "not a name", "replicas": fleet.model_dump()["replicas"]})


def test_queue_is_read_from_vllm_metrics() -> None:
    scrape = "\n".join(
        [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            'vllm:num_requests_running{engine="0",model_name="target"} 3.0',
            'vllm:num_requests_waiting{engine="0",model_name="target"} 2.0',
            'vllm:num_requests_waiting_by_reason{reason="capacity"} 7.0',
            "vllm:num_requests_running_total 99",
        ]
    )
    assert queue_from_metrics(scrape) == (3.0, 2.0)
    assert queue_from_metrics("") == (0.0, 0.0)


def test_detailed_spec_metrics_become_the_per_step_outcome() -> None:
    metrics = {
        "tokens_per_second": 50.0,
        "speculative_decoding": {
            "num_spec_steps": 3,
            "num_draft_tokens": 9,
            "num_accepted_draft_tokens": 5,
            "acceptance_histogram": [1, 0, 1, 1],
            "per_step_drafted": [3, 3, 3],
            "per_step_accepted": [3, 0, 2],
        },
    }
    timing = Timing(wall_time_s=0.5, decode_time_s=0.4, generated_tokens=8)
    outcome = outcome_from_replica(3, metrics, timing, plain_token_time_s=0.1)
    assert outcome is not None
    assert outcome.drafted_per_step == (3, 3, 3)
    assert outcome.accepted_per_step == (3, 0, 2)
    assert outcome.acceptance_counts(3) == (5, 2)
    assert outcome.generated_tokens == 8
    # 3 steps at the plain 0.1 s are the target's; the other 0.1 s of the decode drafted.
    assert outcome.verify_time_s == pytest.approx(0.3)
    assert outcome.draft_time_s == pytest.approx(0.1) and outcome.wall_time_s == 0.5
    assert outcome.plain_token_time_s == 0.1


def test_summary_spec_metrics_become_totals_with_positions() -> None:
    # histogram: 1 step accepted 0, 1 step accepted 2, 1 step accepted 3 (of k = 3).
    assert positions_from_histogram([1, 0, 1, 1]) == [2, 2, 1]
    spec = {
        "num_spec_steps": 3,
        "num_draft_tokens": 9,
        "num_accepted_draft_tokens": 5,
        "acceptance_histogram": [1, 0, 1, 1],
    }
    outcome = outcome_from_replica(
        3, {"speculative_decoding": spec}, Timing(0.5, 0.4, 8), plain_token_time_s=None
    )
    assert outcome is not None
    assert sorted(outcome.accepted_per_step) == [0, 2, 3]
    assert outcome.drafted_tokens == 9
    # No plain time per token measured yet: the step time is not split.
    assert outcome.draft_time_s == 0.0 and outcome.verify_time_s == 0.4


def test_steps_that_drafted_nothing_are_counted_back_from_the_output() -> None:
    """vLLM records a step only when it drafted (the request of 12 tokens below, on the
    n-gram replica, reported 1 step: measured on vLLM 0.32): the other 10 steps after
    the prefill's token were lookups without a match, and count as such."""
    spec = {
        "num_spec_steps": 1,
        "num_draft_tokens": 3,
        "num_accepted_draft_tokens": 0,
        "acceptance_histogram": [1, 0, 0, 0],
        "per_step_drafted": [3],
        "per_step_accepted": [0],
    }
    timing = Timing(wall_time_s=0.2, decode_time_s=0.11, generated_tokens=12)
    outcome = outcome_from_replica(3, {"speculative_decoding": spec}, timing, 0.01)
    assert outcome is not None
    assert outcome.drafted_per_step == (0,) * 10 + (3,)
    assert outcome.accepted_per_step == (0,) * 11
    # 11 steps at the plain 0.01 s: the n-gram lookup cost nothing beyond them.
    assert outcome.verify_time_s == pytest.approx(0.11)
    assert outcome.draft_time_s == pytest.approx(0.0, abs=1e-6)
    # A drafter whose kind states its cost (the n-gram lookup's: none) is not split.
    unsplit = outcome_from_replica(
        3, {"speculative_decoding": spec}, timing, 0.01, split_cost=False
    )
    assert unsplit is not None and unsplit.steps == 11
    assert (unsplit.draft_time_s, unsplit.verify_time_s) == (0.0, 0.11)
    # At the summary level the same request has 11 steps; with no step reported (no
    # lookup matched), every step drafted nothing, and that is per-step information.
    summary = {k: v for k, v in spec.items() if not k.startswith("per_step")}
    totals = outcome_from_replica(3, {"speculative_decoding": summary}, timing, 0.01)
    assert totals is not None and totals.steps == 11 and totals.drafted_tokens == 3
    nothing = {"num_spec_steps": 0, "num_draft_tokens": 0, "num_accepted_draft_tokens": 0}
    empty = outcome_from_replica(3, {"speculative_decoding": nothing}, timing, 0.01)
    assert empty is not None and empty.drafted_per_step == (0,) * 11


def test_a_configuration_whose_steps_cost_more_is_priced_by_its_measured_cost() -> None:
    """Two configurations accept alike (2.5 tokens per step), but one's steps take three
    plain steps (its drafter's forwards cost what the target's do): from vLLM's answers
    alone, thompson prices that one below plain decoding at every k and the other above
    it, though both start hinted at a drafting cost of 0 (the fleet's hint)."""
    import numpy as np

    from router.policy.base import Context, Decision, DrafterHints
    from router.policy.thompson import ThompsonPolicy

    plain = 0.01
    policy = ThompsonPolicy(["cheap", "dear"], rng=np.random.default_rng(0))
    policy.set_drafter_hints(DrafterHints({"cheap": 0.0, "dear": 0.0}))
    context = Context("code")
    steps = 20
    spec = {"per_step_drafted": [3] * steps, "per_step_accepted": [1, 2] * (steps // 2)}
    tokens = 1 + steps + sum(spec["per_step_accepted"])  # the prefill's token, then the steps
    for _ in range(12):
        for name, step_cost in (("cheap", 1.0), ("dear", 3.0)):
            decode = steps * step_cost * plain
            timing = Timing(
                wall_time_s=decode + plain, decode_time_s=decode, generated_tokens=tokens
            )
            outcome = outcome_from_replica(3, {"speculative_decoding": spec}, timing, plain)
            assert outcome is not None
            policy.update(context, Decision(name, 3), outcome)
    (summary,) = policy.describe()
    arms = {arm.drafter: arm for arm in summary.arms}
    assert arms["cheap"].expected_speedup > 1.5, arms
    # No draft length pays for "dear": its best is k = 0, plain decoding (S = 1).
    assert arms["dear"].best_k == 0 and arms["dear"].expected_speedup == 1.0, arms
    assert summary.chosen_drafter == "cheap"


def test_without_spec_metrics_the_time_per_token_stands_in() -> None:
    # 11 tokens, 10 decode intervals of 0.05 s against plain decoding's 0.1 s per token:
    # 2 tokens per step, so about 6 steps accepting 5 draft tokens in all.
    timing = Timing(wall_time_s=0.6, decode_time_s=0.5, generated_tokens=11)
    outcome = outcome_from_replica(3, {}, timing, plain_token_time_s=0.1)
    assert outcome is not None
    assert outcome.steps == 6 and outcome.accepted_tokens == 5
    assert outcome.drafted_tokens == 18
    # Nothing to compare with yet: nothing is learnt.
    assert outcome_from_replica(3, {}, timing, plain_token_time_s=None) is None
    # A plain replica's answer is a plain decoding measurement (t_ar).
    plain = outcome_from_replica(0, {}, timing, plain_token_time_s=None)
    assert plain is not None and plain.steps == 0 and plain.generated_tokens == 11


def test_the_decode_time_is_vllms_own_where_it_reports_it() -> None:
    from router.fleet.learning import engine_decode_time

    assert engine_decode_time({"generation_time_ms": 250.0, "tokens_per_second": 9}, 0.001) == 0.25
    assert engine_decode_time({"generation_time_ms": 0}, 0.3) == 0.0
    for metrics in (None, {}, {"generation_time_ms": None}, {"generation_time_ms": -1.0}):
        assert engine_decode_time(metrics, 0.3) == 0.3  # the stream's arrival times


def test_the_fixed_time_learnt_leaves_the_replicas_queue_out() -> None:
    """A request that waited 2 s in a busy replica's queue (and the HTTP round trip) is
    learnt from vLLM's time to first token, so its fixed time is the prefill's 50 ms, not
    the 2 s of load; without vLLM's metrics, the router's wall time stands."""
    from router.fleet.learning import engine_request_time

    metrics = {"time_to_first_token_ms": 50.0, "generation_time_ms": 200.0, "queue_time_ms": 2e3}
    assert engine_request_time(metrics, 0.2) == pytest.approx(0.25)
    for missing in (None, {}, {"time_to_first_token_ms": None}, {"time_to_first_token_ms": -1}):
        assert engine_request_time(missing, 0.2) is None
    waited = Timing(wall_time_s=2.3, decode_time_s=0.2, generated_tokens=21)
    served = replace(waited, engine_time_s=engine_request_time(metrics, 0.2))
    plain = 0.01  # 20 decode steps of 10 ms: what a plain request's tokens take
    for timing, fixed in ((served, 0.05), (waited, 2.1)):
        outcome = outcome_from_replica(0, {}, timing, plain)
        assert outcome is not None
        assert outcome.wall_time_s - outcome.verify_time_s == pytest.approx(fixed)


def test_completion_body_asks_for_token_ids_and_metrics() -> None:
    greedy = completion_body("target", [1, 2, 3], 16, Sampling())
    assert greedy["prompt"] == [1, 2, 3] and greedy["max_tokens"] == 16
    assert greedy["temperature"] == 0.0 and "seed" not in greedy and greedy["top_k"] == 0
    assert greedy["return_token_ids"] is True
    assert greedy["stream"] is True and greedy["stream_options"] == {"include_usage": True}
    sampled = completion_body(
        "target",
        [1],
        4,
        Sampling(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, seed=3, stop=("\n",)),
    )
    assert (sampled["temperature"], sampled["top_k"], sampled["top_p"]) == (0.7, 5, 0.9)
    assert sampled["seed"] == 3 and sampled["stop"] == ["\n"]
    assert "ignore_eos" not in sampled and "stop_token_ids" not in sampled
    ending = completion_body("target", [1], 4, Sampling(ignore_eos=True, stop_token_ids=(7, 9)))
    assert ending["ignore_eos"] is True and ending["stop_token_ids"] == [7, 9]
    assert "min_tokens" not in ending
    penalised = completion_body(
        "target",
        [1],
        8,
        Sampling(
            repetition_penalty=1.2,
            presence_penalty=0.3,
            frequency_penalty=-1,
            min_tokens=2,
            logit_bias=((5, -100.0), (9, 2.5)),
        ),
    )
    assert penalised["logit_bias"] == {"5": -100.0, "9": 2.5}
    assert penalised["min_p"] == 0.0  # greedy: no warper
    warped = completion_body("target", [1], 8, Sampling(do_sample=True, min_p=0.2))
    assert warped["min_p"] == 0.2
    assert (penalised["repetition_penalty"], penalised["presence_penalty"]) == (1.2, 0.3)
    assert penalised["frequency_penalty"] == -1 and penalised["min_tokens"] == 2
    assert "structured_outputs" not in penalised


@pytest.mark.parametrize(
    ("grammar", "sent"),
    [
        (OutputGrammar("json", '{"type": "object"}'), {"json": {"type": "object"}}),
        (OutputGrammar("json_object"), {"json_object": True}),
        (OutputGrammar("regex", "a+"), {"regex": "a+"}),
        (OutputGrammar("choice", '["a", "b"]'), {"choice": ["a", "b"]}),
        (OutputGrammar("grammar", 'root ::= "a"'), {"grammar": 'root ::= "a"'}),
        (
            OutputGrammar("json", "{}", any_whitespace=False, additional_properties=False),
            {"json": {}, "disable_any_whitespace": True, "disable_additional_properties": True},
        ),
    ],
    ids=["json", "json_object", "regex", "choice", "grammar", "options"],
)
def test_a_grammar_goes_to_the_replica_as_vllms_structured_outputs(
    grammar: OutputGrammar, sent: dict[str, Any]
) -> None:
    body = completion_body("target", [1], 8, Sampling(structured_output=grammar))
    assert body["structured_outputs"] == sent


def test_finish_reasons_in_the_sidecar_words() -> None:
    assert finish_reason_of({"finish_reason": "length"}) == "length"
    assert finish_reason_of({"finish_reason": "stop", "stop_reason": None}) == "eos_token"
    assert finish_reason_of({"finish_reason": "stop", "stop_reason": 151645}) == "eos_token"
    assert finish_reason_of({"finish_reason": "stop", "stop_reason": "\n\n"}) == "stop_sequence"
    for failed in ("abort", "error", None):  # vLLM stopping or failing: not an answer
        with pytest.raises(ReplicaFailedError):
            finish_reason_of({"finish_reason": failed})


def test_a_replica_answer_becomes_the_engines_statistics() -> None:
    stats = generation_stats(
        (3, 3, 3),
        (3, 0, 2),
        Timing(0.5, 0.4, 9),
        prompt_tokens=4,
        generated_tokens=9,
        finish_reason="length",
    )
    assert (stats.steps, stats.drafted, stats.accepted) == (3, 9, 5)
    assert stats.accepted_per_position == [2, 2, 1]
    assert stats.mean_accepted_length == pytest.approx(8 / 3)
    assert stats.tokens_per_s == pytest.approx(18.0)
    assert (stats.verify_time_s, stats.draft_time_s, stats.stopped_steps) == (0.4, 0.0, 0)
    assert stats.finish_reason == "length" and stats.prompt_tokens == 4


def test_fleet_collector_exports_each_replica() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    fleet = parse_fleet(
        {
            "replicas": [
                {"url": "http://a:1", "model": "m", "speculative": "none"},
                {"url": "http://b:2", "model": "m", "speculative": "ngram", "k": 3},
            ]
        }
    )
    plain, ngram = (Replica.from_spec(spec, fleet) for spec in fleet.replicas)
    plain.bring_back()
    plain.in_flight, plain.running, plain.waiting, plain.served = 2, 3.0, 1.0, 7
    ngram.take_out("GET /health failed")
    registry = CollectorRegistry()
    registry.register(FleetCollector(lambda: [plain, ngram]))
    text = generate_latest(registry).decode()
    assert 'specroute_fleet_replica_up{replica="http://a:1",speculative="none"} 1.0' in text
    assert 'specroute_fleet_replica_up{replica="http://b:2",speculative="ngram"} 0.0' in text
    assert 'specroute_fleet_replica_in_flight{replica="http://a:1",speculative="none"} 2.0' in text
    assert 'specroute_fleet_replica_queue{replica="http://a:1",speculative="none"} 4.0' in text
    assert (
        'specroute_fleet_replica_requests_total{replica="http://a:1",speculative="none"} 7.0'
        in text
    )
    assert (
        'specroute_fleet_replica_failures_total{replica="http://b:2",speculative="ngram"} 1.0'
        in text
    )
    # Load: vLLM's queue (waiting counted twice) when it is above our own in-flight count.
    assert plain.load == 5.0 and not plain.saturated and plain.available
    assert not ngram.available


def test_without_the_targets_weights_self_drafters_are_left_out_and_others_load(
    tiny_world: ModelBundle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fleet mode's drafter pool: the target described from its tokenizer, no engine."""
    from drafters.loader import default_placement, describe_target
    from router.domain import DrafterSpec
    from router.drafter_pool import DrafterPool
    from router.errors import PreconditionError
    from router.store import DrafterRecord, SidecarStore

    target = describe_target(tiny_world.target_dir, placement=default_placement("cpu"))
    assert target.weights_digest == "" and target.vocabulary_rows >= len(target.tokenizer)
    store = SidecarStore(tmp_path / "state")
    store.add_drafter(DrafterRecord(name="stored-self", kind="self"))
    pool = DrafterPool(target, None, store, [tiny_world.root])
    generic = DrafterRecord(
        name="generic", kind="model", path=str(tiny_world.drafter_dirs["generic"])
    )
    with caplog.at_level(logging.WARNING, logger="router.drafter_pool"):
        pool.add_builtin(DrafterRecord(name="early-exit", kind="self"))
        pool.add_builtin(generic)
        assert pool.restore() == []
    assert pool.names() == ["generic"]
    assert pool.get("generic").record.parameter_count > 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("early-exit left out" in m and "fleet mode" in m for m in warned), warned
    assert any("stored-self not served" in m for m in warned), warned
    assert [r.name for r in store.drafters()] == ["stored-self"]  # kept for a non-fleet start
    with pytest.raises(PreconditionError, match="fleet mode"):
        pool.register(DrafterSpec(name="early-exit-2", kind="self"))


def test_a_plain_reference_request_keeps_t_ar_measured() -> None:
    """Without t_ar no configuration's drafting cost can be learnt, and a policy that
    never chooses `none` would never measure it: a learnt Generate goes to a plain
    replica when t_ar is missing or PLAIN_REFERENCE_EVERY speculative answers old, and a
    pinned or unlearnt one never does."""
    from types import SimpleNamespace

    from router.domain import GenerateInput
    from router.fleet.service import PLAIN_REFERENCE_EVERY
    from router.policy.base import Context, Decision
    from router.service import RoutedRequest

    service = FleetRouterService.__new__(FleetRouterService)
    plain = SimpleNamespace(available=True, drafter="none")
    service.replicas = [plain, SimpleNamespace(available=True, drafter="ngram")]  # type: ignore[list-item]
    service.plain_token_time_s = None
    service.speculative_since_plain = 0
    routed = RoutedRequest(
        "r1", "code", 0.9, False, Decision("ngram", 3, 1.4), Context("code"), "thompson", 1, 10, 0
    )
    learnt = GenerateInput(route=None)  # type: ignore[arg-type]

    def sent_to(request: GenerateInput) -> tuple[str, int]:
        decision = service._with_plain_reference(routed, request).decision
        return decision.drafter, decision.k

    assert sent_to(learnt) == ("none", 0)  # no t_ar yet
    assert sent_to(GenerateInput(route=None, no_update=True)) == ("ngram", 3)  # type: ignore[arg-type]
    assert sent_to(GenerateInput(route=None, force_drafter="ngram")) == ("ngram", 3)  # type: ignore[arg-type]
    service._observe_plain(0.01)
    assert sent_to(learnt) == ("ngram", 3)  # t_ar is current
    service.speculative_since_plain = PLAIN_REFERENCE_EVERY
    assert sent_to(learnt) == ("none", 0)  # stale
    plain.available = False
    assert sent_to(learnt) == ("ngram", 3)  # no plain replica free: the policy's choice


def test_a_replica_never_reached_is_told_from_one_that_failed_the_request() -> None:
    """A refused connection says nothing about the request (it does not count towards
    ``max_replica_failures``); an answer that fails does."""
    import asyncio
    import socket

    import aiohttp

    from router.fleet.client import ReplicaFailedError, stream_completion
    from router.fleet.config import ReplicaSpec

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    spec = ReplicaSpec(url=f"http://127.0.0.1:{port}", model="target", speculative="none")
    replica = Replica(spec, max_in_flight=1, timeout_s=5.0)

    async def first_error() -> ReplicaFailedError:
        async with aiohttp.ClientSession() as session:
            try:
                async for _ in stream_completion(session, replica, {"prompt": [1]}, 2.0):
                    pass
            except ReplicaFailedError as error:
                return error
        raise AssertionError("no error from a closed port")

    assert asyncio.run(first_error()).reached is False
    assert ReplicaFailedError("HTTP 500: engine dead").reached is True


@pytest.mark.parametrize("value", ["inf", "nan"])
@pytest.mark.parametrize(
    "where",
    ["connect_timeout_s", "request_timeout_s", "health_interval_s", "replicas.0.timeout_s"],
)
def test_a_time_that_is_not_finite_is_refused(tmp_path: Path, where: str, value: str) -> None:
    """TOML spells infinity ``inf``; aiohttp cannot time out after it (OverflowError on
    every probe or every request of the replica)."""
    replica = '[[replicas]]\nurl = "http://a"\nmodel = "m"\nspeculative = "none"\n'
    if where.startswith("replicas"):
        text = f"{replica}timeout_s = {value}\n"
    else:
        text = f"{where} = {value}\n{replica}"
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(FleetConfigError, match="finite") as refused:
        load_fleet_file(path)
    assert "\n" not in str(refused.value)


def test_after_a_switch_the_statistics_are_the_last_replicas_steps() -> None:
    """vLLM's speculation metrics are the last replica's: its steps made the 4 tokens it
    streamed, not the 10 of the whole answer (the 6 an earlier replica made were counted
    as steps that drafted nothing)."""
    from types import SimpleNamespace

    from router.domain import GenerateInput, RouteInput
    from router.fleet.client import StreamEnd
    from router.fleet.service import _Progress
    from router.metrics import create_metrics
    from router.policy.base import Context, Decision
    from router.service import RoutedRequest

    service = FleetRouterService.__new__(FleetRouterService)
    service.metrics = create_metrics()
    service.policy = SimpleNamespace(version=1)  # type: ignore[assignment]
    spec = {
        "num_spec_steps": 1,
        "num_draft_tokens": 3,
        "num_accepted_draft_tokens": 2,
        "per_step_drafted": [3],
        "per_step_accepted": [2],
    }
    progress = _Progress(
        output_ids=list(range(10)),
        texts=["x"] * 10,
        detokenizer=None,  # type: ignore[arg-type]  # _result does not read it
        attempts=2,
        end=StreamEnd("length", {"speculative_decoding": spec}, 4),
        timing=Timing(wall_time_s=0.2, decode_time_s=0.1, generated_tokens=4),
    )
    routed = RoutedRequest(
        "r1", "code", 0.9, False, Decision("ngram", 3, 1.4), Context("code"), "thompson", 1, 10, 0
    )
    request = GenerateInput(route=RouteInput(prompt=None, max_new_tokens=10))  # type: ignore[arg-type]
    replica = SimpleNamespace(name="b")
    result = service._result(routed, replica, request, progress)  # type: ignore[arg-type]
    # The prefill's token and one step of 2 accepted + the target's: the 4 tokens.
    assert result.stats.steps == 1 and list(result.stats.accepted_per_step) == [2]
    assert result.stats.generated_tokens == 10 and len(result.output_ids) == 10
    # The 10 tokens took both attempts' time: the last one's 0.2 s alone gave 50 tokens/s.
    progress.started -= 1.0
    stats = service._result(routed, replica, request, progress).stats  # type: ignore[arg-type]
    assert stats.wall_time_s >= 1.0 and stats.tokens_per_s <= 10.0


def test_each_replica_tokens_text_is_decoded_here_as_in_process(tiny_world: ModelBundle) -> None:
    """vLLM sends a chunk's text, several tokens' under speculation: it was put on the
    first token (completions' text_offset [0, 9, 9] for 'Hello wor'). Each token's text is
    now decoded here, as the in-process engine decodes: cut at a stop string's end, and
    the last token of a run that ends on its length releases an incomplete character."""
    from transformers import AutoTokenizer

    from drafters.detokenize import IncrementalDetokenizer
    from router.fleet.client import Delta
    from router.fleet.service import _Progress
    from router.service import TokenChunk

    tokenizer = AutoTokenizer.from_pretrained(tiny_world.target_dir)
    service = FleetRouterService.__new__(FleetRouterService)
    service._special_ids = frozenset(tokenizer.all_special_ids)

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    def chunks(
        ids: list[int], stops: tuple[str, ...], sizes: list[int], finish: str
    ) -> tuple[list[TokenChunk], _Progress]:
        progress = _Progress([], [], IncrementalDetokenizer(tokenizer))
        out, start = [], 0
        for n, size in enumerate(sizes):
            part = tuple(ids[start : start + size])
            start += size
            ending = finish if n == len(sizes) - 1 else None
            out.append(service._chunk(Delta(part, "vLLM's", None, ending), progress, stops))
        return out, progress

    alone = [tokenizer.decode([i]) for i in encode("Hello world")]
    got, progress = chunks(encode("Hello world"), (), [len(alone)], "eos_token")
    assert list(got[0].token_texts) == alone and got[0].text == "Hello world"
    assert "".join(progress.texts) == "Hello world"
    got, progress = chunks(encode("Done.\n\nNext"), (".",), [2, 10], "stop_sequence")
    assert "".join(t for c in got for t in c.token_texts) == "Done."
    assert "".join(progress.texts) == "Done."
    cut = encode("hi \u4f60")[:-1]  # the character's first bytes only
    got, _ = chunks(cut, (), [len(cut)], "length")
    assert got[0].text == "hi \ufffd"  # released at the end, as in-process


def _routed_to(drafter: str, k: int) -> object:
    from router.policy.base import Context, Decision
    from router.service import RoutedRequest

    return RoutedRequest(
        "r1", "code", 0.9, False, Decision(drafter, k, 1.4), Context("code"), "thompson", 1, 10, 0
    )


def test_a_request_whose_replica_failed_goes_on_over_the_in_flight_bound() -> None:
    """When a replica failed under its requests and every other healthy replica was at its
    in-flight bound, the requests were refused (RESOURCE_EXHAUSTED) though started and
    another replica served: "no request is lost while any replica serves"."""
    from router.fleet.config import ReplicaSpec

    def replica(name: str, in_flight: int) -> Replica:
        spec = ReplicaSpec(
            url=f"http://{name}:8000", model="target", speculative="ngram", k=3, name=name
        )
        return Replica(spec, max_in_flight=2, timeout_s=5.0, healthy=True, in_flight=in_flight)

    service = FleetRouterService.__new__(FleetRouterService)
    service.replicas = [replica("a", 0), replica("b", 2)]  # a failed; b is at its bound
    routed = _routed_to("ngram", 3)
    assert service._place(routed, frozenset({"a"})) is None  # a new request waits its turn
    placed = service._place(routed, frozenset({"a"}), failover=True)
    assert placed is not None and placed[1].name == "b"
    service.replicas[1].healthy = False
    assert service._place(routed, frozenset({"a"}), failover=True) is None  # none serves
    # None serving is UNAVAILABLE, which clients retry; but not for a request that failed
    # on a replica it reached (it may be what kills them): that stays INTERNAL.
    from router.errors import GenerationFailedError, UnavailableError, status_of

    service.replicas[0].healthy = False
    assert type(service._unavailable()) is UnavailableError
    after_failures = service._unavailable(failures=["a: the engine died"])
    assert isinstance(after_failures, GenerationFailedError)
    assert status_of(after_failures).grpc_code.name == "INTERNAL"
    # ... and the official OpenAI clients, which retry a 500 twice, are told not to.
    from router.openai_front import error_response

    answer = error_response(after_failures)
    assert answer.status == 500 and answer.headers["x-should-retry"] == "false"


def test_a_stop_string_begun_before_a_failover_ends_the_request(
    tiny_world: ModelBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The text was cut at a stop string that spanned the switch, but the new replica, which
    never saw its start, generated on unseen to max_tokens (the client waited for it,
    usage counted it and the finish reason was 'length')."""
    import asyncio
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from drafters.detokenize import IncrementalDetokenizer
    from router.domain import GenerateInput, RouteInput
    from router.fleet import service as service_module
    from router.fleet.client import Delta
    from router.fleet.config import ReplicaSpec
    from router.fleet.service import _Progress

    tokenizer = AutoTokenizer.from_pretrained(tiny_world.target_dir)
    ids = list(tokenizer.encode("one two three four five six", add_special_tokens=False))
    sent: list[int] = []

    async def second_replica(*args: object) -> object:
        for token in ids[2:]:  # the earlier replica streamed ids[:2]
            sent.append(token)
            yield Delta((token,), "", None, None)

    monkeypatch.setattr(service_module, "replica_stream", second_replica)
    service = FleetRouterService.__new__(FleetRouterService)
    service._special_ids = frozenset(tokenizer.all_special_ids)
    service._session = object()  # type: ignore[assignment]
    service.fleet = SimpleNamespace(connect_timeout_s=1.0)  # type: ignore[assignment]
    progress = _Progress([], [], IncrementalDetokenizer(tokenizer))
    stop = tokenizer.decode(ids[1:3]).strip()  # spans the earlier replica's last token
    service._chunk(Delta(tuple(ids[:2]), "", None, None), progress, (stop,))
    progress.attempts = 2
    spec = ReplicaSpec(url="http://b:8000", model="target", speculative="none", name="b")
    request = GenerateInput(
        route=RouteInput(prompt=None, max_new_tokens=20, sampling=Sampling(stop=(stop,)))  # type: ignore[arg-type]
    )

    async def run() -> None:
        attempt = service._attempt(_routed_to("none", 0), Replica(spec, 2, 5.0), request, progress)  # type: ignore[arg-type]
        async for _ in attempt:
            pass

    asyncio.run(run())
    assert sent == ids[2:3]  # the stop's end came, and the stream was left there
    assert progress.end is not None and progress.end.finish_reason == "stop_sequence"
    assert "".join(progress.texts).endswith(stop)
    assert progress.output_ids == ids[:3]  # nothing past the stop's last token


def test_a_replica_going_on_takes_up_min_tokens_and_a_grammar_is_not_taken_up_part_way(
    tiny_world: ModelBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failover the next replica reads the tokens received as prompt: it was asked
    for all of min_tokens again (a longer answer than asked), and a grammar started again
    after them (an answer that breaks it). min_tokens is now what is left; a request under
    structured output fails over before its first token only, else ends with an error."""
    import asyncio
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from drafters.detokenize import IncrementalDetokenizer
    from router.domain import GenerateInput, RouteInput
    from router.errors import GenerationFailedError
    from router.fleet import service as service_module
    from router.fleet.config import ReplicaSpec
    from router.fleet.service import _Progress, continued_sampling

    bodies: list[dict[str, Any]] = []

    async def next_replica(*args: Any) -> Any:
        bodies.append(args[2])
        return
        yield

    monkeypatch.setattr(service_module, "replica_stream", next_replica)
    tokenizer = AutoTokenizer.from_pretrained(tiny_world.target_dir)
    service = FleetRouterService.__new__(FleetRouterService)
    service._session = object()  # type: ignore[assignment]
    service.fleet = SimpleNamespace(connect_timeout_s=1.0)  # type: ignore[assignment]
    service.settings = SimpleNamespace(
        structured_output=SimpleNamespace(  # type: ignore[assignment]
            disable_any_whitespace=False, disable_additional_properties=False
        )
    )
    spec = ReplicaSpec(url="http://b:8000", model="target", speculative="none", name="b")
    grammar = OutputGrammar("regex", "[a-z ]+")

    def attempt(sampling: Sampling, received: list[int]) -> None:
        progress = _Progress(list(received), [], IncrementalDetokenizer(tokenizer), attempts=2)
        route = RouteInput(prompt=None, max_new_tokens=20, sampling=sampling)  # type: ignore[arg-type]
        request = GenerateInput(route=route)

        async def run() -> None:
            replica = Replica(spec, 2, 5.0)  # type: ignore[arg-type]
            async for _ in service._attempt(_routed_to("none", 0), replica, request, progress):
                pass

        asyncio.run(run())

    attempt(Sampling(min_tokens=8), [5, 6, 7])
    assert bodies[-1]["min_tokens"] == 5 and bodies[-1]["max_tokens"] == 17
    attempt(Sampling(min_tokens=2), [5, 6, 7])
    assert "min_tokens" not in bodies[-1]
    attempt(Sampling(structured_output=grammar), [])  # before the first token: served
    assert "structured_outputs" in bodies[-1]
    with pytest.raises(GenerationFailedError, match="structured output"):
        attempt(Sampling(structured_output=grammar), [5, 6])
    assert len(bodies) == 3
    sampling = Sampling(min_tokens=4, presence_penalty=0.5)
    assert continued_sampling(sampling, 0) is sampling
    assert continued_sampling(sampling, 9) == replace(sampling, min_tokens=0)


def test_tokens_after_a_stop_string_in_one_chunk_are_not_output(tiny_world: ModelBundle) -> None:
    """A chunk that carries the stop string's last token and more (the tokens a replica
    that never saw the string's start went on with) kept them all in the output ids."""
    from transformers import AutoTokenizer

    from drafters.detokenize import IncrementalDetokenizer
    from router.fleet.client import Delta
    from router.fleet.service import _Progress

    tokenizer = AutoTokenizer.from_pretrained(tiny_world.target_dir)
    service = FleetRouterService.__new__(FleetRouterService)
    service._special_ids = frozenset(tokenizer.all_special_ids)
    ids = list(tokenizer.encode("one two three four five", add_special_tokens=False))
    progress = _Progress([], [], IncrementalDetokenizer(tokenizer))
    stop = tokenizer.decode(ids[1:3]).strip()
    chunk = service._chunk(Delta(tuple(ids), "", None, None), progress, (stop,))
    assert progress.stopped and list(chunk.token_ids) == ids[:3] == progress.output_ids
    assert chunk.text.endswith(stop)


def _streamed(events: list[object]) -> list[object]:
    """What ``stream_completion`` makes of a replica that streams ``events`` (each one SSE
    data line) and ``[DONE]``."""
    import asyncio
    import json

    import aiohttp
    from aiohttp import web

    from router.fleet.client import stream_completion
    from router.fleet.config import ReplicaSpec

    async def run() -> list[object]:
        async def completions(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for event in events:
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            return response

        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        spec = ReplicaSpec(url=f"http://127.0.0.1:{port}", model="m", speculative="none")
        try:
            async with aiohttp.ClientSession() as session:
                replica = Replica(spec, max_in_flight=1, timeout_s=5.0)
                return [e async for e in stream_completion(session, replica, {"prompt": [1]}, 2.0)]
        finally:
            await runner.cleanup()

    return asyncio.run(run())


def test_a_replica_that_sends_no_token_ids_fails_instead_of_answering_empty() -> None:
    """A server that ignores return_token_ids (an older vLLM) streams text only: the
    sidecar served an empty answer (finish 'length', 200) and learnt from it."""
    from router.fleet.client import Delta, StreamEnd

    def events(with_ids: bool) -> list[object]:
        ids = {"token_ids": [5, 6]} if with_ids else {}
        return [
            {"choices": [{"text": "Hello", **ids}]},
            {"choices": [{"text": "", "finish_reason": "length"}]},
            {"choices": [], "usage": {"completion_tokens": 2}},
        ]

    answered = _streamed(events(with_ids=True))
    assert isinstance(answered[0], Delta) and answered[0].token_ids == (5, 6)
    assert isinstance(answered[-1], StreamEnd) and answered[-1].completion_tokens == 2
    with pytest.raises(ReplicaFailedError, match="generated 2 tokens but sent 0 token ids"):
        _streamed(events(with_ids=False))


@pytest.mark.parametrize(
    "odd",
    [
        [1, 2],  # a chunk that is not an object
        {"choices": ["Hello"]},  # a choice that is not one
        {"choices": [{"text": "Hello", "token_ids": [5]}], "metrics": [1, 2]},
        {"choices": [{"text": "Hello", "token_ids": [5]}], "usage": {"completion_tokens": "x"}},
        {"choices": [{"text": "Hello", "token_ids": [None]}]},
        {"choices": [{"text": "Hello", "token_ids": 5}]},
        {"choices": [{"text": "Hello", "token_ids": [5], "prompt_token_ids": 7}]},
    ],
)
def test_a_chunk_of_another_shape_fails_the_replica_not_the_request(odd: object) -> None:
    """A server that answers in another shape than vLLM's (a proxy's error page in JSON,
    another engine) failed the request with INTERNAL (a TypeError or AttributeError out
    of the parse): it is the replica's failure, and the request goes on elsewhere."""
    with pytest.raises(ReplicaFailedError):
        _streamed([odd, {"choices": [{"text": "", "finish_reason": "length"}]}])


def test_a_pinned_drafter_is_served_by_its_own_replicas_or_refused() -> None:
    """force_drafter with every replica of that configuration busy was served by the
    policy's next best configuration (and learnt from) as if pinned; now it waits its
    turn (429), except in a failover, which goes wherever a replica serves."""
    from types import SimpleNamespace

    from router.domain import GenerateInput, RouteInput
    from router.errors import InvalidFieldError
    from router.fleet.config import ReplicaSpec
    from router.fleet.service import _checked_sampling
    from router.policy.base import Decision

    def replica(name: str, drafter: str, in_flight: int) -> Replica:
        spec = ReplicaSpec(url=f"http://{name}:8000", model="t", speculative=drafter, name=name)
        return Replica(spec, max_in_flight=1, timeout_s=5.0, healthy=True, in_flight=in_flight)

    service = FleetRouterService.__new__(FleetRouterService)
    service.replicas = [replica("a", "code", 1), replica("b", "ngram", 0)]
    next_best = SimpleNamespace(select=lambda context, offered: (Decision("ngram", 3), None))
    service.policy = next_best  # type: ignore[assignment]
    routed = _routed_to("code", 3)
    placed = service._place(routed, frozenset())
    assert placed is not None and placed[1].name == "b"  # the policy's next best
    assert service._place(routed, frozenset(), pinned=True) is None
    error = service._unavailable((), "code")
    assert "pinned drafter 'code'" in str(error)
    failover = service._place(routed, frozenset({"a"}), failover=True, pinned=True)
    assert failover is not None and failover[1].name == "b"
    pinned_stop = GenerateInput(route=RouteInput(prompt=None), force_stop_threshold=0.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidFieldError, match="force_stop_threshold"):
        _checked_sampling(pinned_stop)
    predicted = GenerateInput(route=RouteInput(prompt=None), prediction="text")  # type: ignore[arg-type]
    with pytest.raises(InvalidFieldError, match="prediction"):
        _checked_sampling(predicted)


def test_a_logit_bias_goes_to_a_plain_replica_or_is_refused() -> None:
    """vLLM refuses logit_bias under speculative decoding (a 400 from the replica the
    policy chose): such a request is placed on a plain replica only, and refused before
    any replica is asked where the fleet has none or it pins a speculative one."""
    from router.domain import GenerateInput, RouteInput
    from router.errors import InvalidFieldError
    from router.fleet.config import ReplicaSpec

    def replica(name: str, drafter: str, in_flight: int = 0) -> Replica:
        spec = ReplicaSpec(url=f"http://{name}:8000", model="t", speculative=drafter, name=name)
        return Replica(spec, max_in_flight=1, timeout_s=5.0, healthy=True, in_flight=in_flight)

    service = FleetRouterService.__new__(FleetRouterService)
    service.replicas = [replica("a", "ngram"), replica("b", "none")]
    routed = _routed_to("ngram", 3)
    placed = service._place(routed, frozenset(), plain_only=True)
    assert placed is not None and placed[1].name == "b" and placed[0].decision.k == 0
    service.replicas[1].in_flight = 1  # the plain replica busy: wait, not a speculative one
    assert service._place(routed, frozenset(), plain_only=True) is None
    biased = Sampling(logit_bias=((5, -100.0),))
    request = GenerateInput(route=RouteInput(prompt=None, sampling=biased))  # type: ignore[arg-type]
    assert service._checked_plain(request)
    assert not service._checked_plain(GenerateInput(route=RouteInput(prompt=None)))  # type: ignore[arg-type]
    with pytest.raises(InvalidFieldError, match="force_drafter"):
        service._checked_plain(replace(request, force_drafter="ngram"))
    min_p = Sampling(do_sample=True, min_p=0.1)
    assert service._checked_plain(GenerateInput(route=RouteInput(prompt=None, sampling=min_p)))  # type: ignore[arg-type]
    greedy_min_p = Sampling(min_p=0.1)  # no warper applies to greedy decoding
    assert not service._checked_plain(
        GenerateInput(route=RouteInput(prompt=None, sampling=greedy_min_p))  # type: ignore[arg-type]
    )
    service.replicas = [replica("a", "ngram")]
    with pytest.raises(InvalidFieldError, match='speculative = "none"'):
        service._checked_plain(request)


def test_the_prompts_logprobs_come_from_vllms_echo() -> None:
    """Asked for the prompt's logprobs (gRPC ``prompt_logprobs``, TGI's
    ``decoder_input_details``, OpenAI's echo with logprobs), the first attempt asks vLLM
    to echo the prompt with logprobs; its first chunk lists the prompt's (the first with
    none) before the output's, and they are split apart here. vLLM's echo has no ranks,
    so OpenAI's vLLM-shaped ``prompt_logprobs`` stays refused in fleet mode."""
    from router.fleet.client import _split_echo, with_prompt_scored

    body = with_prompt_scored({"model": "t", "logprobs": None}, 2)
    assert body["echo"] is True and body["logprobs"] == 2 and body["return_tokens_as_token_ids"]
    assert with_prompt_scored({"logprobs": 5}, 2)["logprobs"] == 5  # one count for both
    choice = {
        "prompt_token_ids": [5, 6, 7],
        "token_ids": [8],
        "logprobs": {
            "token_logprobs": [None, -1.0, -2.0, -0.5],
            "top_logprobs": [
                None,
                {"token_id:6": -1.0, "token_id:9": -0.7},
                {"token_id:7": -2.0, "token_id:3": -0.1},
                {"token_id:8": -0.5, "token_id:4": -1.5},
            ],
        },
    }
    scored, rest = _split_echo(choice, 3, 1)
    assert scored == ((-1.0, ((9, -0.7),)), (-2.0, ((3, -0.1),)))
    assert rest == {
        "token_logprobs": [-0.5],
        "top_logprobs": [choice["logprobs"]["top_logprobs"][3]],
    }
    assert not FleetRouterService.ranks_prompt_tokens.fget(None)  # type: ignore[attr-defined]


def _fleet(*replicas: dict[str, Any], **options: Any) -> Any:
    return parse_fleet({**options, "replicas": [{"model": "target", **r} for r in replicas]})


PLAIN = {"url": "http://a:1", "speculative": "none"}
NGRAM = {"url": "http://b:2", "speculative": "ngram", "k": 3}


def test_a_fleet_file_read_again_keeps_the_replicas_it_still_lists() -> None:
    """A replica listed again with the same URL, drafter and k is the same object (its
    health and counts stay), with its other settings from the new file; one listed with
    another k is removed and a new one added; one no longer listed is removed."""
    from router.fleet.reload import apply_settings, plan_change

    before = _fleet(PLAIN, NGRAM, {"url": "http://c:3", "speculative": "ngram", "k": 3})
    replicas = [Replica.from_spec(spec, before) for spec in before.replicas]
    plain, ngram, gone = replicas
    plain.bring_back()
    plain.served = 5
    after = _fleet(
        {**PLAIN, "max_in_flight": 2},
        {**NGRAM, "k": 5},
        {"url": "http://d:4", "speculative": "none"},
        max_in_flight=3,
        api_key_env="PATH",  # any variable that is set
    )
    keys = replica_api_keys(after)
    change = plan_change(replicas, after, keys, (1, 2))
    apply_settings(change, after, keys)
    assert change.replicas[0] is plain and change.kept == [plain]
    assert (plain.healthy, plain.served, plain.max_in_flight) == (True, 5, 2)
    assert plain.headers["Authorization"].startswith("Bearer ")
    assert [r.name for r in change.removed] == ["http://b:2", "http://c:3"]
    assert [r.name for r in change.added] == ["http://b:2", "http://d:4"]
    moved = change.added[0]
    assert moved is not ngram and moved.spec.draft_length == 5 and not moved.healthy
    assert change.added[1].max_in_flight == 3 and change.added[1].probe_ids == (1, 2)
    assert gone not in change.replicas
    assert "1 kept; added http://b:2 (ngram, k=5)" in change.summary()


@pytest.mark.parametrize(
    ("new", "message"),
    [
        (_fleet({**PLAIN, "model": "other"}), "the model changed from 'target' to 'other'"),
        (_fleet(PLAIN, {"url": "http://b:2", "speculative": "code"}), "unknown drafter 'code'"),
        (_fleet(PLAIN, api_key_env="SPECROUTE_TEST_UNSET_KEY"), "SPECROUTE_TEST_UNSET_KEY"),
    ],
)
def test_a_fleet_file_that_cannot_replace_the_served_one_is_refused(new: Any, message: str) -> None:
    from router.fleet.reload import check_new_fleet

    with pytest.raises(FleetConfigError, match=re.escape(message)):
        check_new_fleet(_fleet(PLAIN, NGRAM), new, {"none", "ngram"}, "fleet file f.toml")


def test_the_fleet_file_is_applied_when_its_content_changes_and_a_bad_one_refused_once(
    tmp_path: Path,
) -> None:
    """The reader applies each new content once, refuses a bad one once (not at every
    read), applies the file again once it is fixed, and stops when reload_interval_s
    becomes 0."""
    import asyncio

    from router.fleet.reload import watch_fleet_file

    path = tmp_path / "fleet.toml"
    start = '[[replicas]]\nurl = "http://a:1"\nmodel = "target"\nspeculative = "none"\n'
    path.write_text(start)
    applied: list[int] = []
    refused: list[str] = []
    interval = {"s": 0.01}

    async def apply(fleet: Any) -> None:
        applied.append(len(fleet.replicas))

    async def until(done: Any) -> None:
        """Wait (10 s at most: the file is read in a worker thread) until ``done()``."""
        for _ in range(1000):
            if done():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("not reached in time")

    async def run() -> None:
        reader = asyncio.create_task(
            watch_fleet_file(path, start.encode(), lambda: interval["s"], apply, refused.append)
        )
        await asyncio.sleep(0.1)
        assert applied == [] and refused == []  # the content served at start
        path.write_text(start + start.replace("a:1", "b:2"))
        await until(lambda: applied == [2])
        path.write_text("[[replicas]\n")
        await until(lambda: len(refused) == 1)
        await asyncio.sleep(0.1)  # read again meanwhile: not refused again
        assert applied == [2] and len(refused) == 1 and "not TOML" in refused[0]
        path.unlink()
        await asyncio.sleep(0.1)
        path.write_text(start)
        await until(lambda: applied == [2, 1])
        assert len(refused) == 1
        interval["s"] = 0
        await asyncio.wait_for(reader, 10)

    asyncio.run(run())


def test_a_reload_gives_the_policy_the_fleets_draft_lengths_when_they_change() -> None:
    """The policy prices each drafter at its replicas' k (``drafter_hints``): a reload that
    changes a k, or adds or removes a drafter, gives it the new hints; one that changes
    other settings only does not."""
    import asyncio
    from types import SimpleNamespace

    start = _fleet(PLAIN, NGRAM)
    service = FleetRouterService.__new__(FleetRouterService)
    hinted: list[int] = []
    watched: list[str] = []
    service.settings = SimpleNamespace(fleet_file=Path("fleet.toml"))  # type: ignore[assignment]
    service.drafters = SimpleNamespace(names=lambda: ["none", "ngram"])  # type: ignore[assignment]
    service.policy = SimpleNamespace(hints_changed=lambda: hinted.append(1))  # type: ignore[assignment]
    service.fleet, service._probe_ids, service._reloads = start, (), None
    service.replicas = [Replica.from_spec(spec, start) for spec in start.replicas]
    service._watchers = {}
    service._watch = lambda replica: watched.append(replica.name)  # type: ignore[method-assign]

    asyncio.run(service.reload_fleet(_fleet(PLAIN, NGRAM, max_in_flight=2)))
    assert hinted == [] and watched == [] and service.replicas[1].max_in_flight == 2
    asyncio.run(service.reload_fleet(_fleet(PLAIN, {**NGRAM, "k": 5})))
    assert hinted == [1] and watched == ["http://b:2"]
    assert service.fleet.draft_length("ngram") == 5


@pytest.mark.parametrize(
    ("k", "metrics", "problem"),
    [
        (
            3,
            {"speculative_decoding": {"per_step_drafted": [3, 3], "per_step_accepted": [1, 3]}},
            None,
        ),
        (
            3,
            {"speculative_decoding": {"per_step_drafted": [2, 3], "per_step_accepted": [0, 3]}},
            None,
        ),
        (
            3,
            {"speculative_decoding": {"per_step_drafted": [5], "per_step_accepted": [2]}},
            "drafts up to 5 tokens a step while the fleet file says k = 3",
        ),
        (
            0,
            {"speculative_decoding": {"per_step_drafted": [4], "per_step_accepted": [4]}},
            "speculates (up to 4 tokens a step)",
        ),
        (0, {}, None),
        (3, {"ttft_s": 0.1}, "carry no speculation metrics"),
        # vLLM's totals at its basic level, rebuilt per step: 2 steps of 4 drafted.
        (
            3,
            {
                "speculative_decoding": {
                    "num_spec_steps": 2,
                    "num_draft_tokens": 8,
                    "num_accepted_draft_tokens": 3,
                }
            },
            "drafts up to 4 tokens a step",
        ),
    ],
)
def test_a_replica_answering_unlike_its_fleet_file_configuration_is_named(
    k: int, metrics: dict[str, Any], problem: str | None
) -> None:
    from router.fleet.learning import speculation_problem

    found = speculation_problem(k, metrics)
    assert (found is None) if problem is None else (found is not None and problem in found)
