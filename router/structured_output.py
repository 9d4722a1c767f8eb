"""Structured output on the wire: each API's way of asking for it, read into one
:class:`~drafters.grammar.OutputGrammar`, and vLLM's form of it for a fleet's replicas.

- OpenAI: ``response_format`` ``{"type": "json_object"}`` or ``{"type": "json_schema",
  "json_schema": {"name": ..., "schema": {...}}}`` (chat, and completions as vLLM takes it);
- vLLM: ``structured_outputs`` with one of ``json``, ``regex``, ``choice``, ``grammar``
  (Lark or GBNF) or ``json_object``, and ``disable_any_whitespace`` and
  ``disable_additional_properties``; its older
  ``guided_json``, ``guided_regex``, ``guided_choice`` and ``guided_grammar`` too;
- TGI: ``parameters.grammar`` ``{"type": ..., "value": ...}`` with type ``json`` (its
  alias ``json_object``: the value is a schema), ``regex`` or ``json_schema`` (the value
  ``{"name": ..., "schema": {...}}``); TGI's Messages API takes the same object as its
  ``response_format``, so an OpenAI ``response_format`` with a ``value`` is read this way.

One request asks for one constraint: two (say ``response_format`` and ``guided_regex``)
are refused, as is anything this sidecar would not honour (vLLM's structural tags,
``whitespace_pattern``), naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from drafters.grammar import GRAMMAR_KINDS, GrammarError, OutputGrammar
from router.domain import check_structured_output
from router.errors import InvalidFieldError

# vLLM's structured_outputs members besides the constraint (GRAMMAR_KINDS, the members
# that say what the output must match), with the values that ask for nothing.
NEUTRAL_OPTIONS: dict[str, tuple[Any, ...]] = {
    "whitespace_pattern": (None,),
    "structural_tag": (None,),
}
# vLLM's parameters from before structured_outputs, by the member each stands for.
LEGACY_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
# TGI's grammar types and the kind each is (``json_schema``'s value wraps its schema).
TGI_GRAMMAR_TYPES = {"json": "json", "json_object": "json", "regex": "regex", "json_schema": "json"}


def grammar_of(
    kind: str,
    value: Any,
    field: str,
    any_whitespace: bool = True,
    additional_properties: bool = True,
) -> OutputGrammar:
    """The grammar ``value`` states as ``kind`` (a member of GRAMMAR_KINDS), checked (it
    compiles); INVALID_ARGUMENT naming ``field`` otherwise."""
    spec = _spec(kind, value, field)
    try:
        grammar = OutputGrammar(kind, spec, any_whitespace, additional_properties)
    except GrammarError as error:
        raise InvalidFieldError(field, str(error)) from error
    check_structured_output(grammar, field)
    return grammar


def _spec(kind: str, value: Any, field: str) -> str:
    if kind == "json":
        if isinstance(value, str):
            return value  # the schema as text (checked when compiled)
        if not isinstance(value, dict):
            raise InvalidFieldError(field, "a JSON schema must be an object or its text")
        return json.dumps(value)
    if kind == "choice":
        if not isinstance(value, list):
            raise InvalidFieldError(field, "must be a list of strings")
        return json.dumps(value)
    if kind == "json_object":
        return ""
    if not isinstance(value, str) or not value.strip():
        raise InvalidFieldError(field, "must be a non-empty string")
    return value


def from_structured_outputs(options: Any, field: str = "structured_outputs") -> OutputGrammar:
    """vLLM's ``structured_outputs`` object: exactly one constraint."""
    if not isinstance(options, Mapping):
        raise InvalidFieldError(field, "must be an object")
    flags = ("disable_any_whitespace", "disable_additional_properties")
    unknown = set(options) - {*GRAMMAR_KINDS, *NEUTRAL_OPTIONS, *flags}
    if unknown:
        raise InvalidFieldError(f"{field}.{sorted(unknown)[0]}", "not a structured-output field")
    for name, neutral in NEUTRAL_OPTIONS.items():
        if options.get(name) not in neutral:
            raise InvalidFieldError(f"{field}.{name}", "not served by this sidecar")
    asked = [name for name in GRAMMAR_KINDS if options.get(name) not in (None, False)]
    if len(asked) != 1:
        raise InvalidFieldError(
            field, f"exactly one of {', '.join(GRAMMAR_KINDS)} must be given, got {len(asked)}"
        )
    kind = asked[0]
    for flag in flags:
        if not isinstance(options.get(flag, False), bool):
            raise InvalidFieldError(f"{field}.{flag}", "must be true or false")
    return grammar_of(
        kind,
        options[kind],
        f"{field}.{kind}",
        any_whitespace=not options.get("disable_any_whitespace"),
        additional_properties=not options.get("disable_additional_properties"),
    )


def from_response_format(response_format: Any) -> OutputGrammar | None:
    """OpenAI's ``response_format``: None for text. One with a ``value`` is TGI's form of
    it (its Messages API, which clients written for TGI send through the ``openai``
    package): a ``json_object`` there carries a schema, which OpenAI's reading would
    drop."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise InvalidFieldError("response_format", "must be an object")
    if "value" in response_format:
        return from_tgi(response_format, "response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return grammar_of("json_object", True, "response_format")
    if kind == "json_schema":
        described = response_format.get("json_schema")
        schema = described.get("schema") if isinstance(described, Mapping) else None
        if schema is None:
            raise InvalidFieldError(
                "response_format.json_schema.schema", "a json_schema response format needs one"
            )
        return grammar_of("json", schema, "response_format.json_schema.schema")
    raise InvalidFieldError(
        "response_format.type", f"must be text, json_object or json_schema, got {kind!r}"
    )


def from_openai(response_format: Any, extra: Mapping[str, Any]) -> OutputGrammar | None:
    """The one constraint an OpenAI body asks for (``extra``: its fields beyond OpenAI's,
    where vLLM's are), None if none."""
    found: dict[str, OutputGrammar] = {}
    grammar = from_response_format(response_format)
    if grammar is not None:
        found["response_format"] = grammar
    if extra.get("structured_outputs") is not None:
        found["structured_outputs"] = from_structured_outputs(extra["structured_outputs"])
    for field, kind in LEGACY_FIELDS.items():
        if extra.get(field) is not None:
            found[field] = grammar_of(kind, extra[field], field)
    if len(found) > 1:
        raise InvalidFieldError(
            sorted(found)[1], f"one structured output per request, got {', '.join(sorted(found))}"
        )
    return next(iter(found.values()), None)


def from_tgi(grammar: Any, field: str = "grammar") -> OutputGrammar | None:
    """TGI's ``parameters.grammar`` (module doc): ``{"type": "json" | "json_object",
    "value": schema}``, ``{"type": "regex", "value": expression}`` or ``{"type":
    "json_schema", "value": {"name": ..., "schema": schema}}``."""
    if grammar is None:
        return None
    if not isinstance(grammar, Mapping) or "value" not in grammar:
        raise InvalidFieldError(field, 'must be {"type": ..., "value": ...}')
    kind, value = grammar.get("type"), grammar["value"]
    # Not text (an object, a list): unhashable, it failed the lookup below (a 500).
    if not isinstance(kind, str) or kind not in TGI_GRAMMAR_TYPES:
        raise InvalidFieldError(
            f"{field}.type", f"must be one of {', '.join(TGI_GRAMMAR_TYPES)}, got {kind!r}"
        )
    if kind == "json_schema":
        if not isinstance(value, Mapping) or value.get("schema") is None:
            raise InvalidFieldError(
                f"{field}.value.schema", 'a json_schema grammar is {"name": ..., "schema": {...}}'
            )
        return grammar_of("json", value["schema"], f"{field}.value.schema")
    return grammar_of(TGI_GRAMMAR_TYPES[kind], value, f"{field}.value")


def from_grpc(message: Any) -> OutputGrammar:
    """The gRPC ``SamplingParams.structured_output`` (its spec compiled with the rest of
    the request, ``router.domain.check_sampling``)."""
    try:
        return OutputGrammar(
            message.kind,
            message.spec,
            not message.disable_any_whitespace,
            not message.disable_additional_properties,
        )
    except GrammarError as error:
        raise InvalidFieldError("sampling.structured_output.kind", str(error)) from error


def vllm_structured_outputs(grammar: OutputGrammar) -> dict[str, Any]:
    """vLLM's ``structured_outputs`` for ``grammar`` (what a fleet's replica is sent)."""
    value: Any = grammar.spec
    if grammar.kind in ("json", "choice"):
        value = json.loads(grammar.spec)
    elif grammar.kind == "json_object":
        value = True
    body: dict[str, Any] = {grammar.kind: value}
    if not grammar.any_whitespace:
        body["disable_any_whitespace"] = True
    if not grammar.additional_properties:
        body["disable_additional_properties"] = True
    return body
