"""A thin synchronous gRPC client for replays: trace records in, ``RequestResult`` out.

Protobuf stops here: the rest of the replay package sees only trace records and results.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from benchmarks.replay.builtin import STRUCTURED_SUFFIX
from benchmarks.replay.metrics import RequestResult
from benchmarks.replay.trace import TraceRequest
from router.channel import ClientTls, sidecar_channel
from router.pb import router_pb2, router_pb2_grpc

# Long replays stream many tokens; give each call generous room.
logger = logging.getLogger(__name__)

GENERATE_TIMEOUT_S = 600.0
ADMIN_TIMEOUT_S = 120.0
READY_NOTICE_S = 1.0  # a sidecar not ready by then is said to be awaited


@dataclass(frozen=True)
class ArmPin:
    """Force one (drafter, k) arm for a request instead of letting the policy choose."""

    drafter: str
    draft_length: int


@dataclass(frozen=True)
class DrafterEntry:
    """A drafter the sidecar serves (from ListDrafters)."""

    name: str
    kind: str
    path: str
    tasks: tuple[str, ...]
    builtin: bool


class RequestRefusedError(grpc.RpcError):
    """A sidecar's refusal of one trace request, named: its status stays the sidecar's,
    its details lead with the request's id and task (a replay stopped on "the prompt has
    1190 tokens, over the limit of 1024" without saying which of its requests)."""

    def __init__(self, request: TraceRequest, error: grpc.RpcError) -> None:
        super().__init__()
        self._code = error.code()  # type: ignore[attr-defined]
        task = f" (task {request.task})" if request.task else ""
        self._details = f"trace request {request.id!r}{task}: {error.details()}"  # type: ignore[attr-defined]

    def code(self) -> grpc.StatusCode:
        return self._code  # type: ignore[no-any-return]

    def details(self) -> str:
        return self._details

    def __str__(self) -> str:
        return f"{self._code.name}: {self._details}"


class ReplayClient:
    """Replays requests and switches policies on a running sidecar."""

    def __init__(
        self, address: str, admin_token: str | None = None, tls: ClientTls | None = None
    ) -> None:
        """``tls``: what to trust of a TLS sidecar (None: plaintext)."""
        self.address = address
        self._channel = sidecar_channel(
            address,
            tls,
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {admin_token}"),) if admin_token else ()
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ReplayClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the channel connects (raises ``grpc.FutureTimeoutError``); a
        sidecar not there at once is said to be awaited (nothing was said for the whole
        wait, a minute at an address with nothing listening)."""
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=min(READY_NOTICE_S, timeout_s))
            return
        except grpc.FutureTimeoutError:
            if timeout_s <= READY_NOTICE_S:
                raise
        logger.info("waiting up to %.0f s for the sidecar at %s", timeout_s, self.address)
        ready.result(timeout=timeout_s - READY_NOTICE_S)

    def set_policy(
        self, policy: str, config: Mapping[str, Any] | None = None, *, reset_state: bool = False
    ) -> int:
        """Switch the serving policy; returns its version (restored state keeps counting)."""
        reply = self._stub.SetPolicy(
            router_pb2.SetPolicyRequest(
                policy=policy, config_json=json.dumps(dict(config or {})), reset_state=reset_state
            ),
            metadata=self._metadata,
            timeout=ADMIN_TIMEOUT_S,
        )
        return int(reply.version)

    def policy_state(self) -> Any:
        """The raw ``PolicyState`` message (contexts with their chosen arm)."""
        return self._stub.GetPolicyState(
            router_pb2.GetPolicyStateRequest(), metadata=self._metadata, timeout=ADMIN_TIMEOUT_S
        )

    def list_drafters(self) -> list[DrafterEntry]:
        reply = self._stub.ListDrafters(
            router_pb2.ListDraftersRequest(), metadata=self._metadata, timeout=ADMIN_TIMEOUT_S
        )
        return [
            DrafterEntry(d.name, d.kind, d.path, tuple(d.tasks), d.builtin) for d in reply.drafters
        ]

    def register_drafter(
        self,
        name: str,
        kind: str,
        path: str,
        tasks: Sequence[str] = (),
        finetune_sample: Sequence[str] = (),
    ) -> None:
        self._stub.RegisterDrafter(
            router_pb2.RegisterDrafterRequest(
                name=name,
                kind=kind,
                path=path,
                tasks=list(tasks),
                finetune_sample=list(finetune_sample),
            ),
            metadata=self._metadata,
            timeout=ADMIN_TIMEOUT_S,
        )

    def remove_drafter(self, name: str) -> None:
        self._stub.RemoveDrafter(
            router_pb2.RemoveDrafterRequest(name=name),
            metadata=self._metadata,
            timeout=ADMIN_TIMEOUT_S,
        )

    def generate(
        self,
        request: TraceRequest,
        *,
        index: int = 0,
        pin: ArmPin | None = None,
        no_update: bool = False,
        task_hint: bool = False,
    ) -> RequestResult:
        """Stream one Generate call to its end and summarise it."""
        chunks = self._stub.Generate(
            generate_request(request, pin=pin, no_update=no_update, task_hint=task_hint),
            metadata=self._metadata,
            timeout=GENERATE_TIMEOUT_S,
        )
        decision: Any = None
        stats: Any = None
        output_ids: list[int] = []
        try:
            for chunk in chunks:
                if chunk.HasField("decision"):
                    decision = chunk.decision
                output_ids.extend(token.id for token in chunk.tokens)
                if chunk.HasField("stats"):
                    stats = chunk.stats
        except grpc.RpcError as error:
            raise RequestRefusedError(request, error) from error
        if decision is None or stats is None:
            raise RuntimeError(f"request {request.id}: the stream lacked its decision or stats")
        return result_from_stream(request, index, decision, stats, tuple(output_ids))


def generate_request(
    request: TraceRequest, *, pin: ArmPin | None, no_update: bool, task_hint: bool
) -> Any:
    """The ``GenerateRequest`` for a trace request."""
    sampling = request.sampling
    message = router_pb2.GenerateRequest(
        request_id=request.id,
        max_new_tokens=request.max_new_tokens,
        # A "<task>+json" label (the structured trace's) hints its task.
        task_hint=(request.task or "").removesuffix(STRUCTURED_SUFFIX) if task_hint else "",
        sampling=router_pb2.SamplingParams(
            do_sample=sampling.do_sample,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            stop=list(sampling.stop),
            seed=sampling.seed,  # None: unset
        ),
        no_update=no_update,
    )
    if sampling.structured_output is not None:
        message.sampling.structured_output.CopyFrom(
            router_pb2.StructuredOutput(**sampling.structured_output.model_dump())
        )
    if request.prediction is not None:
        message.prediction = request.prediction
    if request.prompt is not None:
        message.text = request.prompt
    else:
        for turn in request.messages or ():
            message.conversation.messages.add(role=turn.role, content=turn.content)
    if pin is not None:
        message.force_drafter = pin.drafter
        message.force_draft_length = pin.draft_length
    return message


def result_from_stream(
    request: TraceRequest, index: int, decision: Any, stats: Any, output_ids: tuple[int, ...]
) -> RequestResult:
    """Summarise a finished stream (decision + stats) as a ``RequestResult``."""
    return RequestResult(
        index=index,
        request_id=request.id,
        task=request.task or decision.task_cluster,
        cluster=decision.task_cluster,
        drafter=decision.drafter or "none",
        draft_length=int(decision.draft_length),
        explored=bool(decision.explored),
        greedy=not request.sampling.do_sample,
        prompt_tokens=int(stats.prompt_tokens or decision.prompt_tokens),
        generated_tokens=int(stats.generated_tokens),
        steps=int(stats.steps),
        drafted=int(stats.drafted_tokens),
        accepted=int(stats.accepted_tokens),
        wall_time_s=float(stats.wall_time_s),
        draft_time_s=float(stats.draft_time_s),
        verify_time_s=float(stats.verify_time_s),
        accepted_per_position=tuple(int(x) for x in stats.accepted_per_position),
        output_ids=output_ids,
        finish_reason=str(stats.finish_reason),
        policy_version=int(decision.policy_version),
    )
