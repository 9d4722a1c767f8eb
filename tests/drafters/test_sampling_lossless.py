"""Sampled speculative decoding is lossless beyond the first token, checked statistically.

The engine's first four tokens are sampled a thousand times, speculatively (the first
from the prefill, then one step at k = 2, so the second to fourth tokens come from the
resample after no or a partial accept and from the bonus token) and plainly (no
drafter), and each empirical joint distribution of (t1, ..., t4) is compared with the
exact one of plain sampling, computed from the target's
own processed probabilities, by Pearson's chi-square goodness-of-fit test. A correct engine
fails a check with probability 1e-4 (``FALSE_FAILURE``); the seeds are fixed, so a run is
deterministic.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from drafters.base import Drafter
from drafters.engine import DraftLengthSchedule, SpeculativeEngine
from drafters.grammar import OutputGrammar
from drafters.guard import LossGuard
from drafters.loader import LoadedModel, load_model
from drafters.penalties import NO_PENALTIES, Penalties
from drafters.prediction import PredictedDrafter
from drafters.registry import create_drafter
from drafters.sampling import SamplingConfig, sampling_probs

VOCAB = 8  # few outcomes, so thousands of samples estimate the joint distribution well
LENGTH = 4  # tokens per sample: t1 (the prefill's), then t2, t3, t4 from one step at k = 2
# Enough to catch each of three engine bugs planted on 2026-12-03 in every test it applies
# to (resampling from p instead of norm(max(0, p - q)); the bonus token from the last
# draft's distribution; accepting with probability p instead of p / q): all failed at 1000
# samples, as at 2000, in half the time.
SAMPLES = 1000
FALSE_FAILURE = 1e-4
MIN_EXPECTED = 5.0  # cells are pooled until each expects this many (chi-square's rule)
PROMPT = [1, 2, 3, 4, 5]
COPY = "copy-or-model"


LETTERS = "abcdefgh"


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Letters a..h (byte-level, as a grammar needs), and an EOS the model cannot emit
    (id 8, past its VOCAB logits): every sample has all LENGTH tokens."""
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(LETTERS)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|end|>")


def small_model() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        initializer_range=0.3,  # spread logits: several likely tokens per position
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


def save(model: Qwen2ForCausalLM, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    word_tokenizer().save_pretrained(directory)
    return directory


@dataclass(frozen=True)
class Setup:
    target: LoadedModel
    engine: SpeculativeEngine
    drafters: dict[str, Drafter]
    prompts: dict[str, list[int]]  # per drafter kind


@torch.inference_mode()
def likely_ngram_prompt(model: torch.nn.Module, sampling: SamplingConfig) -> list[int]:
    """[x, y, a, b, c, a] for the x, y, a, b, c under which the prefill's token is b and
    the target then accepts exactly one and both of the n-gram drafter's drafts, [c, a],
    most often (the less frequent of the two); x and y let the prefill's b be likely.

    A point-mass draft t is accepted with probability p(t), so with p0 = p(b), p1 = p(c |
    b) and p2 = p(a | b, c): one accepted with p0 p1 (1 - p2), both with p0 p1 p2."""
    words = torch.arange(VOCAB)
    grid = torch.cartesian_prod(*[words] * 5)  # [V^5, 5]: x y a b c
    a, b, c = grid[:, 2:3], grid[:, 3:4], grid[:, 4:5]
    rows = torch.arange(grid.shape[0])

    def p(history: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return sampling_probs(model(history).logits[:, -1], sampling)[rows, token[:, 0]]

    prompts = torch.cat([grid, a], dim=1)  # [V^5, 6]
    copied = torch.cat([prompts, b], dim=1)  # the prefill's b: the lookup drafts c, a
    third = p(torch.cat([copied, c], dim=1), a)
    both_outcomes = p(prompts, b) * p(copied, c) * torch.minimum(third, 1 - third)
    return [int(t) for t in prompts[int(both_outcomes.argmax())]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("sampling")
    torch.manual_seed(0)
    target_model = small_model()
    drafter_model = small_model()
    drafter_model.load_state_dict(target_model.state_dict())
    with torch.no_grad():  # close to the target, not equal: accepts, partial and full
        for parameter in drafter_model.parameters():
            parameter.add_(0.15 * torch.randn_like(parameter))
    target = load_model(save(target_model, root / "target"))
    engine = SpeculativeEngine(target)
    assert min(engine.stop_token_ids) >= VOCAB  # never sampled
    drafter_dir = save(drafter_model, root / "drafter")
    ngram_prompt = likely_ngram_prompt(target.model, TOP_P)
    return Setup(
        target=target,
        engine=engine,
        # The copy-or-model drafter (matches of one token) copies [c, a] after a prefill's
        # b, as the lookup does, and has its model draft after a token new to the prompt.
        prompts={"model": PROMPT, "ngram": ngram_prompt, "none": PROMPT, COPY: ngram_prompt},
        drafters={
            **{
                kind: create_drafter(kind, name=kind, target=target, path=path)
                for kind, path in (("model", drafter_dir), ("ngram", None), ("none", None))
            },
            COPY: create_drafter(
                COPY, name=COPY, target=target, path=drafter_dir, options={"min_match": 1}
            ),
        },
    )


def penalised(
    logits: torch.Tensor, prompt: Sequence[int], output: Sequence[int], penalties: Penalties
) -> torch.Tensor:
    """A row [1, vocab] under ``penalties`` after ``prompt`` and ``output``, token by token
    as vLLM's documentation states them (the reference for ``drafters/penalties.py``)."""
    row = logits.clone()
    if penalties.allowed is not None:
        row[0, sorted(set(range(row.shape[1])) - set(penalties.allowed))] = float("-inf")
    for word in penalties.bad_words:  # its last token, where the output ends with the rest
        if len(word) - 1 <= len(output) and list(output[len(output) - len(word) + 1 :]) == list(
            word[:-1]
        ):
            row[0, word[-1]] = float("-inf")
    for token, bias in penalties.bias:  # before the penalties, as vLLM applies it
        row[0, token] += bias
    for token in set(prompt) | set(output):
        value = float(row[0, token])
        r = penalties.repetition
        row[0, token] = value / r if value > 0 else value * r
    for token, count in Counter(output).items():
        row[0, token] -= penalties.frequency * count + penalties.presence
    return row


@torch.inference_mode()
def exact_joint(
    model: torch.nn.Module,
    prompt: Sequence[int],
    sampling: SamplingConfig,
    penalties: Penalties = NO_PENALTIES,
    allowed: Callable[[tuple[int, ...]], set[int]] | None = None,
) -> dict[tuple[int, ...], float]:
    """P(t1..t_LENGTH) of plain sampling: the product of the target's processed
    next-token probabilities along each prefix (only the ``allowed`` next tokens, where
    given, as a grammar's mask leaves them)."""
    joint: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(LENGTH):
        extended: dict[tuple[int, ...], float] = {}
        for prefix, mass in joint.items():
            logits = model(torch.tensor([[*prompt, *prefix]])).logits[0, -1:]
            logits = penalised(logits, prompt, prefix, penalties)
            if allowed is not None:
                forbidden = sorted(set(range(VOCAB)) - allowed(prefix))
                logits[0, forbidden] = float("-inf")
            probs = sampling_probs(logits, sampling)[0].double()
            for token in probs.nonzero().flatten().tolist():
                extended[(*prefix, token)] = mass * float(probs[token])
        joint = extended
    return joint


def pooled_cells(
    expected: dict[tuple[int, ...], float], samples: int
) -> list[list[tuple[int, ...]]]:
    """Outcomes grouped, rarest first, until each group expects MIN_EXPECTED samples."""
    groups: list[list[tuple[int, ...]]] = [[]]
    mass = 0.0
    for cell in sorted(expected, key=lambda c: expected[c]):
        groups[-1].append(cell)
        mass += expected[cell]
        if mass * samples >= MIN_EXPECTED:
            groups.append([])
            mass = 0.0
    if not groups[-1]:
        groups.pop()
    elif len(groups) > 1:  # a short last group joins the one before
        groups[-2].extend(groups.pop())
    return groups


def chi_square_p_value(
    observed: Counter[tuple[int, ...]], expected: dict[tuple[int, ...], float]
) -> float:
    samples = sum(observed.values())
    outside = {cell: n for cell, n in observed.items() if cell not in expected}
    assert not outside, f"outcomes plain sampling never gives: {outside}"
    groups = pooled_cells(expected, samples)
    total = sum(expected.values())
    counts = [sum(observed[c] for c in group) for group in groups]
    means = [samples * sum(expected[c] for c in group) / total for group in groups]
    return float(chisquare(counts, means).pvalue)


def sample_joint(
    engine: SpeculativeEngine,
    prompt: Sequence[int],
    drafter: Drafter,
    k: int | Callable[[], DraftLengthSchedule],
    sampling: SamplingConfig,
    requested: Counter[int] | None = None,
    penalties: Penalties = NO_PENALTIES,
    grammar: OutputGrammar | None = None,
) -> tuple[Counter[tuple[int, ...]], Counter[int]]:
    """SAMPLES outputs of LENGTH tokens (seeds 0..SAMPLES-1), and how many steps accepted
    0, 1, ... drafts. ``k`` may make a fresh schedule per request; ``requested`` counts
    the draft lengths its steps asked for."""
    outputs: Counter[tuple[int, ...]] = Counter()
    accepted: Counter[int] = Counter()
    for seed in range(SAMPLES):
        config = replace(sampling, do_sample=True, seed=seed)
        length = k if isinstance(k, int) else k()
        run = engine.generate(
            prompt,
            drafter,
            length,
            max_new_tokens=LENGTH,
            sampling=config,
            penalties=penalties,
            grammar=grammar,
        )
        outputs[tuple(run.collect())] += 1
        accepted.update(run.stats.accepted_per_step)
        if requested is not None:
            requested.update(run.stats.requested_per_step)
    return outputs, accepted


TOP_K = SamplingConfig(do_sample=True, temperature=1.0, top_k=4)
TOP_P = SamplingConfig(do_sample=True, temperature=0.9, top_p=0.85)
# Locally typical sampling after top-p, as TGI's typical_p: another warp, the same law.
TYPICAL = SamplingConfig(do_sample=True, temperature=0.9, top_p=0.95, typical_p=0.8)
# vLLM's min_p after temperature, then top-k.
MIN_P = SamplingConfig(do_sample=True, temperature=1.1, min_p=0.1, top_k=5)


@pytest.mark.parametrize(
    ("drafter", "sampling"),
    [("model", TOP_K), ("model", TOP_P), ("ngram", TOP_P), (COPY, TYPICAL), ("model", MIN_P)],
    ids=["model-top_k", "model-top_p", "ngram-top_p", "copy_or_model-typical_p", "model-min_p"],
)
def test_speculative_samples_follow_plain_sampling_beyond_the_first_token(
    setup: Setup, drafter: str, sampling: SamplingConfig
) -> None:
    prompt = setup.prompts[drafter]
    expected = exact_joint(setup.target.model, prompt, sampling)
    speculative, accepted = sample_joint(setup.engine, prompt, setup.drafters[drafter], 2, sampling)
    # The draws that make tokens 3 and 4 happen often: a resample after one accepted draft
    # (t3) and the bonus token after two (t4).
    assert accepted[1] >= SAMPLES // 10 and accepted[2] >= SAMPLES // 10, accepted
    assert chi_square_p_value(speculative, expected) > FALSE_FAILURE


def test_samples_under_penalties_follow_plain_sampling_under_them(setup: Setup) -> None:
    """vLLM's repetition, frequency and presence penalties (and a logit bias): each verified
    row is penalised
    for its own prefix (the drafts before it count as output there), so speculative
    samples follow plain sampling of the penalised target, as ``penalised`` states it."""
    penalties = Penalties(repetition=1.6, presence=0.5, frequency=0.4, bias=((3, 0.6), (5, -0.8)))
    prompt = setup.prompts["model"]
    expected = exact_joint(setup.target.model, prompt, TOP_P, penalties)
    assert expected != exact_joint(setup.target.model, prompt, TOP_P)
    speculative, accepted = sample_joint(
        setup.engine, prompt, setup.drafters["model"], 2, TOP_P, penalties=penalties
    )
    assert accepted[1] >= SAMPLES // 20 and accepted[2] >= SAMPLES // 20, accepted
    assert chi_square_p_value(speculative, expected) > FALSE_FAILURE


def test_samples_under_allowed_tokens_and_bad_words_follow_plain_sampling_under_them(
    setup: Setup,
) -> None:
    """vLLM's allowed_token_ids and bad_words: each verified row is masked for its own
    prefix (a bad word's last token where the output, drafts before the row included,
    ends with the word's other tokens), so speculative samples follow plain sampling of
    the masked target, as ``penalised`` states it."""
    penalties = Penalties(allowed=(0, 1, 2, 3, 4, 5), bad_words=((2, 3), (1, 1), (4,)))
    prompt = setup.prompts["model"]
    expected = exact_joint(setup.target.model, prompt, TOP_P, penalties)
    assert expected != exact_joint(setup.target.model, prompt, TOP_P)
    speculative, accepted = sample_joint(
        setup.engine, prompt, setup.drafters["model"], 2, TOP_P, penalties=penalties
    )
    assert accepted[1] >= SAMPLES // 20 and accepted[2] >= SAMPLES // 20, accepted
    assert chi_square_p_value(speculative, expected) > FALSE_FAILURE


# Pairs of letters, the second depending on the first: what a row allows depends on the
# drafts before it.
PAIRS = {"a": "bc", "b": "ad", "c": "ae", "d": "ab"}
PAIR_GRAMMAR = OutputGrammar("regex", "(" + "|".join(f"{a}[{b}]" for a, b in PAIRS.items()) + ")+")


def pair_tokens(prefix: tuple[int, ...]) -> set[int]:
    """The next tokens ``PAIR_GRAMMAR`` allows after ``prefix``, stated without it."""
    if len(prefix) % 2 == 0:
        return {LETTERS.index(a) for a in PAIRS}
    return {LETTERS.index(b) for b in PAIRS[LETTERS[prefix[-1]]]}


def test_samples_under_a_grammar_follow_plain_sampling_under_it(setup: Setup) -> None:
    """Structured output: each verified row is masked for the grammar after the drafts
    before it; the drafter proposes unconstrained, so drafts the grammar forbids are
    rejected, and the samples follow plain sampling of the masked target."""
    prompt = setup.prompts["model"]
    expected = exact_joint(setup.target.model, prompt, TOP_P, allowed=pair_tokens)
    speculative, accepted = sample_joint(
        setup.engine, prompt, setup.drafters["model"], 2, TOP_P, grammar=PAIR_GRAMMAR
    )
    assert min(accepted[0], accepted[1], accepted[2]) >= SAMPLES // 20, accepted
    assert chi_square_p_value(speculative, expected) > FALSE_FAILURE


def test_samples_follow_plain_sampling_when_the_loss_guard_changes_k(setup: Setup) -> None:
    """The loss guard picks each step's k from the steps before (here from the first on,
    at the posterior median): the draft lengths differ between requests, the output
    distribution does not."""
    prompt = setup.prompts["model"]
    expected = exact_joint(setup.target.model, prompt, TOP_P)
    requested: Counter[int] = Counter()
    guarded, _ = sample_joint(
        setup.engine,
        prompt,
        setup.drafters["model"],
        lambda: LossGuard(2, confidence=0.5, min_evidence=1),
        TOP_P,
        requested,
    )
    assert requested[2] > 0 and sum(n for k, n in requested.items() if k < 2) > 0, requested
    assert chi_square_p_value(guarded, expected) > FALSE_FAILURE


@torch.inference_mode()
def most_likely_path(model: torch.nn.Module, prompt: Sequence[int], length: int) -> list[int]:
    path: list[int] = []
    for _ in range(length):
        path.append(int(model(torch.tensor([[*prompt, *path]])).logits[0, -1].argmax()))
    return path


def test_samples_follow_plain_sampling_with_a_predicted_output(setup: Setup) -> None:
    """A predicted output (drafters/prediction.py) drafts point masses where the sample
    follows it, the model drafter elsewhere: the samples follow plain sampling."""
    prompt = setup.prompts["model"]
    prediction = tuple(most_likely_path(setup.target.model, prompt, LENGTH + 2))
    drafter = PredictedDrafter(
        setup.drafters["model"], prediction, base_k=2, device=setup.target.device
    )
    expected = exact_joint(setup.target.model, prompt, TOP_P)
    speculative, accepted = sample_joint(setup.engine, prompt, drafter, 2, TOP_P)
    tally = drafter.tally
    assert tally.steps >= SAMPLES // 10 and tally.accepted >= SAMPLES // 10, tally
    assert tally.steps < SAMPLES  # and the model drafted where the sample left it
    assert accepted[1] >= SAMPLES // 20 and accepted[2] >= SAMPLES // 20, accepted
    assert chi_square_p_value(speculative, expected) > FALSE_FAILURE


def test_plain_sampling_follows_the_exact_joint(setup: Setup) -> None:
    """The reference is what the engine samples without a drafter (k = 0); top-k and
    top-p together here, one after the other as in ``sampling_probs``."""
    sampling = SamplingConfig(do_sample=True, temperature=0.9, top_k=4, top_p=0.85)
    prompt = setup.prompts["none"]
    plain, accepted = sample_joint(setup.engine, prompt, setup.drafters["none"], 0, sampling)
    assert set(accepted) == {0}
    expected = exact_joint(setup.target.model, prompt, sampling)
    assert chi_square_p_value(plain, expected) > FALSE_FAILURE
