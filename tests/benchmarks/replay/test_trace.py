"""Trace schema and JSONL parsing: good lines round-trip, bad lines name line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.replay.trace import (
    Trace,
    TraceEvent,
    TraceFormatError,
    TraceRequest,
    parse_trace_lines,
    read_trace,
    write_trace,
)

GOOD = [
    '{"id": "a", "task": "qa", "messages": [{"role": "user", "content": "Hi?"}], '
    '"max_new_tokens": 32}',
    "",
    "# a comment line",
    '{"id": "b", "prompt": "<|im_start|>user\\nx<|im_end|>", "max_new_tokens": 8, '
    '"sampling": {"do_sample": true, "temperature": 0.7, "seed": 3}, "arrival_s": 1.5}',
    '{"kind": "register_drafter", "drafter": "code-new", "source": "code", "tasks": ["code"]}',
]


def test_good_lines_parse_into_requests_and_events() -> None:
    trace = parse_trace_lines(GOOD, name="t")
    assert [r.id for r in trace.requests] == ["a", "b"]
    first, second = trace.requests
    assert first.task == "qa" and first.messages is not None
    assert first.messages[0].content == "Hi?" and not first.sampling.do_sample
    assert second.task is None and second.prompt is not None
    assert second.sampling.temperature == 0.7 and second.sampling.seed == 3
    assert second.arrival_s == 1.5
    (event,) = trace.events
    assert isinstance(event, TraceEvent) and event.kind == "register_drafter"
    assert event.source == "code" and event.tasks == ("code",)
    assert trace.task_counts() == {"qa": 1, "": 1}


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    trace = parse_trace_lines(GOOD, name="t")
    path = write_trace(trace, tmp_path / "mine.jsonl")
    again = read_trace(path)
    assert again.name == "mine"
    assert again.records == trace.records
    assert all(json.loads(line) for line in path.read_text().splitlines())


def _error(lines: list[str]) -> str:
    with pytest.raises(TraceFormatError) as info:
        parse_trace_lines(lines, name="t", source="x.jsonl")
    return str(info.value)


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"id": "c", "prompt": "p"}', "x.jsonl:2: field 'max_new_tokens'"),
        ('{"id": "c", "prompt": "p", "max_new_tokens": 0}', "x.jsonl:2: field 'max_new_tokens'"),
        ('{"id": "c", "max_new_tokens": 4}', "x.jsonl:2: field '<line>': Value error, exactly one"),
        (
            '{"id": "c", "prompt": "p", "messages": [{"role": "user", "content": "q"}], '
            '"max_new_tokens": 4}',
            "exactly one of 'prompt' and 'messages'",
        ),
        (
            '{"id": "c", "messages": [{"role": "robot", "content": "q"}], "max_new_tokens": 4}',
            "x.jsonl:2: field 'messages.0.role'",
        ),
        (
            '{"id": "c", "prompt": "p", "max_new_tokens": 4, "sampling": {"top_p": 1.5}}',
            "x.jsonl:2: field 'sampling.top_p'",
        ),
        ('{"id": "c", "prompt": "p", "max_new_tokens": 4, "colour": 1}', "field 'colour'"),
        ('{"id": "c", "prompt": "p", "max_new_tokens": 4', "x.jsonl:2: not valid JSON"),
        ('["a list"]', "x.jsonl:2: expected a JSON object"),
        ('{"kind": "teleport", "id": "c"}', "x.jsonl:2: field 'kind': unknown record kind"),
        ('{"id": "a", "prompt": "p", "max_new_tokens": 4}', "field 'id': duplicate id 'a'"),
        ('{"kind": "remove_drafter"}', "x.jsonl:2: field 'drafter'"),
    ],
)
def test_bad_line_errors_name_line_and_field(bad_line: str, expected: str) -> None:
    assert expected in _error([GOOD[0], bad_line])


def test_a_trace_without_requests_is_refused() -> None:
    assert "no requests" in _error(['{"kind": "remove_drafter", "drafter": "code"}'])


def test_request_and_event_models_are_frozen() -> None:
    request = TraceRequest(id="a", prompt="p", max_new_tokens=4)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        request.id = "b"  # type: ignore[misc]


def test_a_requests_structured_output_parses_and_reaches_the_generate_request() -> None:
    """A trace of structured traffic (JSON mode, tool calls) replays with its grammar."""
    from benchmarks.replay.client import generate_request

    line = (
        '{"id": "j", "prompt": "p", "max_new_tokens": 8, "sampling": {"structured_output": '
        '{"kind": "json", "spec": "{\\"type\\": \\"object\\"}", "disable_any_whitespace": true}}}'
    )
    (request,) = parse_trace_lines([line], name="t").requests
    grammar = request.sampling.structured_output
    assert grammar is not None and grammar.kind == "json" and grammar.disable_any_whitespace
    message = generate_request(request, pin=None, no_update=True, task_hint=False)
    sent = message.sampling.structured_output
    assert (sent.kind, sent.spec, sent.disable_any_whitespace) == (
        "json",
        '{"type": "object"}',
        True,
    )
    plain = generate_request(
        parse_trace_lines([GOOD[0]], name="t").requests[0],
        pin=None,
        no_update=True,
        task_hint=False,
    )
    assert not plain.sampling.HasField("structured_output")
    bad = line.replace('"kind": "json"', '"kind": "yaml"')
    assert "field 'sampling.structured_output.kind'" in _error([GOOD[0], bad])
    assert not plain.HasField("prediction")


def test_a_requests_prediction_reaches_the_generate_request() -> None:
    """A trace of predicted-output traffic (edits) replays with its predictions."""
    from benchmarks.replay.client import generate_request

    line = '{"id": "e", "prompt": "p", "max_new_tokens": 8, "prediction": "the file"}'
    (request,) = parse_trace_lines([line], name="t").requests
    message = generate_request(request, pin=None, no_update=False, task_hint=False)
    assert message.HasField("prediction") and message.prediction == "the file"
    assert "field 'prediction'" in _error([GOOD[0], line.replace('"the file"', "3")])


def test_a_study_reuses_only_a_replay_of_the_same_requests(tmp_path: Path) -> None:
    """It compared the count of requests alone: a study at another --max-new-tokens
    reused replays of other budgets without a word."""
    from benchmarks.replay.study import _matches

    def trace(budget: int) -> Trace:
        line = f'{{"id": "a", "task": "qa", "prompt": "hi", "max_new_tokens": {budget}}}'
        return parse_trace_lines([line], name="t")

    report = {"trace": {"digest": trace(8).digest()}, "policies": {"none": {}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert _matches(tmp_path, trace(8), ["none"])
    assert not _matches(tmp_path, trace(64), ["none"])
    assert trace(8).digest() != trace(64).digest()
