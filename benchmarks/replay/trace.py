"""Replay traces: a JSONL schema (pydantic), parsing with line-numbered errors, and writing.

One JSON object per line. A line is either a request (the default; ``"kind": "request"`` may
be left out) or an event that changes the sidecar mid-replay (``register_drafter`` /
``remove_drafter``). Requests::

    {"id": "qa-0001", "task": "qa", "messages": [{"role": "user", "content": "..."}],
     "max_new_tokens": 64, "sampling": {"do_sample": false}, "arrival_s": 0.5}

``prompt`` (already templated text) may replace ``messages``; exactly one of them is set.
``sampling.structured_output`` (``{"kind": "json", "spec": "<schema>"}``, as the gRPC
``StructuredOutput``) holds a request's output to a grammar; ``prediction`` (text) is
the answer the request expects back (OpenAI's predicted outputs), drafted from first.
``task`` is optional: without it the per-task tables group by the classifier's cluster.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class TraceFormatError(ValueError):
    """A trace line that is not valid JSON or does not match the schema (names line and field)."""


class ChatTurn(BaseModel):
    """One chat message of a request (Qwen chat turn)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class TraceStructuredOutput(BaseModel):
    """A grammar the output is held to (the gRPC ``StructuredOutput``: ``kind`` json,
    json_object, regex, choice or grammar; ``spec`` its text)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["json", "json_object", "regex", "choice", "grammar"]
    spec: str = ""
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False


class TraceSampling(BaseModel):
    """Sampling parameters of a request; the default is greedy (needed for the lossless check)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    do_sample: bool = False
    temperature: Annotated[float, Field(gt=0.0)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[int, Field(ge=0)] | None = None
    stop: tuple[str, ...] = ()
    structured_output: TraceStructuredOutput | None = None


class TraceRequest(BaseModel):
    """One request of a trace."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["request"] = "request"
    id: Annotated[str, Field(min_length=1)]
    task: str | None = None
    prompt: Annotated[str, Field(min_length=1)] | None = None
    messages: tuple[ChatTurn, ...] | None = None
    max_new_tokens: Annotated[int, Field(gt=0, le=100_000)]
    sampling: TraceSampling = TraceSampling()
    arrival_s: Annotated[float, Field(ge=0.0)] = 0.0
    prediction: str | None = None  # the expected answer (GenerateRequest.prediction)

    @model_validator(mode="after")
    def _one_prompt(self) -> TraceRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' and 'messages' must be set")
        if self.messages is not None and (not self.messages or self.messages[-1].role != "user"):
            raise ValueError("'messages' must be non-empty and end with a user turn")
        return self


class TraceEvent(BaseModel):
    """A change to the sidecar at a point of the replay (a drafter registered or removed).

    ``path`` of a registered model drafter may be left out: the replay then takes the world's
    drafter directory of that name (``source`` names it when it differs from ``drafter``).
    ``await_drafter`` pauses the replay until the sidecar itself registers a drafter whose
    name starts with ``drafter`` for ``tasks`` (automatic distillation; the ``learn`` trace).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["register_drafter", "remove_drafter", "await_drafter"]
    drafter: Annotated[str, Field(min_length=1)]
    arrival_s: Annotated[float, Field(ge=0.0)] = 0.0
    drafter_kind: str = "model"
    path: str | None = None
    source: str | None = None
    tasks: tuple[str, ...] = ()
    finetune_sample: tuple[str, ...] = ()


TraceRecord = TraceRequest | TraceEvent

RECORD_MODELS: dict[str, type[BaseModel]] = {
    "request": TraceRequest,
    "register_drafter": TraceEvent,
    "remove_drafter": TraceEvent,
    "await_drafter": TraceEvent,
}


@dataclass(frozen=True)
class Trace:
    """A named, ordered list of requests and events."""

    name: str
    records: tuple[TraceRecord, ...]

    @property
    def requests(self) -> tuple[TraceRequest, ...]:
        return tuple(r for r in self.records if isinstance(r, TraceRequest))

    @property
    def events(self) -> tuple[TraceEvent, ...]:
        return tuple(r for r in self.records if isinstance(r, TraceEvent))

    def digest(self) -> str:
        """SHA-256 of the records as JSON lines: two traces of one digest replay the same
        requests (prompts, budgets, sampling) and events in the same order."""
        lines = (r.model_dump_json(exclude_defaults=True) for r in self.records)
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def task_counts(self) -> dict[str, int]:
        """Requests per task label (unlabelled requests count under ``""``)."""
        counts: dict[str, int] = {}
        for request in self.requests:
            counts[request.task or ""] = counts.get(request.task or "", 0) + 1
        return counts


def _field_name(error_loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in error_loc) or "<line>"


def parse_record(obj: object, line_number: int, source: str) -> TraceRecord:
    """Validate one decoded JSON value as a trace record; errors name the line and field."""
    where = f"{source}:{line_number}"
    if not isinstance(obj, dict):
        raise TraceFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind", "request")
    model = RECORD_MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise TraceFormatError(
            f"{where}: field 'kind': unknown record kind {kind!r} (one of {sorted(RECORD_MODELS)})"
        )
    try:
        record = model.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise TraceFormatError(
            f"{where}: field '{_field_name(first['loc'])}': {first['msg']}"
            + (f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else "")
        ) from exc
    assert isinstance(record, TraceRequest | TraceEvent)
    return record


def parse_trace_lines(lines: Iterable[str], *, name: str, source: str = "<trace>") -> Trace:
    """Parse JSONL lines (blank lines and ``#`` comments skipped); ids must be unique."""
    records: list[TraceRecord] = []
    seen_ids: dict[str, int] = {}
    for line_number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise TraceFormatError(
                f"{source}:{line_number}: not valid JSON: {exc.msg} (column {exc.colno})"
            ) from exc
        record = parse_record(obj, line_number, source)
        if isinstance(record, TraceRequest):
            if record.id in seen_ids:
                raise TraceFormatError(
                    f"{source}:{line_number}: field 'id': duplicate id {record.id!r} "
                    f"(first on line {seen_ids[record.id]})"
                )
            seen_ids[record.id] = line_number
        records.append(record)
    if not any(isinstance(r, TraceRequest) for r in records):
        raise TraceFormatError(f"{source}: the trace has no requests")
    return Trace(name=name, records=tuple(records))


def read_trace(path: Path) -> Trace:
    """Read a JSONL trace file; its name is the file's stem."""
    try:
        with path.open(encoding="utf-8") as handle:
            return parse_trace_lines(handle, name=path.stem, source=str(path))
    except UnicodeDecodeError as error:  # the codec's message named no file
        raise TraceFormatError(f"{path} is not UTF-8 text ({error.reason})") from None


def trace_lines(trace: Trace) -> Iterator[str]:
    """The JSONL lines of a trace (defaults left out, so files stay short)."""
    for record in trace.records:
        # Events keep their ``kind`` (it has no default); requests drop it.
        yield json.dumps(record.model_dump(mode="json", exclude_defaults=True), ensure_ascii=False)


def write_trace(trace: Trace, path: Path) -> Path:
    """Write a trace as JSONL (round-trips through ``read_trace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in trace_lines(trace)), encoding="utf-8")
    return path
