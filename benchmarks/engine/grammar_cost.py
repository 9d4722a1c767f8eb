"""What structured output costs per output token on a Qwen2.5-0.5B-shaped target.

    python -m benchmarks.engine.grammar_cost [--rounds 3] [--tokens 24]

A model of Qwen2.5-0.5B's configuration (random weights, the 151,936-row vocabulary) is
built in memory with a byte-level tokenizer of 151,643 tokens (the byte alphabet, then
random strings of letters, digits and punctuation: a vocabulary of Qwen2.5's size, not
its tokens). Printed, each beside what it is compared with:

- the one-off costs: reading the tokenizer into the grammar library (the first request
  with a grammar pays it) and its resident memory, and a grammar's check;
- plain decoding (k 0) of ``tokens`` tokens from a 64-token prompt, without a grammar and
  under each grammar below, runs alternating: the median time per output token and its
  ratio to no grammar (the same work per token, whatever tokens the mask leaves);
- a speculative step at k 4, 8 and 16: the target's verify pass over its k + 1
  positions against the grammar's masks for those rows (the drafts a valid output's, so
  every row is computed), alternating: medians and their ratio. (Whole speculative runs
  are not compared: a grammar changes the output, hence what is accepted.)
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch
import transformers
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from benchmarks import module_parser
from benchmarks.engine.logprobs_cost import QWEN25_05B
from drafters.engine import SpeculativeEngine
from drafters.grammar import GrammarCompiler, OutputGrammar, check_grammar
from drafters.loader import load_model
from drafters.registry import create_drafter

logger = logging.getLogger(__name__)

TOKENIZER_SIZE = 151_643  # Qwen2.5's tokens before its added specials
PROMPT_TOKENS = 64
GRAMMARS = {
    # A free string inside JSON: most tokens allowed at most positions.
    "json string": OutputGrammar(
        "json",
        json.dumps({"type": "object", "properties": {"text": {"type": "string"}}}),
        any_whitespace=False,
    ),
    # Lowercase words: a few thousand tokens allowed.
    "regex words": OutputGrammar("regex", "[a-z]+( [a-z]+)*"),
}


def synthetic_tokenizer(seed: int = 0) -> Any:
    """A byte-level BPE tokenizer of TOKENIZER_SIZE tokens with Qwen2's pre-tokenizer and
    end-of-turn token (its merges none: text is read byte by byte)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from benchmarks.world.tokenizer import QWEN2_SPLIT_PATTERN

    rng = random.Random(seed)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    pieces = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.,:;{}()[]\"'Ġ"
    while len(vocab) < TOKENIZER_SIZE:
        word = "".join(rng.choice(pieces) for _ in range(rng.randint(2, 9)))
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>"})
    return tokenizer


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def one_off_costs(tokenizer: Any) -> None:
    before = resident_bytes()
    started = time.perf_counter()
    GrammarCompiler(tokenizer, QWEN25_05B["vocab_size"], [tokenizer.eos_token_id])
    built = time.perf_counter() - started
    logger.info(
        "tokenizer into the grammar library: %.2f s, %.0f MB resident",
        built,
        (resident_bytes() - before) / 1e6,
    )
    for name, grammar in GRAMMARS.items():
        started = time.perf_counter()
        check_grammar.__wrapped__(grammar)  # uncached
        logger.info("check of %s: %.2f ms", name, (time.perf_counter() - started) * 1e3)


def per_token(engine: SpeculativeEngine, drafter: Any, tokens: int, grammar: Any) -> float:
    prompt = torch.randint(0, 150_000, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1))
    run = engine.generate(
        prompt.tolist(), drafter, 0, max_new_tokens=tokens, ignore_eos=True, grammar=grammar
    )
    run.collect()
    return run.stats.wall_time_s / max(run.stats.generated_tokens, 1)


def plain_decoding(engine: SpeculativeEngine, none: Any, rounds: int, tokens: int) -> None:
    choices: dict[str, OutputGrammar | None] = {"no grammar": None, **GRAMMARS}
    times: dict[str, list[float]] = {name: [] for name in choices}
    per_token(engine, none, 4, GRAMMARS["json string"])  # warm-up
    for _ in range(rounds):
        for name, grammar in choices.items():
            times[name].append(per_token(engine, none, tokens, grammar))
    free = statistics.median(times["no grammar"])
    for name in choices:
        median = statistics.median(times[name])
        logger.info(
            "plain decoding, %s: %.1f ms per output token, %.3fx of no grammar "
            "(spread %.1f-%.1f ms)",
            name,
            median * 1e3,
            median / free,
            min(times[name]) * 1e3,
            max(times[name]) * 1e3,
        )


@torch.inference_mode()
def verify_step(engine: SpeculativeEngine, tokenizer: Any, rounds: int, k: int) -> None:
    """A verify pass over k + 1 positions against the masks of its rows (module doc)."""
    model = engine.target.model
    cache = DynamicCache()
    model(torch.randint(0, 150_000, (1, PROMPT_TOKENS)), past_key_values=cache, use_cache=True)
    valid = tokenizer('{"text":"' + "abcdefghij" * 3, add_special_tokens=False).input_ids
    drafts = torch.tensor(valid[:k])
    step = torch.randint(0, 150_000, (1, k + 1))
    forward, masks = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        logits = model(step, past_key_values=cache, use_cache=True).logits[0]
        forward.append(time.perf_counter() - started)
        cache.crop(PROMPT_TOKENS)
        state = engine.grammars.state(GRAMMARS["json string"])
        started = time.perf_counter()
        state.adjust(logits, drafts)
        masks.append(time.perf_counter() - started)
    verify, masked = statistics.median(forward), statistics.median(masks)
    logger.info(
        "k=%d: verify pass over %d positions %.1f ms, the grammar's masks %.2f ms (%.1f%%)",
        k,
        k + 1,
        verify * 1e3,
        masked * 1e3,
        100 * masked / verify,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = module_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    tokenizer = synthetic_tokenizer()
    one_off_costs(tokenizer)
    with TemporaryDirectory() as directory:
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).eval()  # type: ignore[call-arg]
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        del model
        # transformers 4.57.3+ takes any local tokenizer saved by it for a Mistral one with
        # a wrong split pattern, and says so; this one is neither.
        transformers.logging.set_verbosity_error()
        target = load_model(directory)
    engine = SpeculativeEngine(target)
    none = create_drafter("none", name="none", target=target)
    plain_decoding(engine, none, args.rounds, args.tokens)
    for k in (4, 8, 16):
        verify_step(engine, tokenizer, max(5, 3 * args.rounds), k)


if __name__ == "__main__":
    main()
