"""What asking for logprobs costs on a Qwen2.5-0.5B-shaped target: a speculative step's,
and the prompt's (OpenAI's ``echo`` with logprobs, vLLM's ``prompt_logprobs``, TGI's
``decoder_input_details``).

    python -m benchmarks.engine.logprobs_cost [--rounds 12] [--positions 5]
        [--prompt-tokens 200,1000]

A model of Qwen2.5-0.5B's configuration (random weights, the 151,936-row vocabulary) is
built in memory; one verify pass over ``positions`` positions (a draft of positions - 1
tokens) is timed against the log-softmax and gather that give those positions' logprobs
(``drafters.engine.token_logprobs``), alternately, in fp32 and bf16. Then, per prompt
length, the engine's prefill (``drafters.engine.prefill``) against its scoring prefill
(``scoring_prefill``: every prompt position through the LM head, ranked, top 1),
alternately. Prints the medians and their ratios.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from benchmarks import module_parser
from drafters.engine import prefill, scoring_prefill, token_logprobs

logger = logging.getLogger(__name__)

QWEN25_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}
PROMPT_TOKENS = 200


def measure(dtype: torch.dtype, rounds: int, positions: int) -> tuple[float, float]:
    """Median seconds of one verify pass and of its logprobs (top 0)."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).to(dtype=dtype).eval()  # type: ignore[call-arg]
    verify, logprobs = [], []
    with torch.inference_mode():
        cache = DynamicCache()
        prompt = torch.randint(0, 150_000, (1, PROMPT_TOKENS))
        model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        step = torch.randint(0, 150_000, (1, positions))
        for _ in range(rounds):
            started = time.perf_counter()
            logits = model(step, past_key_values=cache, use_cache=True).logits[0]
            verify.append(time.perf_counter() - started)
            cache.crop(PROMPT_TOKENS)
            started = time.perf_counter()
            token_logprobs(logits, step[0].tolist(), 0)
            logprobs.append(time.perf_counter() - started)
    return statistics.median(verify), statistics.median(logprobs)


def measure_prompt(dtype: torch.dtype, rounds: int, prompt_tokens: int) -> tuple[float, float]:
    """Median seconds of the engine's prefill of ``prompt_tokens`` and of its scoring
    prefill (top 1), timed alternately on one model."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).to(dtype=dtype).eval()  # type: ignore[call-arg]
    device = torch.device("cpu")
    history = torch.randint(0, 150_000, (prompt_tokens,)).tolist()
    plain, scoring = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        prefill(model, device, DynamicCache(), history)
        plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        scoring_prefill(model, device, DynamicCache(), history, 1, [])
        scoring.append(time.perf_counter() - started)
    return statistics.median(plain), statistics.median(scoring)


def main(argv: Sequence[str] | None = None) -> None:
    parser = module_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--positions", type=int, default=5)
    parser.add_argument("--prompt-tokens", default="200,1000", help="comma-separated lengths")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for dtype in (torch.float32, torch.bfloat16):
        verify, logprobs = measure(dtype, args.rounds, args.positions)
        logger.info(
            "%s: verify pass over %d positions %.1f ms, their logprobs %.2f ms (%.1f%%)",
            str(dtype).removeprefix("torch."),
            args.positions,
            verify * 1e3,
            logprobs * 1e3,
            100 * logprobs / verify,
        )
    for dtype in (torch.float32, torch.bfloat16):
        for length in (int(n) for n in args.prompt_tokens.split(",")):
            plain, scoring = measure_prompt(dtype, max(3, args.rounds // 3), length)
            logger.info(
                "%s: prefill of %d tokens %.1f ms, scoring it %.1f ms (%.2fx)",
                str(dtype).removeprefix("torch."),
                length,
                plain * 1e3,
                scoring * 1e3,
                scoring / plain,
            )


if __name__ == "__main__":
    main()
