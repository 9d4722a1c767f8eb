"""Signed entries of the shared streams: what one replica tells the others.

An entry is a Redis Stream entry with two fields: ``payload`` (compact JSON) and ``sig``
(hex HMAC-SHA256 of the payload bytes under the fleet's shared secret). Every payload
names its writer (``replica``, one identity per process start) and that writer's
sequence number (``seq``, from 1, in the order the writer learned), so a reader applies
each entry once: entries of one writer are published in ``seq`` order, and a reader keeps
the highest ``seq`` it applied per writer.

Only acceptance-relevant fields of an outcome travel (context, drafter, k, drafted and
accepted tokens per step, generated tokens): draft and verify times depend on each
node's hardware and stay with the replica that measured them.

Pure: no Redis, no I/O. A payload that is not what this module writes raises
:class:`EntryRejected` with the reason counted in the metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from router.domain import MAX_DRAFTER_TASKS

ENTRY_FORMAT = 1
MAX_STEPS = 1 << 16  # per-step lists longer than any request the sidecar accepts
# Fine-tuning sample lines in a registration: more than a replica sends
# (``router.domain.MAX_SAMPLE_TEXTS``), so that one of an earlier version still reads.
MAX_SAMPLE = 1024
MAX_PAYLOAD_BYTES = 1 << 20


class EntryRejected(ValueError):
    """An entry that must not reach the policy; ``reason`` labels the metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Origin:
    """Who wrote an entry and its place in that writer's sequence."""

    replica: str
    seq: int


@dataclass(frozen=True)
class SharedOutcome:
    """An outcome a replica learned from: a routed request's, or a counterfactual score.

    ``kind`` "outcome": the request ran ``drafter`` at ``k`` (drafter "none" iff k = 0) and
    drafted/accepted these tokens per step, having asked for ``requested`` (empty: k at
    every step; entries written before it existed have none). ``kind`` "counterfactual":
    ``drafter`` would have had ``accepted`` per step at draft length ``k`` (``drafted``
    and ``requested`` are empty), and ``scored_drafted`` per step where its scorer counts
    drafts (a lookup's; None otherwise, and in entries written before it existed, which
    a reader of that time ignores). ``registration``: the writer's
    ``DrafterRecord.identity`` of ``drafter`` ("" for none, and in entries written
    before it existed).
    """

    origin: Origin
    kind: str
    cluster: str
    length_bucket: int
    drafter: str
    k: int
    drafted: tuple[int, ...]
    accepted: tuple[int, ...]
    generated_tokens: int
    requested: tuple[int, ...] = ()
    registration: str = ""
    scored_drafted: tuple[int, ...] | None = None
    structured: bool = False  # the context's (entries written before it have none: False)


@dataclass(frozen=True)
class SharedRegistration:
    """A drafter registered (``kind`` "register", with its spec and its record's
    ``identity`` as ``registration``) or removed ("remove")."""

    origin: Origin
    kind: str
    name: str
    drafter_kind: str = ""
    path: str = ""
    tasks: tuple[str, ...] = ()
    finetune_sample: tuple[str, ...] = ()
    options: Mapping[str, str] | None = None
    registration: str = ""


OUTCOME_KINDS = frozenset({"outcome", "counterfactual"})
REGISTRY_KINDS = frozenset({"register", "remove"})


class EntrySigner:
    """Signs payloads and checks signatures with the fleet's shared secret."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("an empty shared secret signs nothing")
        self._secret = secret

    def signature(self, payload: bytes) -> str:
        return hmac.new(self._secret, payload, hashlib.sha256).hexdigest()

    def fields(self, payload: Mapping[str, Any]) -> dict[str, bytes]:
        """The stream entry's fields for ``payload``."""
        data = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        return {"payload": data, "sig": self.signature(data).encode()}

    def verified(self, fields: Mapping[Any, Any]) -> dict[str, Any]:
        """The payload of a stream entry whose signature is right (else EntryRejected)."""
        payload = _field(fields, "payload")
        signature = _field(fields, "sig")
        if payload is None:
            raise EntryRejected("malformed", "no payload field")
        if signature is None:
            raise EntryRejected("unsigned", "no sig field")
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise EntryRejected("malformed", f"payload of {len(payload)} bytes")
        expected = self.signature(payload).encode()
        if not hmac.compare_digest(expected, signature):
            raise EntryRejected("bad_signature", "signature does not match the shared secret")
        try:
            decoded = json.loads(payload)
        except (UnicodeDecodeError, ValueError) as exc:
            raise EntryRejected("malformed", f"payload is not JSON: {exc}") from exc
        if not isinstance(decoded, dict):
            raise EntryRejected("malformed", "payload is not an object")
        return decoded


def _field(fields: Mapping[Any, Any], name: str) -> bytes | None:
    value = fields.get(name.encode(), fields.get(name))
    if value is None:
        return None
    return value if isinstance(value, bytes) else str(value).encode()


# -- payloads ----------------------------------------------------------------------------


def outcome_payload(outcome: SharedOutcome) -> dict[str, Any]:
    payload = _outcome_fields(outcome)
    if outcome.scored_drafted is not None:
        payload["scored_drafted"] = list(outcome.scored_drafted)
    if outcome.structured:
        payload["structured"] = True
    return payload


def _outcome_fields(outcome: SharedOutcome) -> dict[str, Any]:
    return {
        "format": ENTRY_FORMAT,
        "replica": outcome.origin.replica,
        "seq": outcome.origin.seq,
        "kind": outcome.kind,
        "cluster": outcome.cluster,
        "bucket": outcome.length_bucket,
        "drafter": outcome.drafter,
        "k": outcome.k,
        "drafted": list(outcome.drafted),
        "accepted": list(outcome.accepted),
        "requested": list(outcome.requested),
        "tokens": outcome.generated_tokens,
        "registration": outcome.registration,
    }


def registration_payload(event: SharedRegistration) -> dict[str, Any]:
    return {
        "format": ENTRY_FORMAT,
        "replica": event.origin.replica,
        "seq": event.origin.seq,
        "kind": event.kind,
        "name": event.name,
        "drafter_kind": event.drafter_kind,
        "path": event.path,
        "tasks": list(event.tasks),
        "finetune_sample": list(event.finetune_sample),
        "options": dict(event.options or {}),
        "registration": event.registration,
    }


def _origin(payload: Mapping[str, Any], kinds: frozenset[str]) -> Origin:
    if payload.get("format") != ENTRY_FORMAT:
        raise EntryRejected("malformed", f"format {payload.get('format')!r}")
    if payload.get("kind") not in kinds:
        raise EntryRejected("malformed", f"kind {payload.get('kind')!r}")
    replica = payload.get("replica")
    if not isinstance(replica, str) or not replica:
        raise EntryRejected("malformed", "no replica")
    return Origin(replica, _int(payload, "seq", 1, 1 << 62))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(payload: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = payload.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise EntryRejected("malformed", f"{name} {value!r} is not an integer in {low}..{high}")
    return value


def _ints(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_STEPS:
        raise EntryRejected("malformed", f"{name} is not a list of at most {MAX_STEPS}")
    if not all(_is_int(x) and x >= 0 for x in value):
        raise EntryRejected("malformed", f"{name} holds a negative or non-integer value")
    return tuple(int(x) for x in value)


def _strings(value: Any, name: str, limit: int) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > limit:
        raise EntryRejected("malformed", f"{name} is not a list of at most {limit}")
    if not all(isinstance(x, str) for x in value):
        raise EntryRejected("malformed", f"{name} holds a non-string")
    return tuple(value)


def _text(payload: Mapping[str, Any], name: str, *, required: bool = True) -> str:
    value = payload.get(name, "")
    if not isinstance(value, str) or (required and not value):
        raise EntryRejected("malformed", f"{name} {value!r}")
    return value


def outcome_from_payload(payload: Mapping[str, Any], max_draft_length: int) -> SharedOutcome:
    """A checked SharedOutcome (the same rules a Report is held to), else EntryRejected."""
    origin = _origin(payload, OUTCOME_KINDS)
    kind = str(payload["kind"])
    bucket = _int(payload, "bucket", 0, 16)
    k = _int(payload, "k", 0, max_draft_length)
    tokens = _int(payload, "tokens", 0, MAX_STEPS * (max_draft_length + 1))
    drafter = _text(payload, "drafter")
    drafted = _ints(payload.get("drafted"), "drafted")
    accepted = _ints(payload.get("accepted"), "accepted")
    requested = _ints(payload.get("requested", []), "requested")
    if kind == "outcome":
        if (drafter == "none") != (k == 0):
            raise EntryRejected("malformed", f"drafter {drafter!r} with k = {k}")
        if len(drafted) != len(accepted):
            raise EntryRejected("malformed", "drafted and accepted differ in length")
        if any(a > d or d > max_draft_length for d, a in zip(drafted, accepted, strict=True)):
            raise EntryRejected("malformed", "a step accepts more than it drafts")
        if requested and (
            len(requested) != len(drafted)
            or any(d > r or r > k for d, r in zip(drafted, requested, strict=True))
        ):
            raise EntryRejected("malformed", "a step drafts more than it asked for")
    elif k == 0 or drafted or requested or any(a > k for a in accepted):
        raise EntryRejected("malformed", "counterfactual accepts outside 0..k")
    scored = _scored_drafted(payload, kind, k, accepted)
    return SharedOutcome(
        origin,
        kind,
        _text(payload, "cluster"),
        bucket,
        drafter,
        k,
        drafted,
        accepted,
        tokens,
        requested,
        _text(payload, "registration", required=False),
        scored,
        _flag(payload, "structured"),
    )


def _flag(payload: Mapping[str, Any], name: str) -> bool:
    value = payload.get(name, False)
    if not isinstance(value, bool):
        raise EntryRejected("malformed", f"{name} {value!r}")
    return value


def _scored_drafted(
    payload: Mapping[str, Any], kind: str, k: int, accepted: tuple[int, ...]
) -> tuple[int, ...] | None:
    """A counterfactual's drafted counts per step, checked against its accepts, or None."""
    if "scored_drafted" not in payload:
        return None
    scored = _ints(payload["scored_drafted"], "scored_drafted")
    if kind != "counterfactual" or len(scored) != len(accepted):
        raise EntryRejected("malformed", "scored_drafted without a counterfactual's steps")
    if any(a > d or d > k for d, a in zip(scored, accepted, strict=True)):
        raise EntryRejected("malformed", "a scored step accepts more than it drafts")
    return scored


def registration_from_payload(payload: Mapping[str, Any]) -> SharedRegistration:
    """A checked SharedRegistration, else EntryRejected."""
    origin = _origin(payload, REGISTRY_KINDS)
    options = payload.get("options") or {}
    if not isinstance(options, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in options.items()
    ):
        raise EntryRejected("malformed", "options must map strings to strings")
    return SharedRegistration(
        origin,
        str(payload["kind"]),
        _text(payload, "name"),
        drafter_kind=_text(payload, "drafter_kind", required=payload["kind"] == "register"),
        path=_text(payload, "path", required=False),
        tasks=_strings(payload.get("tasks", []), "tasks", MAX_DRAFTER_TASKS),
        finetune_sample=_strings(payload.get("finetune_sample", []), "finetune_sample", MAX_SAMPLE),
        options=dict(options),
        registration=_text(payload, "registration", required=False),
    )
