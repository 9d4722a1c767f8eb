"""Bad input: each refused with its status code while the server keeps serving."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from router.domain import MAX_STOP_SEQUENCES, MAX_STOP_TOKEN_IDS
from router.pb import router_pb2 as pb
from router.policy.base import MAX_DRAFT_LENGTH
from tests.router.conftest import (
    ADMIN,
    COMPLETION_PROMPT,
    MAX_NEW_TOKENS,
    ServingWorld,
    SidecarThread,
    counterfactuals_settled,
    greedy_reference,
)

PROMPT = "def add(a, b):\n    return"
LONG_PROMPT = "word " * 600  # over the limit of 512 tokens
NAN, INF = math.nan, math.inf

Call = Callable[[SidecarThread, ServingWorld], object]


def _generate(**fields: object) -> Call:
    def call(sidecar: SidecarThread, world: ServingWorld) -> object:
        return list(sidecar.stub.Generate(pb.GenerateRequest(**fields), timeout=60))

    return call


def _route(**fields: object) -> Call:
    return lambda sidecar, world: sidecar.stub.Route(pb.RouteRequest(**fields))


def _register(
    kind: str,
    path_of: Callable[[ServingWorld], str],
    name: str = "new",
    options: dict[str, str] | None = None,
    tasks: Sequence[str] = (),
    finetune_sample: Sequence[str] = (),
) -> Call:
    def call(sidecar: SidecarThread, world: ServingWorld) -> object:
        request = pb.RegisterDrafterRequest(
            name=name,
            kind=kind,
            path=path_of(world),
            options=options or {},
            tasks=tasks,
            finetune_sample=finetune_sample,
        )
        return sidecar.stub.RegisterDrafter(request, metadata=ADMIN)

    return call


def _symlink_loop(root: Path) -> Path:
    """Two links in a folder of their own under ``root``, pointing at each other; the
    first of them."""
    (root / "loop").mkdir(exist_ok=True)
    first, second = root / "loop" / "a", root / "loop" / "b"
    for link, target in ((first, second), (second, first)):
        if not link.is_symlink():
            link.symlink_to(target)
    return first


def _with_corrupt_tokenizer(model: Path, root: Path) -> Path:
    """A copy of ``model`` under ``root`` whose tokenizer.json is not JSON."""
    copy = root / "corrupt-tokenizer"
    if not copy.exists():
        shutil.copytree(model, copy)
        (copy / "tokenizer.json").write_text("garbage{")
    return copy


def _with_nan_weights(model: Path, root: Path) -> Path:
    """A copy of ``model`` under ``root`` one of whose weights is NaN."""
    from safetensors.torch import load_file, save_file

    copy = root / "nan-weights"
    if not copy.exists():
        shutil.copytree(model, copy)
        tensors = load_file(copy / "model.safetensors")
        name = next(n for n, t in tensors.items() if t.is_floating_point())
        tensors[name].view(-1)[0] = float("nan")
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


BLANK_MESSAGES = pb.Conversation(
    messages=[pb.ChatMessage(role="user")] * 20_000 + [pb.ChatMessage(role="user", content="hi")]
)

CASES: dict[str, tuple[Call, grpc.StatusCode, str]] = {
    "empty prompt": (_route(text="  "), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    # A request id is kept until its Report, logged, and sent on as a replica's header
    # (where a newline was an INTERNAL error from the HTTP client).
    "request id with a newline": (
        _generate(request_id="a\nb", text=PROMPT, max_new_tokens=2),
        grpc.StatusCode.INVALID_ARGUMENT,
        "request_id: only printable ASCII",
    ),
    "request id of 129 characters": (
        _route(request_id="x" * 129, text=PROMPT),
        grpc.StatusCode.INVALID_ARGUMENT,
        "request_id: 129 characters, over 128",
    ),
    # Tokenized in full before: a 1 MB prompt held every other Route for ~0.3 s.
    "a prompt longer than the token limit can spell": (
        _route(text="word " * 100_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tokens can spell",
    ),
    "a chat prompt longer than the token limit can spell": (
        _generate(
            conversation=pb.Conversation(
                messages=[pb.ChatMessage(role="user", content="word " * 100_000)]
            ),
            max_new_tokens=4,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tokens can spell",
    ),
    # Blank messages were not counted: 20,000 of them were rendered and tokenized on the
    # event loop (about a second, every other call waiting) before the token count.
    "a chat prompt of more blank messages than the token limit holds": (
        _generate(conversation=BLANK_MESSAGES, max_new_tokens=4),
        grpc.StatusCode.INVALID_ARGUMENT,
        "20001 chat messages, more than",
    ),
    "a routed chat prompt of more blank messages than the token limit holds": (
        _route(conversation=BLANK_MESSAGES),
        grpc.StatusCode.INVALID_ARGUMENT,
        "20001 chat messages, more than",
    ),
    # A misspelt option was ignored without a word (the drafter ran with the default).
    # Path.resolve raised ValueError("embedded null byte"): UNKNOWN.
    "a model path holding a NUL character": (
        _register("model", lambda w: str(w.spare_dir) + "\x00"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "holds a NUL character",
    ),
    # Path.resolve raised RuntimeError("Symlink loop ..."): UNKNOWN.
    "a model path that is a symlink loop": (
        _register("model", lambda w: str(_symlink_loop(w.extra_root))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "cannot be resolved",
    ),
    # The tokenizers library's bare Exception: UNKNOWN.
    "a model whose tokenizer.json is not JSON": (
        _register("model", lambda w: str(_with_corrupt_tokenizer(w.spare_dir, w.extra_root))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "cannot load a tokenizer",
    ),
    # Registered, it failed every sampled request it drafted for (INTERNAL).
    "a model whose weights hold NaN": (
        _register("model", lambda w: str(_with_nan_weights(w.spare_dir, w.extra_root))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "holds NaN or infinite values",
    ),
    "an n-gram drafter whose min_n is above its max_n": (
        _register("ngram", lambda w: "", options={"min_n": "4", "max_n": "2"}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "need 1 <= min_n <= max_n <= 64, got 4, 2",
    ),
    # Accepted: a lookup keyed on n-grams up to a million tokens long made every step
    # cost more than its drafts saved (found by an operator's registration).
    "an n-gram drafter whose max_n is unbounded": (
        _register("ngram", lambda w: "", options={"max_n": "1000000"}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "need 1 <= min_n <= max_n <= 64, got 2, 1000000",
    ),
    # It was called a model drafter, the kind it is not.
    "a copy-or-model drafter without a path": (
        _register("copy-or-model", lambda w: ""),
        grpc.StatusCode.INVALID_ARGUMENT,
        "path: is needed for a copy-or-model drafter (its model directory)",
    ),
    "a drafter option its kind does not read": (
        _register("ngram", lambda w: "", options={"maxn": "4"}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "has no option 'maxn' (it reads: max_n, min_n)",
    ),
    # Accepted and the path dropped without a word before (found by fuzzing the API).
    "a path for a kind that loads no model": (
        _register("ngram", lambda w: str(w.spare_dir)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "path: a ngram drafter loads no model directory",
    ),
    "a drafter option that is not a number": (
        _register("ngram", lambda w: "", options={"max_n": "four"}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "option 'max_n' must be an integer, got 'four'",
    ),
    # Accepted, and then dropped as malformed by every pooled replica (a registration is
    # one Redis entry of at most 1 MiB, of at most 256 tasks): never registered there.
    "a registration of more sample texts than a drafter keeps": (
        _register("ngram", lambda w: "", finetune_sample=["a prompt"] * 65),
        grpc.StatusCode.INVALID_ARGUMENT,
        "finetune_sample: at most 64 texts, got 65",
    ),
    "a registration whose sample is too large to share": (
        _register("ngram", lambda w: "", finetune_sample=["x" * 20_000] * 30),
        grpc.StatusCode.INVALID_ARGUMENT,
        "finetune_sample: at most 512 KiB in all (as JSON), got 586 KiB",
    ),
    "a registration of more tasks than a pooled entry carries": (
        _register("ngram", lambda w: "", tasks=[f"t{i}" for i in range(257)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tasks: at most 256, got 257",
    ),
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
    # Each is searched for after every step: 10,000 cost about 3 ms a step.
    "more stop sequences than the limit": (
        _generate(
            text=PROMPT,
            max_new_tokens=4,
            sampling=pb.SamplingParams(stop=[f"stop {i}" for i in range(MAX_STOP_SEQUENCES + 1)]),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.stop: at most",
    ),
    "more stop token ids than the limit": (
        _generate(
            text=PROMPT,
            max_new_tokens=4,
            sampling=pb.SamplingParams(stop_token_ids=range(MAX_STOP_TOKEN_IDS + 1)),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.stop_token_ids: at most",
    ),
    "repetition penalty 0": (
        _generate(text=PROMPT, max_new_tokens=4, sampling=pb.SamplingParams(repetition_penalty=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.repetition_penalty: must be > 0",
    ),
    "presence penalty over 2": (
        _generate(text=PROMPT, max_new_tokens=4, sampling=pb.SamplingParams(presence_penalty=3)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.presence_penalty: must be in [-2, 2]",
    ),
    # An id past every vocabulary overflowed in the engine (a 500; found by test_fuzz).
    "a stop token id outside the vocabulary": (
        _generate(
            text=PROMPT, max_new_tokens=4, sampling=pb.SamplingParams(stop_token_ids=[2**32 - 1])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.stop_token_ids: token id 4294967295 is not in the vocabulary",
    ),
    "a logit bias over 100": (
        _generate(text=PROMPT, max_new_tokens=4, sampling=pb.SamplingParams(logit_bias={5: 200})),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.logit_bias: token ids must be >= 0 and biases in [-100, 100]",
    ),
    "min_tokens over max_new_tokens": (
        _generate(text=PROMPT, max_new_tokens=4, sampling=pb.SamplingParams(min_tokens=5)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.min_tokens: must be at most max_new_tokens",
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
    # Without the check, a NaN temperature failed inside the engine with INTERNAL
    # ("probability tensor contains either inf, nan or element < 0").
    "NaN temperature on a sampled Generate": (
        _generate(
            text=COMPLETION_PROMPT,
            max_new_tokens=4,
            sampling=pb.SamplingParams(do_sample=True, temperature=NAN, seed=1),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.temperature",
    ),
    "infinite temperature on a sampled Generate": (
        _generate(
            text=COMPLETION_PROMPT,
            max_new_tokens=4,
            sampling=pb.SamplingParams(do_sample=True, temperature=INF, seed=1),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.temperature",
    ),
    "NaN temperature on a Route": (
        _route(text=PROMPT, sampling=pb.SamplingParams(temperature=NAN)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.temperature",
    ),
    "NaN top_p on a Route": (
        _route(text=PROMPT, sampling=pb.SamplingParams(do_sample=True, top_p=NAN)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.top_p",
    ),
    "NaN top_p on a sampled Generate": (
        _generate(
            text=COMPLETION_PROMPT,
            max_new_tokens=4,
            sampling=pb.SamplingParams(do_sample=True, top_p=NAN, seed=1),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.top_p",
    ),
    "infinite top_p on a Generate": (
        _generate(text=PROMPT, max_new_tokens=4, sampling=pb.SamplingParams(top_p=-INF)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.top_p",
    ),
    "typical_p above 1": (
        _route(text=PROMPT, sampling=pb.SamplingParams(do_sample=True, typical_p=1.5)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.typical_p",
    ),
    "NaN typical_p on a sampled Generate": (
        _generate(
            text=COMPLETION_PROMPT,
            max_new_tokens=4,
            sampling=pb.SamplingParams(do_sample=True, typical_p=NAN, seed=1),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.typical_p",
    ),
    "force_draft_length far above the largest k": (
        _generate(
            text=COMPLETION_PROMPT,
            max_new_tokens=8,
            force_drafter="generic",
            force_draft_length=1000,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"force_draft_length: must be at most {MAX_DRAFT_LENGTH}",
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
    # Errors that echo a long value: the message went over the client's metadata limit,
    # which the client reported as RESOURCE_EXHAUSTED.
    "a 20,000-character task hint": (
        _route(text=PROMPT, task_hint="x" * 20_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "more bytes)",
    ),
    "a 20,000-character chat role": (
        _route(
            conversation=pb.Conversation(
                messages=[pb.ChatMessage(role="\u00e9" * 20_000, content="hi")]
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "role",
    ),
    "a 20,000-character drafter name": (
        _generate(text=PROMPT, max_new_tokens=4, force_drafter="y" * 20_000),
        grpc.StatusCode.NOT_FOUND,
        "no drafter",
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
    # Accepted before (an infinite prior, a NaN similarity): JSON as Python parses it.
    "infinite number in the policy config": (
        lambda sidecar, world: sidecar.stub.SetPolicy(
            pb.SetPolicyRequest(policy="thompson", config_json='{"prior_alpha": Infinity}'),
            metadata=ADMIN,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "config_json: must hold finite numbers only",
    ),
    "NaN in the policy config": (
        lambda sidecar, world: sidecar.stub.SetPolicy(
            pb.SetPolicyRequest(
                policy="thompson", config_json='{"similarity": {"generic": {"math": NaN}}}'
            ),
            metadata=ADMIN,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "config_json: must hold finite numbers only",
    ),
    # Python's JSON parser refuses integers past 4,300 digits with a plain ValueError.
    "an integer of 5,000 digits in the policy config": (
        lambda sidecar, world: sidecar.stub.SetPolicy(
            pb.SetPolicyRequest(policy="thompson", config_json='{"seed": ' + "9" * 5000 + "}"),
            metadata=ADMIN,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "config_json: is not usable JSON",
    ),
    # "$" matched before a final newline: a look-alike of a served drafter was stored.
    "a drafter name ending in a newline": (
        _register("model", lambda w: str(w.spare_dir), name="spare\n"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "drafter name",
    ),
    # pydantic's six-line report with its type codes and a link, before.
    "misspelt key in the policy config": (
        lambda sidecar, world: sidecar.stub.SetPolicy(
            pb.SetPolicyRequest(policy="thompson", config_json='{"gama": 0.99}'),
            metadata=ADMIN,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad configuration for policy 'thompson': gama: Extra inputs are not permitted (got 0.99)",
    ),
    "overflowing number in the policy config": (
        lambda sidecar, world: sidecar.stub.SetPolicy(
            pb.SetPolicyRequest(policy="thompson", config_json='{"evidence_cap": 1e999}'),
            metadata=ADMIN,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "config_json: must be a finite number",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_and_the_server_keeps_serving(
    sidecar: SidecarThread, serving_world: ServingWorld, case: str
) -> None:
    call, code, fragment = CASES[case]
    drafters_before = {d.name for d in sidecar.stub.ListDrafters(pb.ListDraftersRequest()).drafters}
    counterfactuals_settled(sidecar)
    policy_before = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest())
    with pytest.raises(grpc.RpcError) as refused:
        call(sidecar, serving_world)
    assert refused.value.code() == code, refused.value.details()
    assert fragment.lower() in (refused.value.details() or "").lower()
    # Nothing changed, and the server still serves.
    drafters_after = {d.name for d in sidecar.stub.ListDrafters(pb.ListDraftersRequest()).drafters}
    assert drafters_after == drafters_before
    assert sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest()).version == policy_before.version
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


# Reports whose numbers contradict each other (or are not numbers): field -> (outcome
# fields besides request_id, the field the refusal must name). Each was accepted and
# silently clamped or passed to the policy before the check.
GOOD_TIMES: dict[str, Any] = {"draft_time_s": 0.01, "verify_time_s": 0.04}
BAD_REPORTS: dict[str, tuple[dict[str, Any], str]] = {
    "totals: more accepted than drafted": (
        {"steps": 4, "drafted_tokens": 8, "accepted_tokens": 9, **GOOD_TIMES},
        "accepted_tokens",
    ),
    "totals: a position accepted in more steps than there were": (
        {
            "steps": 2,
            "drafted_tokens": 8,
            "accepted_tokens": 5,
            "accepted_per_position": [3, 2],
            **GOOD_TIMES,
        },
        "accepted_per_position[0]",
    ),
    "totals: a later position accepted more often than an earlier one": (
        {
            "steps": 4,
            "drafted_tokens": 12,
            "accepted_tokens": 5,
            "accepted_per_position": [1, 3, 1],
            **GOOD_TIMES,
        },
        "accepted_per_position[1]",
    ),
    "totals: positions that do not sum to the accepted total": (
        {
            "steps": 4,
            "drafted_tokens": 12,
            "accepted_tokens": 9,
            "accepted_per_position": [3, 2, 0],
            **GOOD_TIMES,
        },
        "accepted_per_position",
    ),
    "totals: tokens drafted in no steps": (
        {"steps": 0, "drafted_tokens": 8, "accepted_tokens": 2, **GOOD_TIMES},
        "steps",
    ),
    "totals: more steps than a request may have tokens": (
        {"steps": MAX_NEW_TOKENS + 1, "generated_tokens": MAX_NEW_TOKENS + 1, **GOOD_TIMES},
        "steps",
    ),
    # Expanded into one draft per step of drafted / steps tokens: a MemoryError (UNKNOWN).
    "totals: more drafted per step than any draft length": (
        {"steps": 2, "drafted_tokens": 2**63, "accepted_tokens": 2, **GOOD_TIMES},
        "drafted_tokens",
    ),
    "per step: more drafted than any draft length": (
        {"drafted_per_step": [2, 2**32 - 1], "accepted_per_step": [1, 3], **GOOD_TIMES},
        "drafted_per_step[1]",
    ),
    "per step: more accepted than drafted": (
        {"drafted_per_step": [2, 2], "accepted_per_step": [1, 3], **GOOD_TIMES},
        "accepted_per_step[1]",
    ),
    # Taken beside the lists without a word (the lists are what the policy reads).
    "per step: a drafted total the lists do not add up to": (
        {"drafted_per_step": [2], "accepted_per_step": [1], "drafted_tokens": 5, **GOOD_TIMES},
        "drafted_tokens",
    ),
    "per step: an accepted total the lists do not add up to": (
        {"drafted_per_step": [2], "accepted_per_step": [1], "accepted_tokens": 9, **GOOD_TIMES},
        "accepted_tokens",
    ),
    "per step: positions the lists do not give": (
        {
            "drafted_per_step": [2],
            "accepted_per_step": [1],
            "accepted_per_position": [5, 4, 3],
            **GOOD_TIMES,
        },
        "accepted_per_position",
    ),
    # Read as drafts of the decision's k (at most 8 here): refused without a field before.
    "per step: accepts alone, more than the decision drafts": (
        {"accepted_per_step": [40], **GOOD_TIMES},
        "accepted_per_step[0]",
    ),
    "per step: steps that disagree with the lists": (
        {"steps": 5, "drafted_per_step": [2, 2], "accepted_per_step": [1, 2], **GOOD_TIMES},
        "steps",
    ),
    "NaN draft time": (
        {"drafted_per_step": [2], "accepted_per_step": [1], "draft_time_s": NAN},
        "draft_time_s",
    ),
    "infinite verify time": (
        {"drafted_per_step": [2], "accepted_per_step": [1], "verify_time_s": INF},
        "verify_time_s",
    ),
    "NaN wall time": (
        {"drafted_per_step": [2], "accepted_per_step": [1], "wall_time_s": NAN, **GOOD_TIMES},
        "wall_time_s",
    ),
    "NaN plain token time": (
        {
            "drafted_per_step": [2],
            "accepted_per_step": [1],
            "plain_token_time_s": NAN,
            **GOOD_TIMES,
        },
        "plain_token_time_s",
    ),
    "negative draft time": (
        {"drafted_per_step": [2], "accepted_per_step": [1], "draft_time_s": -0.5},
        "draft_time_s",
    ),
    # Taken as is: UCB's reward is generated tokens over time spent.
    "more tokens generated than the target's context holds": (
        {"generated_tokens": 2**32 - 1, **GOOD_TIMES},
        "generated_tokens",
    ),
    "more tokens generated than the steps can emit": (
        {"drafted_per_step": [2], "accepted_per_step": [1], "generated_tokens": 50, **GOOD_TIMES},
        "generated_tokens",
    ),
    "more draft leads than steps": (
        {"drafted_per_step": [2], "accepted_per_step": [1], "draft_lead_steps": 2, **GOOD_TIMES},
        "draft_lead_steps",
    ),
    "lead and further forwards longer than the draft": (
        {
            "drafted_per_step": [2],
            "accepted_per_step": [1],
            "draft_lead_time_s": GOOD_TIMES["draft_time_s"],
            "draft_further_time_s": GOOD_TIMES["draft_time_s"],
            **GOOD_TIMES,
        },
        "draft_lead_time_s",
    ),
    "NaN lead time": (
        {"drafted_per_step": [2], "accepted_per_step": [1], "draft_lead_time_s": NAN, **GOOD_TIMES},
        "draft_lead_time_s",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REPORTS))
def test_a_contradictory_report_is_invalid_and_never_reaches_the_policy(
    sidecar: SidecarThread, case: str
) -> None:
    fields, named = BAD_REPORTS[case]
    decision = sidecar.stub.Route(pb.RouteRequest(text=PROMPT, task_hint="code"))
    state_before = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest())
    with pytest.raises(grpc.RpcError) as refused:
        sidecar.stub.Report(pb.RouteOutcome(request_id=decision.request_id, **fields))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert (refused.value.details() or "").startswith(f"{named}: ")
    # The policy saw nothing: same version, same state in every context.
    assert sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest()) == state_before
    # The routed request is still pending: a consistent report for it is accepted.
    good = pb.RouteOutcome(
        request_id=decision.request_id,
        steps=4,
        drafted_tokens=12,
        accepted_tokens=5,
        accepted_per_position=[3, 2, 0],
        **GOOD_TIMES,
    )
    assert sidecar.stub.Report(good).policy_version == state_before.version + 1


def test_a_report_of_more_tokens_than_the_generate_limit_is_learnt_from(
    sidecar: SidecarThread,
) -> None:
    """A Route may leave the budget unknown, and the serving stack generate more than the
    sidecar's own max_new_tokens (200 here): such a Report was refused, its learning lost."""
    decision = sidecar.stub.Route(pb.RouteRequest(text=PROMPT, task_hint="code"))
    before = sidecar.stub.GetPolicyState(pb.GetPolicyStateRequest()).version
    report = pb.RouteOutcome(
        request_id=decision.request_id,
        drafted_per_step=[4] * 100,
        accepted_per_step=[3] * 100,
        generated_tokens=MAX_NEW_TOKENS + 200,
        **GOOD_TIMES,
    )
    assert sidecar.stub.Report(report).policy_version == before + 1


def test_the_largest_forced_draft_length_is_the_one_the_engine_uses(
    sidecar: SidecarThread,
) -> None:
    """force_draft_length up to MAX_DRAFT_LENGTH is served as asked: the decision echoes
    the k the engine drafted with (anything larger is refused, see CASES)."""
    chunks = list(
        sidecar.stub.Generate(
            pb.GenerateRequest(
                text=COMPLETION_PROMPT,
                max_new_tokens=MAX_DRAFT_LENGTH + 2,  # room for one full step
                force_drafter="generic",
                force_draft_length=MAX_DRAFT_LENGTH,
                no_update=True,
            ),
            timeout=120,
        )
    )
    assert chunks[0].decision.draft_length == MAX_DRAFT_LENGTH
    assert chunks[-1].stats.drafted_per_step[0] == MAX_DRAFT_LENGTH


def test_a_tiny_temperature_samples_the_greedy_output(sidecar: SidecarThread) -> None:
    """The smallest positive float32 temperature is a valid, near-greedy request: it used
    to overflow the scaled logits to inf and fail inside the engine with INTERNAL."""
    expected_ids, _ = greedy_reference(sidecar, COMPLETION_PROMPT, 8)
    request = pb.GenerateRequest(
        text=COMPLETION_PROMPT,
        max_new_tokens=8,
        force_drafter="none",
        sampling=pb.SamplingParams(do_sample=True, temperature=1e-45, seed=3),
        no_update=True,
    )
    chunks = list(sidecar.stub.Generate(request, timeout=120))
    assert [token.id for chunk in chunks for token in chunk.tokens] == expected_ids


def _sampled_ids(sidecar: SidecarThread, top_p: float) -> list[int]:
    request = pb.GenerateRequest(
        text=COMPLETION_PROMPT,
        max_new_tokens=12,
        force_drafter="none",
        force_draft_length=0,
        sampling=pb.SamplingParams(do_sample=True, temperature=1.5, top_p=top_p, seed=11),
        no_update=True,
    )
    chunks = sidecar.stub.Generate(request, timeout=120)
    return [token.id for chunk in chunks for token in chunk.tokens]


def test_messages_the_chat_template_refuses_fail_their_own_slot(sidecar: SidecarThread) -> None:
    """A target whose template raises (Gemma: "System role not supported") made one Route
    with a system message fail its whole coalesced batch with INTERNAL, and a Generate
    with INTERNAL: now INVALID_ARGUMENT for that request, and the others are routed."""
    tokenizer = sidecar.service.tokenizer
    template = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['content'] }}\n{% endfor %}"
    )
    system = pb.Conversation(
        messages=[
            pb.ChatMessage(role="system", content="Be brief."),
            pb.ChatMessage(role="user", content="What is 2 + 2?"),
        ]
    )
    user = pb.Conversation(messages=[pb.ChatMessage(role="user", content="What is 2 + 2?")])
    try:
        calls = [
            sidecar.stub.Route.future(pb.RouteRequest(conversation=c), timeout=30)
            for c in (system, user, system, user)
        ]
        for n, call in enumerate(calls):
            if n % 2:
                assert call.result().task_cluster
                continue
            with pytest.raises(grpc.RpcError) as refused:
                call.result()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "System role not supported" in (refused.value.details() or "")
        with pytest.raises(grpc.RpcError) as refused:
            list(sidecar.stub.Generate(pb.GenerateRequest(conversation=system, max_new_tokens=2)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        tokenizer.chat_template = template


def test_top_p_zero_means_off_on_the_wire(sidecar: SidecarThread) -> None:
    """Proto3 cannot tell an unset top_p from 0, so 0 means 1.0 (off): the same seeded
    sample as top_p 1; a top_p that cuts the tail samples differently."""
    off = _sampled_ids(sidecar, 1.0)
    assert len(off) == 12
    assert _sampled_ids(sidecar, 0.0) == off
    assert _sampled_ids(sidecar, 0.05) != off


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
