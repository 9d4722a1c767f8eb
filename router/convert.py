"""Protobuf <-> domain conversions: the only place that knows both sides."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from router.domain import (
    DrafterSpec,
    GenerateInput,
    OutcomeInput,
    Prompt,
    RouteInput,
    Sampling,
    check_finite,
    check_forced_draft_length,
    check_forced_stop_threshold,
    check_logprobs,
    check_outcome,
    trace_context,
)
from router.errors import InvalidFieldError
from router.pb import router_pb2 as pb
from router.service import (
    ClassifierView,
    GenerationResult,
    PolicyView,
    PromptScores,
    RoutedRequest,
    TokenChunk,
)
from router.settings import Limits
from router.store import DrafterRecord
from router.structured_output import from_grpc

GREEDY = Sampling()  # an unset SamplingParams (immutable, shared)


def sampling_from_pb(message: pb.SamplingParams) -> Sampling:
    """Proto3 scalars cannot be unset, so 0 means the default (1.0) for temperature,
    top_p and typical_p; every other value is checked with the request
    (:func:`router.domain.check_sampling`)."""
    temperature, top_p, typical_p = message.temperature, message.top_p, message.typical_p
    return Sampling(
        do_sample=message.do_sample,
        temperature=temperature if temperature != 0 else 1.0,
        top_k=message.top_k,
        top_p=top_p if top_p != 0 else 1.0,
        seed=message.seed if message.HasField("seed") else None,
        stop=tuple(message.stop),
        typical_p=typical_p if typical_p != 0 else 1.0,
        ignore_eos=message.ignore_eos,
        stop_token_ids=tuple(message.stop_token_ids),
        repetition_penalty=(
            message.repetition_penalty if message.HasField("repetition_penalty") else 1.0
        ),
        presence_penalty=message.presence_penalty,
        frequency_penalty=message.frequency_penalty,
        min_tokens=message.min_tokens,
        logit_bias=tuple(sorted(message.logit_bias.items())),
        min_p=message.min_p,
        skip_special_tokens=(
            message.skip_special_tokens if message.HasField("skip_special_tokens") else True
        ),
        structured_output=(
            from_grpc(message.structured_output) if message.HasField("structured_output") else None
        ),
        allowed_token_ids=tuple(message.allowed_token_ids) or None,
        bad_words=tuple(message.bad_words),
    )


def prompt_from_pb(message: pb.RouteRequest | pb.GenerateRequest) -> Prompt:
    if message.WhichOneof("prompt") == "conversation":
        conversation = message.conversation
        turns = tuple({"role": m.role, "content": m.content} for m in conversation.messages)
        return Prompt(
            messages=turns,
            add_generation_prompt=(
                conversation.add_generation_prompt
                if conversation.HasField("add_generation_prompt")
                else not conversation.continue_final_message
            ),
            continue_final_message=conversation.continue_final_message,
        )
    return Prompt(text=message.text)


def route_from_pb(message: pb.RouteRequest | pb.GenerateRequest) -> RouteInput:
    return RouteInput(
        prompt=prompt_from_pb(message),
        request_id=message.request_id,
        task_hint=message.task_hint,
        max_new_tokens=message.max_new_tokens,
        # Most Route calls send no sampling parameters: skip building them (hot path).
        sampling=sampling_from_pb(message.sampling) if message.HasField("sampling") else GREEDY,
    )


def generate_from_pb(
    message: pb.GenerateRequest, metadata: Sequence[tuple[str, str | bytes]] | None = None
) -> GenerateInput:
    """The request, with the W3C trace context of the call's ``metadata`` (gRPC's
    ``traceparent`` and ``tracestate`` keys, as OpenTelemetry's gRPC instrumentation
    sends them), which a fleet replica is sent."""
    forced_k = message.force_draft_length if message.HasField("force_draft_length") else None
    forced_stop = message.force_stop_threshold if message.HasField("force_stop_threshold") else None
    keys = {key: value for key, value in metadata or () if isinstance(value, str)}
    return GenerateInput(
        trace=trace_context(keys.get("traceparent"), keys.get("tracestate")),
        route=route_from_pb(message),
        force_drafter=message.force_drafter,
        force_draft_length=check_forced_draft_length(forced_k),
        force_stop_threshold=check_forced_stop_threshold(forced_stop),
        no_update=message.no_update,
        logprobs=check_logprobs(
            message.logprobs if message.HasField("logprobs") else None, "logprobs"
        ),
        prompt_logprobs=check_logprobs(
            message.prompt_logprobs if message.HasField("prompt_logprobs") else None,
            "prompt_logprobs",
        ),
        prediction=message.prediction if message.HasField("prediction") else None,
    )


def outcome_from_pb(
    message: pb.RouteOutcome, limits: Limits, context_tokens: int | None = None
) -> OutcomeInput:
    """A checked outcome (:func:`router.domain.check_outcome`): a contradictory report is
    refused here, before it can touch the pending request or the policy."""
    return check_outcome(_outcome_from_pb(message), limits, context_tokens)


def _outcome_from_pb(message: pb.RouteOutcome) -> OutcomeInput:
    return OutcomeInput(
        request_id=message.request_id,
        steps=message.steps or len(message.accepted_per_step),
        drafted_per_step=tuple(message.drafted_per_step),
        accepted_per_step=tuple(message.accepted_per_step),
        drafted_tokens=message.drafted_tokens,
        accepted_tokens=message.accepted_tokens,
        accepted_per_position=tuple(message.accepted_per_position),
        draft_time_s=message.draft_time_s,
        verify_time_s=message.verify_time_s,
        wall_time_s=message.wall_time_s,
        generated_tokens=message.generated_tokens,
        # 0 means "not measured"; NaN is truthy, so it is kept and refused.
        plain_token_time_s=message.plain_token_time_s or None,
        draft_lead_steps=message.draft_lead_steps,
        draft_lead_time_s=message.draft_lead_time_s,
        draft_further_forwards=message.draft_further_forwards,
        draft_further_time_s=message.draft_further_time_s,
    )


def policy_config_from_pb(message: pb.SetPolicyRequest) -> dict[str, Any]:
    """config_json as a JSON object whose numbers are all finite: Python's parser takes
    NaN, Infinity and overflowing literals (1e999), which some policy settings would
    otherwise accept (a NaN similarity, an infinite prior)."""
    if not message.config_json:
        return {}
    try:
        value = json.loads(
            message.config_json,
            parse_constant=_refuse_non_finite,
            parse_float=lambda text: check_finite("config_json", float(text)),
        )
    except InvalidFieldError:
        raise
    except json.JSONDecodeError as exc:
        raise InvalidFieldError("config_json", f"is not valid JSON: {exc}") from exc
    except RecursionError:
        raise InvalidFieldError("config_json", "nests too deeply") from None
    except ValueError as exc:  # an integer of more than 4,300 digits (INTERNAL before)
        raise InvalidFieldError("config_json", f"is not usable JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidFieldError("config_json", "must be a JSON object")
    return value


def _refuse_non_finite(literal: str) -> float:
    raise InvalidFieldError("config_json", f"must hold finite numbers only, got {literal}")


def drafter_spec_from_pb(message: pb.RegisterDrafterRequest) -> DrafterSpec:
    return DrafterSpec.of(message)


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else 0.0


def decision_to_pb(routed: RoutedRequest) -> pb.RouteDecision:
    decision = routed.decision
    return pb.RouteDecision(
        request_id=routed.request_id,
        task_cluster=routed.task_cluster,
        confidence=routed.confidence,
        out_of_distribution=routed.out_of_distribution,
        drafter=decision.drafter,
        draft_length=decision.k,
        expected_speedup=_finite(decision.expected_speedup),
        explored=decision.explored,
        policy=routed.policy,
        policy_version=routed.policy_version,
        prompt_tokens=routed.prompt_tokens,
        length_bucket=routed.length_bucket,
        structured=bool(getattr(routed.context, "structured", False)),
        stop_threshold=decision.stop_threshold,
        replica=routed.replica,
    )


def chunk_to_pb(chunk: TokenChunk) -> pb.GenerateChunk:
    tokens = [
        pb.Token(id=token_id, text=text, special=special)
        for token_id, text, special in zip(
            chunk.token_ids, chunk.token_texts, chunk.special, strict=True
        )
    ]
    for token, scored in zip(tokens, chunk.logprobs or (), strict=False):
        token.logprob = scored.logprob
        token.top_logprobs.extend(
            pb.TopLogprob(id=a.token_id, text=a.text, logprob=a.logprob) for a in scored.top
        )
    return pb.GenerateChunk(tokens=tokens, text="".join(chunk.token_texts))


def prompt_scores_to_pb(scores: PromptScores) -> pb.GenerateChunk:
    """The prompt's tokens, those after the first with their log-probabilities."""
    tokens = [
        pb.Token(id=token_id, text=text, special=special)
        for token_id, text, special in zip(
            scores.token_ids, scores.texts, scores.special, strict=True
        )
    ]
    for token, scored in zip(tokens[1:], scores.logprobs, strict=True):
        token.logprob = scored.logprob
        token.top_logprobs.extend(
            pb.TopLogprob(id=a.token_id, text=a.text, logprob=a.logprob) for a in scored.top
        )
    return pb.GenerateChunk(prompt_tokens=tokens)


def stats_to_pb(result: GenerationResult) -> pb.GenerationStats:
    stats = result.stats
    return pb.GenerationStats(
        generated_tokens=stats.generated_tokens,
        steps=stats.steps,
        drafted_tokens=stats.drafted,
        accepted_tokens=stats.accepted,
        drafted_per_step=list(stats.drafted_per_step),
        accepted_per_step=list(stats.accepted_per_step),
        accepted_per_position=list(stats.accepted_per_position),
        draft_time_s=stats.draft_time_s,
        verify_time_s=stats.verify_time_s,
        wall_time_s=stats.wall_time_s,
        tokens_per_s=_finite(stats.tokens_per_s),
        mean_accepted_length=_finite(stats.mean_accepted_length),
        finish_reason=str(stats.finish_reason),
        generated_text=result.generated_text,
        prompt_tokens=stats.prompt_tokens,
        stopped_steps=stats.stopped_steps,
        draft_lead_steps=stats.lead_steps,
        draft_lead_time_s=stats.lead_time_s,
        draft_further_forwards=stats.further_forwards,
        draft_further_time_s=stats.further_time_s,
        accepted_prediction_tokens=result.prediction.accepted if result.prediction else 0,
        rejected_prediction_tokens=result.prediction.rejected if result.prediction else 0,
    )


def generation_item_to_pb(item: Any, announced: RoutedRequest | None = None) -> pb.GenerateChunk:
    """One streamed item of RouterService.generate as a GenerateChunk. The last one (the
    result) carries the decision again when the request finished under another than the
    ``announced`` one (fleet mode: its replica failed and another went on)."""
    if isinstance(item, RoutedRequest):
        return pb.GenerateChunk(decision=decision_to_pb(item))
    if isinstance(item, TokenChunk):
        return chunk_to_pb(item)
    if isinstance(item, PromptScores):
        return prompt_scores_to_pb(item)
    last = pb.GenerateChunk(stats=stats_to_pb(item))
    if announced is not None and _served_by(item.routed) != _served_by(announced):
        last.decision.CopyFrom(decision_to_pb(item.routed))
    return last


def _served_by(routed: RoutedRequest) -> tuple[str, str, int]:
    return routed.replica, routed.decision.drafter, routed.decision.k


def drafter_to_pb(record: DrafterRecord) -> pb.DrafterInfo:
    return pb.DrafterInfo(
        name=record.name,
        kind=record.kind,
        path=record.path,
        tasks=list(record.tasks),
        parameter_count=record.parameter_count,
        weights_digest=record.weights_digest,
        created_unix=record.created_unix,
        builtin=record.builtin,
        finetune_sample_size=len(record.finetune_sample),
        options=dict(record.options),
    )


def classifier_to_pb(view: ClassifierView) -> pb.ClassifierInfo:
    return pb.ClassifierInfo(
        path=view.path,
        version=view.version,
        labels=list(view.labels),
        training_data_hash=view.training_data_hash,
        created_unix=view.created_unix,
    )


def _arm_to_pb(arm: Any) -> pb.ArmState:
    return pb.ArmState(
        drafter=str(getattr(arm, "drafter", "")),
        acceptance_mean=_finite(getattr(arm, "acceptance_mean", 0.0)),
        alpha=_finite(getattr(arm, "alpha", 0.0)),
        beta=_finite(getattr(arm, "beta", 0.0)),
        best_k=int(getattr(arm, "best_k", 0)),
        expected_speedup=_finite(getattr(arm, "expected_speedup", 0.0)),
        decisions=int(getattr(arm, "decisions", 0)),
    )


def _context_to_pb(summary: Any) -> pb.ContextState:
    return pb.ContextState(
        task_cluster=str(getattr(summary, "task_cluster", getattr(summary, "cluster", ""))),
        length_bucket=int(getattr(summary, "length_bucket", 0)),
        arms=[_arm_to_pb(arm) for arm in getattr(summary, "arms", ())],
        chosen_drafter=str(getattr(summary, "chosen_drafter", "")),
        chosen_k=int(getattr(summary, "chosen_k", 0)),
        requests=int(getattr(summary, "requests", 0)),
        structured=bool(getattr(summary, "structured", False)),
    )


def policy_to_pb(view: PolicyView) -> pb.PolicyState:
    return pb.PolicyState(
        policy=view.policy,
        version=view.version,
        contexts=[_context_to_pb(summary) for summary in view.contexts],
    )
