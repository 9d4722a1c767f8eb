"""specroute in front of real ``vllm serve`` processes (vLLM's CPU build, ``make vllm``).

The fleet: a head_dim-64 Qwen2 target built from the tiny world's tokenizer (vLLM's CPU
attention refuses the other sizes), served plain, with the n-gram proposer (two
replicas: one to kill), and with a draft model ("twin", the target's own weights, so its
drafts are accepted), all started with an API key, plus a URL where nothing listens. The
sidecar reads the tiny world's classifier; it does not load the target's weights in fleet
mode, so the tests load the target themselves for the reference outputs.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from text_generation import Client

from benchmarks.fleet.vllm_process import (
    Speculation,
    VllmServer,
    VllmUnavailableError,
    fleet_toml,
    vllm_fleet,
    vllm_python,
)
from router.domain import Prompt
from router.pb import router_pb2 as pb
from tests.router.conftest import COMPLETION_PROMPT, ServingWorld, SidecarThread

try:
    vllm_python()
    VLLM_MISSING = ""
except VllmUnavailableError as error:
    VLLM_MISSING = str(error)

# Starting four vLLM servers takes minutes on two busy cores.
pytestmark = [
    pytest.mark.skipif(bool(VLLM_MISSING), reason=VLLM_MISSING),
    pytest.mark.timeout(1200),
]

PROMPT = COMPLETION_PROMPT
TOKENS = 24
DRAFT_LENGTH = 3
# The replicas run with an API key, as production ones do; the sidecar reads it from the
# variable the fleet file names.
API_KEY = "fleet-test-key"
API_KEY_ENV = "SPECROUTE_TEST_VLLM_API_KEY"


@dataclass
class Fleet:
    sidecar: SidecarThread
    servers: dict[str, VllmServer]  # none, ngram, twin, spare (ngram)
    dead_url: str
    engine: Any = None  # the target in-process, for reference outputs (loaded when asked)

    @property
    def service(self) -> Any:
        return self.sidecar.service

    def replica(self, url: str) -> Any:
        return next(r for r in self.service.replicas if r.spec.url == url)


def _models(world_target: Path, root: Path) -> tuple[Path, Path]:
    """A 2-layer target with two 64-wide heads, and its twin (same weights) as drafter."""
    from transformers import AutoTokenizer

    from benchmarks.world.build import ModelShape, new_model, save_model

    tokenizer = AutoTokenizer.from_pretrained(world_target)
    shape = ModelShape(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = new_model(shape, tokenizer, seed=0)
    save_model(model, tokenizer, root / "target", [])
    save_model(model, tokenizer, root / "twin", [])
    return root / "target", root / "twin"


@pytest.fixture(scope="module")
def fleet(serving_world: ServingWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    from router.components import build_components

    root = tmp_path_factory.mktemp("fleet")
    target, twin = _models(serving_world.world.target_dir, root / "models")
    speculations = [
        Speculation("none"),
        Speculation("ngram", DRAFT_LENGTH),
        Speculation("twin", DRAFT_LENGTH, twin),
        Speculation("ngram", DRAFT_LENGTH),
    ]
    os.environ[API_KEY_ENV] = API_KEY
    with vllm_fleet(
        target, speculations, root / "logs", single_process=True, api_key=API_KEY
    ) as servers:
        dead_url = "http://127.0.0.1:1"  # nothing listens (a free port could be taken)
        fleet_file = root / "fleet.toml"
        fleet_file.write_text(
            fleet_toml(
                servers, health_interval_s=0.5, metrics_interval_s=0.5, api_key_env=API_KEY_ENV
            )
            + f'[[replicas]]\nurl = "{dead_url}"\nmodel = "target"\nspeculative = "ngram"\n'
            + f"k = {DRAFT_LENGTH}\n"
        )
        settings = serving_world.settings(
            root / "state",
            target_dir=target,
            drafter_dirs={"twin": twin},
            model_roots=[root / "models"],
            bundle_drafters=False,
            fleet_file=fleet_file,
        )
        sidecar = SidecarThread(settings, build_components(settings))
        try:
            named = dict(zip(("none", "ngram", "twin", "spare"), servers, strict=True))
            yield Fleet(sidecar, named, dead_url)
        finally:
            sidecar.stop()
            os.environ.pop(API_KEY_ENV, None)


def generate(fleet: Fleet, drafter: str = "", tokens: int = TOKENS, **fields: Any) -> Any:
    request = pb.GenerateRequest(
        text=PROMPT, max_new_tokens=tokens, force_drafter=drafter, **fields
    )
    chunks = list(fleet.sidecar.stub.Generate(request, timeout=120))
    ids = [token.id for chunk in chunks for token in chunk.tokens]
    return chunks[0].decision, ids, chunks[-1].stats


def prompt_logprobs(fleet: Fleet, ids: list[int]) -> list[float]:
    """The target's log-probability of each of ``ids`` after the first, from one forward
    pass in this process."""
    import torch

    reference_ids(fleet, tokens=1)  # loads the in-process engine's target
    assert fleet.engine is not None
    model = fleet.engine.target.model
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    rows = torch.log_softmax(logits, dim=-1)
    return rows.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()


def reference_ids(fleet: Fleet, tokens: int = TOKENS, **options: Any) -> list[int]:
    """The in-process engine's greedy output on the same target, without speculation
    (with the engine's ``options``: penalties, stop token ids...)."""
    from drafters.engine import SpeculativeEngine
    from drafters.loader import load_model

    service = fleet.service
    if fleet.engine is None:
        target = service.components.target
        fleet.engine = SpeculativeEngine(load_model(target.path, placement=target.placement))
    none = service.drafters.get("none").drafter
    run = fleet.engine.generate(
        service.prompt_ids(Prompt(text=PROMPT)),
        none,
        0,
        max_new_tokens=tokens,
        **options,
    )
    for _ in run:
        pass
    return [int(t) for t in run.output_ids]


def test_route_names_a_serving_replica_with_its_draft_length(fleet: Fleet) -> None:
    serving = {server.url: server.speculation for server in fleet.servers.values()}
    for _ in range(12):
        decision = fleet.sidecar.stub.Route(pb.RouteRequest(text=PROMPT), timeout=30)
        assert decision.replica in serving, decision
        speculation = serving[decision.replica]
        assert decision.drafter == speculation.drafter
        assert decision.draft_length == speculation.k


def test_the_replicas_want_their_api_key_and_the_sidecar_sends_it(fleet: Fleet) -> None:
    """vLLM started with an API key answers /v1 without it with 401 (its /health stays
    open); the sidecar's requests carry the key from the variable the fleet file names."""
    url = f"{fleet.servers['ngram'].url}/v1/completions"
    body = json.dumps({"model": "target", "prompt": PROMPT, "max_tokens": 2}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401
    decision, ids, _ = generate(fleet, "ngram", tokens=4)
    assert decision.replica in {s.url for s in fleet.servers.values()} and len(ids) == 4


def test_vllm_tokenizes_the_probe_as_the_sidecar_does(fleet: Fleet) -> None:
    """What lets a replica serve (``router.fleet.replica``): vLLM's ``/tokenize`` gives
    the probe text the ids the sidecar's target tokenizer gives it."""
    from router.fleet.replica import TOKENIZER_PROBE

    replica = fleet.replica(fleet.servers["none"].url)
    body = {"model": "target", "prompt": TOKENIZER_PROBE, "add_special_tokens": False}
    request = urllib.request.Request(
        f"{replica.spec.url}/tokenize",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", **replica.headers},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        tokens = json.loads(response.read())["tokens"]
    assert len(replica.probe_ids) > 10 and tokens == list(replica.probe_ids)


def test_unreachable_replica_is_logged_and_routed_around(fleet: Fleet) -> None:
    dead = fleet.replica(fleet.dead_url)
    assert not dead.healthy
    assert "GET /health failed" in dead.last_error
    for _ in range(6):
        decision, ids, _ = generate(fleet, "ngram", tokens=4)
        assert decision.replica != fleet.dead_url
        assert len(ids) == 4


def test_greedy_output_is_the_same_on_every_configuration(fleet: Fleet) -> None:
    expected = reference_ids(fleet)
    assert len(expected) == TOKENS
    for drafter in ("none", "ngram", "twin"):
        decision, ids, stats = generate(fleet, drafter)
        assert decision.drafter == drafter
        assert ids == expected, drafter
        assert stats.generated_tokens == TOKENS and stats.finish_reason == "length"
        if drafter == "twin":  # vLLM's per-step metrics: the twin's drafts are accepted
            assert stats.steps > 0
            assert list(stats.drafted_per_step) == [DRAFT_LENGTH] * stats.steps
            assert sum(stats.accepted_per_step) > 0


def test_stop_token_ids_and_ignore_eos_reach_the_replicas(fleet: Fleet) -> None:
    """vLLM's own parameters, forwarded: a stop token id ends the generation where that
    token first comes, on every configuration (vLLM's finish reason "stop" with the id)."""
    expected = reference_ids(fleet)
    token = expected[3]
    cut = expected.index(token) + 1
    sampling = pb.SamplingParams(ignore_eos=True, stop_token_ids=[token])
    for drafter in ("none", "ngram", "twin"):
        _, ids, stats = generate(fleet, drafter, sampling=sampling)
        assert ids == expected[:cut], drafter
        assert stats.finish_reason == "eos_token", drafter
    # min_tokens: the stop token cannot come (nor end the generation) before 8 tokens.
    from drafters.penalties import Penalties

    later = reference_ids(
        fleet, ignore_eos=True, stop_token_ids=[token], penalties=Penalties(min_tokens=8)
    )
    assert len(later) >= 9 and token not in later[:8]
    sampling = pb.SamplingParams(ignore_eos=True, stop_token_ids=[token], min_tokens=8)
    for drafter in ("none", "ngram"):
        _, ids, _ = generate(fleet, drafter, sampling=sampling)
        assert ids == later, drafter
    # skip_special_tokens false, forwarded: the end-of-sequence tokens a biased run goes
    # past are in the text the sidecar decodes from the replica's ids.
    tokenizer = fleet.service.tokenizer
    eos = int(tokenizer.eos_token_id)
    kept = pb.SamplingParams(ignore_eos=True, skip_special_tokens=False, logit_bias={eos: 100})
    _, ids, stats = generate(fleet, "none", tokens=4, sampling=kept)
    assert ids == [eos] * 4
    assert stats.generated_text == tokenizer.decode(ids, skip_special_tokens=False) != ""


def test_penalties_and_a_logit_bias_reach_the_replicas(fleet: Fleet) -> None:
    """Penalties forwarded: vLLM's output under them is the in-process engine's, on
    every configuration. A logit bias, which vLLM refuses under speculative decoding, is
    served by the plain replica (and refused when pinned to a speculative one)."""
    from drafters.penalties import Penalties

    plain = reference_ids(fleet)
    penalised = dict(repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.6)
    penalties = Penalties(repetition=1.2, presence=0.3, frequency=0.6)
    expected = reference_ids(fleet, penalties=penalties)
    assert expected != plain
    for drafter in ("none", "ngram"):
        _, ids, _ = generate(fleet, drafter, sampling=pb.SamplingParams(**penalised))
        assert ids == expected, drafter
    bias = {plain[1]: -100.0, plain[2]: 1.5}
    biased = reference_ids(fleet, penalties=replace(penalties, bias=tuple(sorted(bias.items()))))
    sampling = pb.SamplingParams(**penalised, logit_bias=bias)
    decision, ids, _ = generate(fleet, sampling=sampling)
    assert ids == biased and ids != expected
    assert decision.drafter == "none" and decision.replica == fleet.servers["none"].url
    # A Route (the caller forwards the request itself) names the plain replica too.
    for asked in (sampling, pb.SamplingParams(do_sample=True, min_p=0.5)):
        routed = fleet.sidecar.stub.Route(pb.RouteRequest(text=PROMPT, sampling=asked), timeout=30)
        assert routed.replica == fleet.servers["none"].url and routed.draft_length == 0
    # min_p 1 keeps the most likely token alone (greedy output), on the plain replica.
    top_only = pb.SamplingParams(do_sample=True, temperature=0.8, min_p=1.0)
    decision, ids, _ = generate(fleet, sampling=top_only)
    assert ids == plain and decision.replica == fleet.servers["none"].url
    with pytest.raises(grpc.RpcError) as pinned:
        generate(fleet, "ngram", sampling=sampling)
    assert pinned.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "logit_bias" in str(pinned.value.details())


def test_allowed_token_ids_and_bad_words_reach_the_replicas(fleet: Fleet) -> None:
    """vLLM's allowed_token_ids and bad_words, forwarded: vLLM's output under them is the
    in-process engine's, on every configuration (its rejection sampler masks them too)."""
    from drafters.penalties import Penalties

    tokenizer = fleet.service.tokenizer
    letters = tuple(tokenizer.convert_tokens_to_ids(list("abcdefgh")))
    lettered = reference_ids(fleet, penalties=Penalties(allowed=letters))
    assert set(lettered) <= set(letters)
    words = [tokenizer.decode(lettered[:1])]  # the letter it begins with: barred too
    penalties = Penalties(allowed=letters, bad_words=fleet.service.bad_word_ids(words))
    expected = reference_ids(fleet, penalties=penalties)
    assert expected != lettered and set(expected) <= set(letters) - set(lettered[:1])
    sampling = pb.SamplingParams(allowed_token_ids=letters, bad_words=words)
    for drafter in ("none", "ngram", "twin"):
        _, ids, _ = generate(fleet, drafter, sampling=sampling)
        assert ids == expected, drafter


def test_structured_output_reaches_the_replicas(fleet: Fleet) -> None:
    """A grammar forwarded as vLLM's structured_outputs: vLLM's output under it is the
    in-process engine's (its own grammar mask), on every configuration."""
    from drafters.grammar import OutputGrammar

    regex = "(red|green|blue) [0-9]{2}"
    expected = reference_ids(fleet, grammar=OutputGrammar("regex", regex))
    text = fleet.service.tokenizer.decode(expected, skip_special_tokens=True)
    assert re.fullmatch(regex, text), text
    sampling = pb.SamplingParams(structured_output=pb.StructuredOutput(kind="regex", spec=regex))
    for drafter in ("none", "ngram", "twin"):
        _, ids, stats = generate(fleet, drafter, sampling=sampling)
        assert ids == expected, drafter
        assert stats.finish_reason == "eos_token", drafter
    reply = openai.OpenAI(
        base_url=f"{fleet.sidecar.http_url}/v1", api_key="unused", max_retries=0
    ).completions.create(
        model="target",
        prompt=PROMPT,
        max_tokens=TOKENS,
        temperature=0,
        extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}},
    )
    assert reply.choices[0].text in ("alpha", "beta")


def test_logprobs_come_from_the_replicas_and_match_the_target(fleet: Fleet) -> None:
    """Logprobs asked of the sidecar are vLLM's (tokens named by id, so the alternatives
    are ids as in-process), the target's raw ones whichever configuration served them."""
    import torch

    from drafters.detokenize import IncrementalDetokenizer

    expected = reference_ids(fleet)
    target = fleet.engine.target  # type: ignore[union-attr]
    prompt = fleet.service.prompt_ids(Prompt(text=PROMPT))
    with torch.inference_mode():
        logits = target.model(torch.tensor([prompt + expected])).logits[0, len(prompt) - 1 : -1]
    rows = torch.log_softmax(logits.float(), dim=-1)
    reference = rows.gather(1, torch.tensor(expected).unsqueeze(1)).squeeze(1).tolist()
    detokenizer = IncrementalDetokenizer(fleet.service.tokenizer)
    texts = [detokenizer.push(i) for i in expected]
    for drafter in ("none", "ngram", "twin"):
        request = pb.GenerateRequest(
            text=PROMPT, max_new_tokens=TOKENS, force_drafter=drafter, logprobs=2
        )
        chunks = list(fleet.sidecar.stub.Generate(request, timeout=120))
        tokens = [token for chunk in chunks for token in chunk.tokens]
        assert [t.id for t in tokens] == expected, drafter
        assert [t.logprob for t in tokens] == pytest.approx(reference, abs=2e-3), drafter
        assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].id == t.id for t in tokens)
        # Each token's own text (vLLM's chunks carry several tokens' under speculation):
        # what completions' text_offset and TGI's per-token events are made of.
        assert [t.text for t in tokens] == texts, drafter


def test_openai_and_tgi_fronts_forward_to_the_fleet(fleet: Fleet) -> None:
    _, _, stats = generate(fleet, "none")
    expected_text = stats.generated_text
    client = openai.OpenAI(base_url=f"{fleet.sidecar.http_url}/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["target"]
    reply = client.completions.create(
        model="target", prompt=PROMPT, max_tokens=TOKENS, temperature=0
    )
    assert reply.choices[0].text == expected_text
    assert reply.usage is not None and reply.usage.completion_tokens == TOKENS
    assert reply.model_extra is not None and reply.model_extra["specroute"]["replica"]
    # n choices run at once on the fleet (up to its free places), each the greedy text.
    several = client.completions.create(
        model="target", prompt=PROMPT, max_tokens=TOKENS, temperature=0, n=3
    )
    assert [c.text for c in several.choices] == [expected_text] * 3
    streamed = client.completions.create(
        model="target", prompt=PROMPT, max_tokens=TOKENS, temperature=0, n=3, stream=True
    )
    texts = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [expected_text] * 3
    ids = fleet.service.prompt_ids(Prompt(text=PROMPT))  # a token-id prompt, forwarded
    by_ids = client.completions.create(model="target", prompt=ids, max_tokens=TOKENS, temperature=0)
    assert by_ids.choices[0].text == expected_text
    # echo: the prompt leads the text, and with logprobs its tokens lead the logprobs,
    # scored by the replica (vLLM's echo), as the target scores them.
    echoed = client.completions.create(
        model="target", prompt=PROMPT, max_tokens=TOKENS, temperature=0, echo=True
    )
    assert echoed.choices[0].text == PROMPT + expected_text
    scored = client.completions.create(
        model="target", prompt=PROMPT, max_tokens=TOKENS, temperature=0, echo=True, logprobs=1
    )
    logprobs = scored.choices[0].logprobs
    assert scored.choices[0].text == PROMPT + expected_text and logprobs is not None
    assert logprobs.token_logprobs is not None and logprobs.token_logprobs[0] is None
    assert logprobs.token_logprobs[1 : len(ids)] == pytest.approx(
        prompt_logprobs(fleet, ids), abs=2e-3
    )
    assert len(logprobs.token_logprobs) == len(ids) + TOKENS
    tgi_scored = Client(fleet.sidecar.http_url, timeout=60).generate(
        PROMPT, max_new_tokens=TOKENS, decoder_input_details=True
    )
    assert [token.id for token in tgi_scored.details.prefill] == ids
    # vLLM's own prompt_logprobs answer needs ranks, which its echo does not give.
    with pytest.raises(openai.BadRequestError) as prompt_scored:
        client.completions.create(
            model="target", prompt=PROMPT, max_tokens=TOKENS, extra_body={"prompt_logprobs": 0}
        )
    assert prompt_scored.value.body["param"] == "prompt_logprobs"  # type: ignore[index]
    chunks = list(
        client.completions.create(
            model="target", prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text
    chat = client.chat.completions.create(
        model="target", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].finish_reason in {"stop", "length"}
    # The Responses API: the chat's answer, and vLLM's own /v1/responses answer for it.
    asked: Any = {"input": "Hello", "max_output_tokens": 8, "temperature": 0}
    response = client.responses.create(model="target", **asked)
    assert response.output_text == chat.choices[0].message.content
    replica = fleet.servers["none"]
    vllm = openai.OpenAI(base_url=f"{replica.url}/v1", api_key=replica.api_key, max_retries=0)
    theirs = vllm.responses.create(model="target", **asked)  # the name it serves
    assert response.output_text == theirs.output_text
    assert response.status == theirs.status
    assert response.usage is not None and theirs.usage is not None
    assert response.usage.input_tokens == theirs.usage.input_tokens
    assert response.usage.output_tokens == theirs.usage.output_tokens
    with client.responses.stream(model="target", **asked) as events:
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == response.output_text
    # Anthropic's Messages API: the chat's answer, and vLLM's own /v1/messages answer.
    import anthropic

    spoken: Any = {
        "model": "target",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 8,
        "extra_body": {"temperature": 0},
    }
    ours = anthropic.Anthropic(base_url=fleet.sidecar.http_url, api_key="x", max_retries=0)
    message = ours.messages.create(**spoken)
    assert message.content[0].text == chat.choices[0].message.content  # type: ignore[union-attr]
    vllm_messages = anthropic.Anthropic(
        base_url=replica.url, api_key=replica.api_key or "x", max_retries=0
    ).messages.create(**spoken)
    assert message.content[0].text == vllm_messages.content[0].text  # type: ignore[union-attr]
    assert message.stop_reason == vllm_messages.stop_reason
    assert message.usage.input_tokens == vllm_messages.usage.input_tokens
    assert message.usage.output_tokens == vllm_messages.usage.output_tokens
    tgi = Client(fleet.sidecar.http_url, timeout=60).generate(PROMPT, max_new_tokens=TOKENS)
    assert tgi.generated_text == expected_text
    assert tgi.details.generated_tokens == TOKENS


def test_the_context_is_the_replicas_max_model_len(fleet: Fleet) -> None:
    """The replicas run with --max-model-len 512, below the target's configured 2048: a
    chat without max_tokens (the rest of the context, within limits.max_new_tokens, as
    vLLM fills it) was sent its 200 tokens on top of a prompt of over 312, and every
    replica refused it (400, over its context). The sidecar now reads each replica's
    max_model_len (/v1/models) and fits requests, /info and /tokenize to the smallest."""
    assert fleet.service.context_tokens == 512
    long_prompt = "one two three four five six seven eight nine ten " * 14
    client = openai.OpenAI(base_url=f"{fleet.sidecar.http_url}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model="target", messages=[{"role": "user", "content": long_prompt}], temperature=0
    )
    assert reply.usage is not None and 512 - 200 < reply.usage.prompt_tokens < 512 - 20
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= 512
    with pytest.raises(openai.BadRequestError, match="the target's context is 512 tokens"):
        client.completions.create(model="target", prompt=long_prompt, max_tokens=150)
    with urllib.request.urlopen(f"{fleet.sidecar.http_url}/info", timeout=10) as response:
        assert json.loads(response.read())["max_total_tokens"] == 512
    # `specroute fleet check`'s probe finds each real replica serving, at that context.
    import asyncio

    from router.fleet.check import probed
    from router.fleet.replica import TOKENIZER_PROBE

    ids = tuple(fleet.service.tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False))
    checks = asyncio.run(probed(fleet.service.fleet, ids))
    assert [c.url for c in checks if not c.serving] == [fleet.dead_url]
    assert {c.max_model_len for c in checks if c.serving} == {512}


def test_the_policy_learns_from_vllm_metrics(fleet: Fleet) -> None:
    before = fleet.sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest(), timeout=30)
    for drafter in ("twin", "ngram", "none"):
        generate(fleet, drafter, tokens=16)
    after = fleet.sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest(), timeout=30)
    assert after.version >= before.version + 3
    arms = {arm.drafter: arm for context in after.contexts for arm in context.arms}
    # The twin drafts the target's own tokens: its acceptance is learnt as high.
    assert arms["twin"].acceptance_mean > 0.6
    # Each configuration is priced at the one k its replicas run, or found not to pay (the
    # twin drafts with the target's own weights: once its cost is measured, at about a
    # target step per drafted token, k = 3 does not pay).
    served = set(fleet.service.fleet.drafters())
    assert all(
        arm.best_k in {0, DRAFT_LENGTH}
        for context in after.contexts
        for arm in context.arms
        if arm.drafter in served
    ), after.contexts
    # Each context's choice is a configuration the fleet serves.
    assert all(context.chosen_drafter in served for context in after.contexts), after.contexts
    assert fleet.service.plain_token_time_s is not None  # t_ar from the plain replica
    # The fleet's other drafters scored on the greedy outputs (full information).
    deadline = time.monotonic() + 30
    while counterfactual_reports(fleet) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert counterfactual_reports(fleet) > 0


def test_the_times_learnt_from_are_vllms_own(fleet: Fleet) -> None:
    """``engine_decode_time`` and ``engine_request_time``: vLLM's per-request metrics carry
    its own decode time and time to first token, which the policy learns from instead of
    the stream's arrival times and the router's round trip."""
    import asyncio

    import aiohttp

    from router.domain import Sampling
    from router.fleet.client import StreamEnd, completion_body, stream_completion
    from router.fleet.learning import engine_decode_time, engine_request_time

    for name in ("none", "twin"):
        replica = fleet.replica(fleet.servers[name].url)
        ids = list(fleet.service.tokenizer.encode(PROMPT))
        body = completion_body(replica.spec.model, ids, 16, Sampling())

        async def answer(replica: Any = replica, body: Any = body) -> list[Any]:
            async with aiohttp.ClientSession() as session:
                return [e async for e in stream_completion(session, replica, body, 5.0)]

        end = asyncio.run(answer())[-1]
        assert isinstance(end, StreamEnd)
        decode = engine_decode_time(end.metrics, -1.0)
        assert 0.0 < decode < 60.0, end.metrics
        served = engine_request_time(end.metrics, decode)
        assert served is not None and decode < served < 60.0, end.metrics


def counterfactual_reports(fleet: Fleet) -> float:
    with urllib.request.urlopen(fleet.sidecar.metrics_url, timeout=10) as response:
        text = response.read().decode()
    lines = [line for line in text.splitlines() if line.startswith("specroute_reports_total")]
    return sum(float(line.split()[-1]) for line in lines if 'source="counterfactual"' in line)


def _ngram_requests_on(
    fleet: Fleet, replica: Any, count: int = 8
) -> tuple[list[threading.Thread], list[list[int] | BaseException]]:
    """``count`` greedy 48-token requests of the n-gram configuration, each in a thread,
    once ``replica`` has one of them in flight: the threads and their outputs (or
    errors), which fill in as they end."""
    results: list[list[int] | BaseException] = []

    def one() -> None:
        try:
            results.append(generate(fleet, "ngram", tokens=48)[1])
        except BaseException as error:
            results.append(error)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while replica.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert replica.in_flight > 0, "no request reached the replica"
    return threads, results


def test_a_killed_replica_loses_no_request_and_serves_again_once_restarted(
    fleet: Fleet,
) -> None:
    expected = reference_ids(fleet, 48)
    spare = fleet.servers["spare"]
    spare_replica = fleet.replica(spare.url)
    threads, results = _ngram_requests_on(fleet, spare_replica)
    spare.kill()
    for thread in threads:
        thread.join(180)
    assert len(results) == 8
    assert all(result == expected for result in results), results
    assert not spare_replica.healthy and spare_replica.failures >= 1
    # Back on the same port: probed, served again.
    spare.start()
    spare.wait_healthy()
    deadline = time.monotonic() + 30
    while not spare_replica.healthy and time.monotonic() < deadline:
        time.sleep(0.1)
    assert spare_replica.healthy
    served = spare_replica.served
    for _ in range(4):  # least loaded: the idle replicas take turns
        generate(fleet, "ngram", tokens=4)
    assert spare_replica.served > served


def test_a_hung_replica_loses_no_request_and_serves_again_once_it_runs(fleet: Fleet) -> None:
    """A stopped vLLM (SIGSTOP: the kernel still accepts connections, nothing answers) held
    its requests until request_timeout_s (120 s here); its failed health check now cuts
    them, and they go on elsewhere within seconds."""
    expected = reference_ids(fleet, 48)
    spare = fleet.servers["spare"]
    spare_replica = fleet.replica(spare.url)
    deadline = time.monotonic() + 60
    while not spare_replica.healthy and time.monotonic() < deadline:  # after the test above
        time.sleep(0.1)
    threads, results = _ngram_requests_on(fleet, spare_replica)
    spare.pause()
    try:
        for thread in threads:
            thread.join(100)  # generate()'s deadline, 120 s, is request_timeout_s
        assert len(results) == 8
        assert all(result == expected for result in results), results
        assert not spare_replica.healthy
    finally:
        spare.resume()
    deadline = time.monotonic() + 60
    while not spare_replica.healthy and time.monotonic() < deadline:
        time.sleep(0.1)
    assert spare_replica.healthy
