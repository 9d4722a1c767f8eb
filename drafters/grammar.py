"""Structured output: the target's output held to a grammar, row by row of a verify pass.

What vLLM's ``structured_outputs`` (and OpenAI's ``response_format``) ask for: output
that matches a JSON schema, any JSON object, a regular expression, one of a list of
strings, or a context-free grammar (Lark, or llama.cpp's GBNF). llguidance, the library
behind vLLM's ``guidance`` backend, computes the tokens each position allows; a token
the grammar forbids gets a logit of -inf, so neither greedy nor sampled decoding can
choose it.

Speculative decoding stays lossless as under penalties (``drafters/penalties.py``): row
i of a verify pass scores the token after the i-th draft, so it is masked for the
grammar's state after the drafts before it. A draft the grammar forbids has probability
zero under the masked target and is rejected where it stands; the rows after it are
never read (they get its row's mask). The drafter proposes from its own distribution,
unconstrained. The reported log-probabilities stay the model's own, as with penalties.

The generation ends as it does without a grammar: at an end-of-sequence token, which the
grammar allows exactly where its output is complete (once nothing else may follow, it is
the only token allowed). Where ``min_tokens`` forbids those tokens at such a position,
the grammar wins: the output is complete and ends.

Importing this module is light (no torch): fronts check grammars with it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance

if TYPE_CHECKING:
    import torch

# What a grammar is given as (vLLM's ``structured_outputs`` fields of the same names).
GRAMMAR_KINDS = ("json", "json_object", "regex", "choice", "grammar")


class GrammarError(ValueError):
    """A grammar that cannot be compiled, or a tokenizer a grammar cannot be read with."""


@dataclass(frozen=True)
class OutputGrammar:
    """A grammar the output must match.

    ``spec`` by ``kind``: "json", the JSON schema's text; "json_object", empty (any JSON
    object); "regex", the expression; "choice", a JSON list of the strings allowed;
    "grammar", a Lark or GBNF grammar. ``any_whitespace`` off (vLLM's
    ``disable_any_whitespace``): JSON without optional whitespace between its tokens.
    ``additional_properties`` off (vLLM's ``disable_additional_properties``): a schema's
    objects with ``properties`` and no ``additionalProperties`` take no other key."""

    kind: str
    spec: str = ""
    any_whitespace: bool = True
    additional_properties: bool = True

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise GrammarError(f"grammar kind must be one of {GRAMMAR_KINDS}, got {self.kind!r}")


# Every tokenization of a valid output is allowed, not only the tokenizer's own where the
# grammar forces text (llguidance's default): the mask is the set of tokens that keep the
# output valid, as vLLM's default backend (xgrammar) computes it.
ALL_TOKENIZATIONS = '%llguidance {"no_forcing": true}\n'


def grammar_text(grammar: OutputGrammar) -> str:
    """llguidance's form of ``grammar`` (not yet checked against a tokenizer): a Lark
    grammar, JSON schemas and regular expressions embedded in it.

    Raises :class:`GrammarError` where the spec cannot even be read (a schema that is not
    a JSON object, a choice that is not a non-empty list of strings, a GBNF grammar that
    does not parse)."""
    try:
        return str(llguidance.LLMatcher.grammar_from_lark(_lark(grammar)))
    except json.JSONDecodeError as error:
        raise GrammarError(f"{grammar.kind} is not valid JSON: {error}") from error
    except RecursionError:
        raise GrammarError(f"the {grammar.kind} spec nests too deeply to be read") from None
    except GrammarError:
        raise
    except ValueError as error:  # llguidance's own, e.g. GBNF that does not parse
        raise GrammarError(str(error)) from error


def _lark(grammar: OutputGrammar) -> str:
    if grammar.kind == "grammar":
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            text = any_to_lark(grammar.spec)  # GBNF converted, Lark as it is
        except Exception as error:  # GbnfToLarkError, or a bare Exception ("No root rule")
            raise GrammarError(f"the GBNF grammar does not parse: {error}") from error
        return text if text.lstrip().startswith("%llguidance") else ALL_TOKENIZATIONS + text
    if grammar.kind == "regex":
        return f"{ALL_TOKENIZATIONS}start: /{llguidance.regex_to_lark(grammar.spec)}/"
    if grammar.kind == "choice":
        choices = json.loads(grammar.spec)
        if (
            not isinstance(choices, list)
            or not choices
            or not all(isinstance(c, str) for c in choices)
        ):
            raise GrammarError("a choice must be a non-empty list of strings")
        return f"{ALL_TOKENIZATIONS}start: {' | '.join(json.dumps(c) for c in choices)}"
    schema = json.loads(grammar.spec) if grammar.kind == "json" else {"type": "object"}
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    if not grammar.additional_properties:
        schema = closed_objects(schema)
    # Whitespace between JSON's tokens: the request's default, the schema's own over it.
    own = schema.get("x-guidance", {})
    if not isinstance(own, dict):
        raise GrammarError("a schema's x-guidance must be an object")
    options = {"whitespace_flexible": grammar.any_whitespace, **own}
    return f"{ALL_TOKENIZATIONS}start: %json {json.dumps({**schema, 'x-guidance': options})}"


# Where a JSON schema holds subschemas: maps of them, and one or a list of them.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = (
    *("items", "prefixItems", "additionalItems", "contains"),
    *("not", "if", "then", "else", "allOf", "anyOf", "oneOf"),
)


def closed_objects(schema: Any) -> Any:
    """A copy of ``schema`` whose objects with ``properties`` (or ``patternProperties``)
    and no ``additionalProperties`` have it false, nested ones too."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), dict | list):
            out[key] = closed_objects(out[key])
    has_properties = isinstance(out.get("properties"), dict)
    if "additionalProperties" not in out and (
        has_properties or isinstance(out.get("patternProperties"), dict)
    ):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=64)
def check_grammar(grammar: OutputGrammar) -> str:
    """``grammar``'s llguidance form, checked on its own (a regex that does not parse, a
    grammar with an undefined rule): what a front can refuse without the target's
    tokenizer (fleet mode). :class:`GrammarError` with llguidance's reason otherwise.

    Cached: an application sends the same few schemas again and again, and a large one
    takes tens of milliseconds to check (40 ms for an 85 kB schema)."""
    text = grammar_text(grammar)
    _raise_on_error(llguidance.LLMatcher.validate_grammar(text))
    return text


def _raise_on_error(message: str) -> None:
    if message and not message.startswith("WARNING"):
        raise GrammarError(message.strip())


class GrammarCompiler:
    """Grammars for one target: its tokenizer in llguidance's form (built once, on first
    use: about a second at Qwen2.5's vocabulary), with ``eos_ids`` as the tokens that end
    a complete output, and logits ``width`` columns wide."""

    def __init__(self, tokenizer: Any, width: int, eos_ids: Collection[int]) -> None:
        import llguidance.hf

        self.width = width
        if not eos_ids:
            raise GrammarError("a grammar needs the target to have an end-of-sequence token")
        try:
            self._tokenizer = llguidance.hf.from_tokenizer(
                tokenizer, n_vocab=max(width, len(tokenizer)), eos_token=sorted(eos_ids)
            )
        except ValueError as error:  # a tokenizer llguidance cannot decode (word-level)
            raise GrammarError(f"this target's tokenizer cannot hold a grammar: {error}") from error

    def matcher(self, grammar: OutputGrammar) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start; :class:`GrammarError` where the grammar
        does not compile against this tokenizer."""
        matcher = llguidance.LLMatcher(self._tokenizer, check_grammar(grammar), log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error().strip())
        return matcher

    def state(self, grammar: OutputGrammar) -> GrammarState:
        return GrammarState(self.matcher(grammar), self.width)


class GrammarState:
    """One request's grammar: where its output stands, and the mask of each verify row
    (module doc). Same interface as ``PenaltyState``: ``adjust`` then ``extend``."""

    def __init__(self, matcher: llguidance.LLMatcher, width: int) -> None:
        import torch

        self._matcher = matcher
        self._width = width
        self._words = (width + 31) // 32
        self._bits = torch.arange(32, dtype=torch.int32)

    def adjust(self, logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """``logits`` [d + 1, vocab] of a verify pass over ``drafts`` [d], row i masked for
        the grammar after drafts[:i] (a new tensor; the model's own is left as it is)."""
        import torch

        allowed = self._allowed(logits.shape[0], [int(t) for t in drafts.tolist()])
        allowed = allowed.to(logits.device)
        masked = logits.masked_fill(~allowed, float("-inf"))
        dead = ~torch.isfinite(masked).any(dim=1)  # min_tokens against a complete output
        if bool(dead.any()):
            masked[dead] = torch.zeros_like(masked[dead]).masked_fill(~allowed[dead], float("-inf"))
        return masked

    def extend(self, tokens: Sequence[int]) -> None:
        """Tokens emitted (each one a row's mask allowed) move the grammar on; once its
        output is complete only end-of-sequence tokens follow, and it takes no more."""
        for token in tokens:
            if self._matcher.is_stopped():
                return
            if not self._matcher.consume_token(int(token)):
                raise RuntimeError(f"grammar refused an emitted token: {self._matcher.get_error()}")

    def _allowed(self, rows: int, drafts: list[int]) -> torch.Tensor:
        """[rows, width] booleans: row i's tokens, the grammar stepped through the drafts
        it accepts and rolled back after; rows past the first forbidden draft copy its."""
        import torch

        drafts = drafts[: rows - 1]
        valid = self._matcher.validate_tokens(drafts) if drafts else 0
        bitmask = torch.empty(rows, self._words, dtype=torch.int32)
        for row in range(valid + 1):
            # llguidance.torch's fill_next_token_bitmask, whose module compiles a kernel
            # with torch.compile on import.
            target = bitmask[row]
            self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)
            if row < valid and not self._matcher.consume_token(drafts[row]):
                raise RuntimeError(
                    f"grammar refused a validated draft: {self._matcher.get_error()}"
                )
        if valid:
            self._matcher.rollback(valid)
        if valid + 1 < rows:
            bitmask[valid + 1 :] = bitmask[valid]
        bits = (bitmask.unsqueeze(-1) >> self._bits) & 1  # [rows, words, 32], low bit first
        return bits.view(rows, -1)[:, : self._width].bool()
