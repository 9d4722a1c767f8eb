"""Predicted outputs through the sidecar: OpenAI's ``prediction`` (the official client) and
gRPC's ``GenerateRequest.prediction`` draft from the text the caller expects back; the
answer is the same, the counts say how much of it the prediction drafted, and such a run
is not learnt from."""

from __future__ import annotations

from typing import Any

import grpc
import openai
import pytest

from router.domain import Prompt
from router.pb import router_pb2 as pb
from tests.router.conftest import (
    COMPLETION_PROMPT,
    SidecarThread,
    counterfactuals_settled,
    greedy_reference,
)

TOKENS = 32
QUESTION = [{"role": "user", "content": "Say something about rivers."}]


def client(sidecar: SidecarThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sidecar.http_url}/v1", api_key="unused", max_retries=0)


def chat(sidecar: SidecarThread, **extra: Any) -> Any:
    return client(sidecar).chat.completions.create(
        model="target", messages=QUESTION, max_tokens=TOKENS, temperature=0, **extra
    )


def readable_bias(sidecar: SidecarThread) -> dict[str, float]:
    """A logit bias against what the tiny test target writes for QUESTION (spaces, whose
    text the tokenizer reads back as other tokens): it then writes a text that reads back
    as the tokens it wrote, as a real model's answers mostly do."""
    plain = sidecar.service.prompt_ids(Prompt(messages=tuple(QUESTION)))
    none = sidecar.service.drafters.get("none").drafter
    run = sidecar.service.components.engine.generate(plain, none, 0, max_new_tokens=TOKENS)
    return {str(t): -100.0 for t in set(run.collect())}


def test_a_chat_with_its_answer_predicted_is_the_same_answer_mostly_drafted(
    sidecar: SidecarThread,
) -> None:
    bias = readable_bias(sidecar)
    plain = chat(sidecar, logit_bias=bias)
    answer = plain.choices[0].message.content
    assert answer and plain.usage.completion_tokens_details is None  # nothing predicted
    tokenizer = sidecar.service.tokenizer
    assert len(tokenizer.encode(answer, add_special_tokens=False)) == TOKENS
    predicted = chat(sidecar, logit_bias=bias, prediction={"type": "content", "content": answer})
    assert predicted.choices[0].message.content == answer
    details = predicted.usage.completion_tokens_details
    assert details is not None
    assert details.accepted_prediction_tokens >= TOKENS // 2
    assert details.rejected_prediction_tokens is not None
    # As text parts, and streamed with its usage: the same.
    parts = [{"type": "text", "text": answer[:5]}, {"type": "text", "text": answer[5:]}]
    stream = client(sidecar).chat.completions.create(
        model="target",
        messages=QUESTION,
        max_tokens=TOKENS,
        temperature=0,
        logit_bias=bias,
        prediction={"type": "content", "content": parts},
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.accepted_prediction_tokens >= TOKENS // 2


def test_a_wrong_prediction_changes_nothing_of_the_answer(sidecar: SidecarThread) -> None:
    ids, text = greedy_reference(sidecar, COMPLETION_PROMPT, TOKENS)
    wrong = "an unrelated text about the weather in spring, and nothing else " * 3
    reply = client(sidecar).completions.create(
        model="target",
        prompt=COMPLETION_PROMPT,
        max_tokens=TOKENS,
        temperature=0,
        extra_body={"prediction": {"type": "content", "content": wrong}},
    )
    assert reply.choices[0].text == text
    assert reply.usage.completion_tokens == len(ids)


def test_grpc_generate_drafts_from_the_prediction_and_does_not_learn_from_it(
    sidecar: SidecarThread,
) -> None:
    bias = {int(t): v for t, v in readable_bias(sidecar).items()}
    sampling = pb.SamplingParams(logit_bias=bias)
    plain = pb.GenerateRequest(
        conversation=pb.Conversation(messages=[pb.ChatMessage(**m) for m in QUESTION]),
        max_new_tokens=TOKENS,
        sampling=sampling,
        no_update=True,
    )
    chunks = list(sidecar.stub.Generate(plain, timeout=60))
    ids, text = [t.id for c in chunks for t in c.tokens], chunks[-1].stats.generated_text
    counterfactuals_settled(sidecar)
    version = sidecar.service.policy.version
    request = pb.GenerateRequest(
        conversation=plain.conversation,
        max_new_tokens=TOKENS,
        sampling=sampling,
        prediction=text,
    )
    chunks = list(sidecar.stub.Generate(request, timeout=60))
    stats = chunks[-1].stats
    assert [t.id for c in chunks for t in c.tokens] == ids
    # Most drafts were the prediction's (the routed drafter drafts where it has none).
    assert stats.accepted_tokens >= stats.accepted_prediction_tokens > TOKENS // 2
    rejected = stats.drafted_tokens - stats.accepted_tokens
    assert rejected >= stats.rejected_prediction_tokens
    assert stats.steps < len(ids) - 1
    counterfactuals_settled(sidecar)
    assert sidecar.service.policy.version == version  # not learnt from
    pinned = pb.GenerateRequest(
        conversation=plain.conversation,
        max_new_tokens=TOKENS,
        sampling=sampling,
        prediction=text,
        force_drafter="none",
        force_draft_length=0,
    )
    pinned_stats = list(sidecar.stub.Generate(pinned, timeout=60))[-1].stats
    assert pinned_stats.generated_text == text and pinned_stats.drafted_tokens == 0
    assert pinned_stats.accepted_prediction_tokens == pinned_stats.rejected_prediction_tokens == 0
    plain = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=TOKENS)
    plain_stats = list(sidecar.stub.Generate(plain, timeout=60))[-1].stats
    assert plain_stats.accepted_prediction_tokens == plain_stats.rejected_prediction_tokens == 0
    counterfactuals_settled(sidecar)
    assert sidecar.service.policy.version > version  # an ordinary run is
    metrics = sidecar.service.metrics.prediction_tokens
    assert metrics.labels(outcome="accepted")._value.get() >= stats.accepted_prediction_tokens


@pytest.mark.parametrize(
    ("prediction", "param"),
    [
        ({"type": "text", "content": "x"}, "prediction.type"),
        ({"type": "content", "content": [{"type": "image_url", "image_url": {}}]}, "prediction"),
        ({"type": "content"}, "prediction.content"),
    ],
)
def test_a_malformed_prediction_is_a_400_naming_it(
    sidecar: SidecarThread, prediction: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        chat(sidecar, prediction=prediction)
    error = refused.value.body
    assert isinstance(error, dict) and error["param"].startswith(param), error


def test_a_prediction_over_the_prompt_limit_is_refused_and_the_server_keeps_serving(
    sidecar: SidecarThread,
) -> None:
    limit = sidecar.service.limits.max_prompt_tokens
    long = " river" * (limit + 10)
    with pytest.raises(openai.BadRequestError, match="prediction"):
        chat(sidecar, prediction={"type": "content", "content": long})
    request = pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=4, prediction=long)
    with pytest.raises(grpc.RpcError) as refused:
        list(sidecar.stub.Generate(request, timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prediction" in (refused.value.details() or "")
    assert chat(sidecar).choices[0].message.content
