"""Structured output in the engine: greedy output held to a grammar, the same with and
without speculation; grammars that cannot compile refused with llguidance's reason.
(Sampled output under a grammar: ``test_sampling_lossless.py``.)"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from drafters.base import Drafter
from drafters.engine import SpeculativeEngine
from drafters.grammar import GrammarError, OutputGrammar, check_grammar
from drafters.loader import load_model
from drafters.penalties import Penalties
from drafters.registry import create_drafter
from tests.drafters.conftest import TinyModels

SPECIALS = ("<|endoftext|>", "<|im_end|>")


MERGED = ("re", "en")  # two tokens of two bytes, which the tokenizer itself never makes


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level, one token per byte (no merges) and MERGED, then the two specials."""
    alphabet = [*sorted(pre_tokenizers.ByteLevel.alphabet()), *MERGED]
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    tokenizer.add_special_tokens({"eos_token": SPECIALS[1], "bos_token": SPECIALS[0]})
    return tokenizer


def byte_model(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(byte_tokenizer()) + 6,  # padded, as Qwen2.5's is
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.25,
        tie_word_embeddings=True,
        eos_token_id=len(byte_tokenizer()) - 1,
    )
    return Qwen2ForCausalLM(config).eval()


@dataclass(frozen=True)
class Setup:
    engine: SpeculativeEngine
    drafters: dict[str, Drafter]
    prompt: list[int]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("grammar")
    target_model = byte_model(0)
    drafter_model = byte_model(1)
    drafter_model.load_state_dict(target_model.state_dict())
    with torch.no_grad():  # close to the target: drafts accepted, and some not
        for parameter in drafter_model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    directories = {}
    for name, model in (("target", target_model), ("drafter", drafter_model)):
        directories[name] = root / name
        model.save_pretrained(directories[name], safe_serialization=True)
        byte_tokenizer().save_pretrained(directories[name])
    target = load_model(directories["target"])
    return Setup(
        engine=SpeculativeEngine(target),
        drafters={
            "none": create_drafter("none", name="none", target=target),
            "ngram": create_drafter("ngram", name="ngram", target=target),
            "model": create_drafter(
                "model", name="model", target=target, path=directories["drafter"]
            ),
        },
        prompt=target.tokenizer("Answer: ").input_ids,
    )


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}
GRAMMARS = {
    "json": OutputGrammar("json", json.dumps(SCHEMA), any_whitespace=False),
    "regex": OutputGrammar("regex", r"(yes|no)-[0-9]{2,4}"),
    "choice": OutputGrammar("choice", json.dumps(["left", "right", "up"])),
    "gbnf": OutputGrammar("grammar", 'root ::= "(" [a-c]+ ")"'),
    "lark": OutputGrammar("grammar", "start: /[xyz]{3}/"),
}


def matches(kind: str, text: str) -> bool:
    if kind == "json":
        value = json.loads(text)
        return (
            set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)
        )
    patterns = {
        "regex": r"(yes|no)-[0-9]{2,4}",
        "choice": "left|right|up",
        "gbnf": r"\([a-c]+\)",
        "lark": "[xyz]{3}",
    }
    return re.fullmatch(patterns[kind], text) is not None


@pytest.mark.parametrize("kind", sorted(GRAMMARS))
def test_greedy_output_matches_the_grammar_the_same_with_every_drafter(
    setup: Setup, kind: str
) -> None:
    outputs = {}
    for name, drafter in setup.drafters.items():
        run = setup.engine.generate(
            setup.prompt,
            drafter,
            0 if name == "none" else 3,
            max_new_tokens=64,
            grammar=GRAMMARS[kind],
        )
        outputs[name] = run.collect()
        assert run.stats.finish_reason == "eos_token", (name, run.text)
        assert matches(kind, run.text), (name, run.text)
    assert len({tuple(o) for o in outputs.values()}) == 1, outputs
    plain = setup.engine.generate(setup.prompt, setup.drafters["none"], 0, max_new_tokens=8)
    assert plain.collect() != outputs["none"][:8]  # the grammar changed what came out


def test_speculation_under_a_grammar_accepts_the_drafts_it_allows(setup: Setup) -> None:
    """Rows after an allowed draft are masked for the grammar past it, so drafts it allows
    are accepted about as often as without one (this grammar forbids one byte only)."""
    grammar = OutputGrammar("regex", "[^;]{40}")
    accepted = {}
    for constrained in (None, grammar):
        runs = [
            setup.engine.generate(
                setup.prompt,
                setup.drafters[name],
                k,
                max_new_tokens=40,
                grammar=constrained,
                ignore_eos=True,  # the output runs to 40 tokens with the grammar or without
            )
            for name, k in (("none", 0), ("model", 3))
        ]
        plain, speculative = (run.collect() for run in runs)
        assert plain == speculative
        accepted[constrained] = sum(runs[1].stats.accepted_per_step)
    assert accepted[None] >= 20 and accepted[grammar] >= accepted[None] // 2, accepted


def test_min_tokens_past_a_complete_output_leaves_it_as_it_is(setup: Setup) -> None:
    """``min_tokens`` forbids the end tokens the complete output allows: the grammar wins,
    nothing but end tokens follow (8 tokens, then the one that ends it), and the text
    stays the grammar's."""
    run = setup.engine.generate(
        setup.prompt,
        setup.drafters["model"],
        3,
        max_new_tokens=20,
        grammar=GRAMMARS["choice"],
        penalties=Penalties(min_tokens=8),
    )
    tokens = run.collect()
    assert run.text in ("left", "right", "up") and len(tokens) == 9


@pytest.mark.parametrize(
    ("grammar", "reason"),
    [
        (OutputGrammar("regex", "(ab"), "unclosed group"),
        (OutputGrammar("json", "{not json"), "not valid JSON"),
        (OutputGrammar("json", "[1, 2]"), "must be an object"),
        (OutputGrammar("json", '{"x-guidance": "loose"}'), "x-guidance must be an object"),
        (OutputGrammar("choice", "[]"), "non-empty list of strings"),
        (OutputGrammar("choice", '["a", 1]'), "non-empty list of strings"),
        (OutputGrammar("grammar", "start: missing_rule"), "missing_rule"),
        (OutputGrammar("grammar", 'root ::= "a'), "GBNF"),
        # llguidance's GBNF reader raises a bare Exception for these (INTERNAL before).
        (OutputGrammar("grammar", ""), "No 'root' rule found"),
        (OutputGrammar("grammar", 'a ::= "x"'), "No 'root' rule found"),
        (OutputGrammar("grammar", "root ::= foo"), "Rule 'foo' not found"),
        # Deeper than the JSON parser recurses (a RecursionError before).
        (OutputGrammar("choice", "[" * 3000 + "]" * 3000), "nests too deeply"),
        (OutputGrammar("json", '{"a": ' * 1000 + "1" + "}" * 1000), "nests too deeply"),
    ],
    ids=[
        "regex",
        "json-text",
        "json-array",
        "x-guidance",
        "empty-choice",
        "choice-number",
        "lark",
        "gbnf",
        "gbnf-empty",
        "gbnf-no-root",
        "gbnf-undefined-rule",
        "choice-deep",
        "json-deep",
    ],
)
def test_a_grammar_that_does_not_compile_is_refused_with_the_reason(
    setup: Setup, grammar: OutputGrammar, reason: str
) -> None:
    with pytest.raises(GrammarError, match=re.escape(reason)):
        check_grammar(grammar)
    with pytest.raises(GrammarError, match=re.escape(reason)):
        setup.engine.generate(
            setup.prompt, setup.drafters["none"], 0, max_new_tokens=4, grammar=grammar
        )


def test_an_unknown_grammar_kind_is_refused() -> None:
    with pytest.raises(GrammarError, match="grammar kind must be one of"):
        OutputGrammar("yaml", "a: 1")


def test_a_tokenizer_a_grammar_cannot_read_is_refused_clearly(tiny_models: TinyModels) -> None:
    """A word-level tokenizer (no byte decoding) cannot hold a grammar: refused by name,
    and the engine serves requests without one as before."""
    target = load_model(tiny_models.target_dir)
    engine = SpeculativeEngine(target)
    none = create_drafter("none", name="none", target=target)
    with pytest.raises(GrammarError, match="cannot hold a grammar"):
        engine.generate([3, 4], none, 0, max_new_tokens=2, grammar=GRAMMARS["choice"])
    assert len(engine.generate([3, 4], none, 0, max_new_tokens=2).collect()) == 2


def test_padding_columns_past_the_tokenizer_are_never_allowed(setup: Setup) -> None:
    """Logits wider than the tokenizer (Qwen2.5 pads its vocabulary): the padding
    columns are masked like any token the grammar forbids."""
    state = setup.engine.grammars.state(GRAMMARS["regex"])
    width = setup.engine.grammars.width
    assert width > len(byte_tokenizer())
    logits = torch.zeros(1, width)
    adjusted = state.adjust(logits, torch.empty(0, dtype=torch.long))
    allowed = torch.isfinite(adjusted[0]).nonzero().flatten().tolist()
    tokenizer = byte_tokenizer()
    assert sorted(tokenizer.decode([t]) for t in allowed) == ["n", "y"]


def test_every_tokenization_of_a_valid_output_is_allowed(setup: Setup) -> None:
    """After "g" + "re" toward "green", both "e" and "en" keep the output valid: the mask
    holds both (vLLM's default backend's mask), not only the tokenizer's own choice."""
    tokenizer = byte_tokenizer()
    ids = {text: tokenizer.convert_tokens_to_ids(text) for text in ("g", "re", "e", "en")}
    state = setup.engine.grammars.state(OutputGrammar("regex", "(red|green|blue)!"))
    state.extend([ids["g"], ids["re"]])
    width = setup.engine.grammars.width
    adjusted = state.adjust(torch.zeros(1, width), torch.empty(0, dtype=torch.long))
    allowed = set(torch.isfinite(adjusted[0]).nonzero().flatten().tolist())
    assert allowed == {ids["e"], ids["en"]}


def test_closed_objects_take_no_other_key(setup: Setup) -> None:
    """vLLM's disable_additional_properties: every object schema with properties and no
    additionalProperties of its own gets it false, nested ones too; the matcher then
    refuses a key the schema does not name, and takes it without the option."""
    from drafters.grammar import closed_objects

    inner = {"type": "object", "properties": {"x": {"type": "integer"}}}
    schema = {
        "type": "object",
        "properties": {"a": inner, "b": {"type": "array", "items": inner}},
        "$defs": {"d": {"anyOf": [inner, {"type": "string"}]}},
        "patternProperties": {"^k": {"type": "object", "additionalProperties": True}},
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["b"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["anyOf"][0]["additionalProperties"] is False
    assert closed["patternProperties"]["^k"]["additionalProperties"] is True  # its own
    assert "additionalProperties" not in schema  # a copy
    text = byte_tokenizer()('{"zz":', add_special_tokens=False).input_ids
    for additional, taken in ((True, len(text)), (False, 2)):  # '{' and '"' only
        grammar = OutputGrammar(
            "json", json.dumps(inner), any_whitespace=False, additional_properties=additional
        )
        assert setup.engine.grammars.matcher(grammar).validate_tokens(text) == taken
