"""Evaluating a built world on its held-out test split.

Per task: the target's quality from greedy generation (one checkable metric per task,
``QUALITY_METRICS``), and for every drafter the greedy acceptance at draft length k
(teacher-forced on the target's own output, ``drafters.counterfactual``): per-token
acceptance = accepted / drafted tokens, and mean accepted tokens per step. Plus the
target's and the drafters' decode-step times on this machine.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.world.corpus import Example, math_answer, qa_answer
from benchmarks.world.handwritten import world_routing_accuracy
from benchmarks.world.layout import read_examples
from router.bundle import ModelBundle

logger = logging.getLogger(__name__)

DRAFT_LENGTH = 4
# Every task is generated with the same cap, as a serving front would set it: answers end
# at the target's own end-of-turn token, so output lengths (``output_tokens``) are the
# target's, not the cap's.
MAX_NEW_TOKENS = 128
GENERATION_BATCH = 16
STEP_ROUNDS = 5  # interleaved rounds of decode-step timing (decode_step_times)
_WORD = re.compile(r"\w+|[^\w\s]")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """Unigram F1 between word/punctuation tokens (SQuAD-style, bag of tokens)."""
    predicted, expected = _words(prediction), _words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    remaining = list(expected)
    overlap = 0
    for token in predicted:
        if token in remaining:
            remaining.remove(token)
            overlap += 1
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1 if equal after whitespace normalisation."""
    return float(" ".join(prediction.split()) == " ".join(reference.split()))


def answer_contained(prediction: str, reference: str) -> float:
    """1 if the reference's short answer occurs in the prediction as whole words."""
    answer = qa_answer(reference)
    pattern = r"(?<!\w)" + re.escape(answer.lower()) + r"(?!\w)"
    return float(re.search(pattern, prediction.lower()) is not None)


def math_correct(prediction: str, reference: str) -> float:
    """1 if the final number ("The answer is N") matches."""
    expected = math_answer(reference)
    return float(bool(expected) and math_answer(prediction) == expected)


CHRF_ORDER = 6  # character n-grams of 1..6, as chrF (Popovic, 2015)
CHRF_BETA = 2.0  # recall weighs twice precision, as chrF


def _char_ngrams(text: str, n: int) -> dict[str, int]:
    """Counts of the character n-grams of ``text`` with whitespace removed (chrF's rule)."""
    chars = "".join(text.split())
    counts: dict[str, int] = {}
    for i in range(len(chars) - n + 1):
        gram = chars[i : i + n]
        counts[gram] = counts.get(gram, 0) + 1
    return counts


def chrf(prediction: str, reference: str) -> float:
    """chrF: character n-gram F-beta (n = 1..6, averaged precision and recall, beta 2).

    Word-token F1 fails on Japanese (no spaces) and on inflected words; chrF, the usual
    translation metric besides BLEU, scores both. 1.0 only for an identical text."""
    precisions, recalls = [], []
    for n in range(1, CHRF_ORDER + 1):
        predicted, expected = _char_ngrams(prediction, n), _char_ngrams(reference, n)
        if not predicted or not expected:
            continue
        overlap = sum(min(count, expected.get(gram, 0)) for gram, count in predicted.items())
        precisions.append(overlap / sum(predicted.values()))
        recalls.append(overlap / sum(expected.values()))
    if not precisions:
        return float("".join(prediction.split()) == "".join(reference.split()))
    precision, recall = statistics.fmean(precisions), statistics.fmean(recalls)
    if precision + recall == 0:
        return 0.0
    beta2 = CHRF_BETA**2
    return (1 + beta2) * precision * recall / (beta2 * precision + recall)


QualityMetric = Callable[[str, str], float]
# The corpus's references (docs/world.md, "Tasks, sources and licences"): extractive
# sentences for summarization, qa and rag, bodies for code, real replies for chat (all
# token F1); worked solutions ending "The answer is N." for math; translations for chrF.
QUALITY_METRICS: dict[str, tuple[str, QualityMetric]] = {
    "chat": ("token F1", token_f1),
    "translation": ("chrF", chrf),
    "summarization": ("token F1", token_f1),
    "qa": ("token F1", token_f1),
    "math": ("answer correct", math_correct),
    "rag": ("token F1", token_f1),
    "code": ("token F1", token_f1),
}


@dataclass(frozen=True)
class TargetOutput:
    """The target's greedy continuation of one test prompt."""

    example: Example
    prompt_ids: list[int]
    output_ids: list[int]  # generated ids, the end-of-turn token included if emitted
    text: str
    eos_id: int

    @property
    def generated_tokens(self) -> int:
        """Tokens of the answer itself: the end-of-turn token is not counted."""
        return len(self.output_ids) - int(
            bool(self.output_ids) and self.output_ids[-1] == self.eos_id
        )


def _prompt_ids(tokenizer: Any, example: Example) -> list[int]:
    ids: list[int] = tokenizer.apply_chat_template(
        list(example.messages), add_generation_prompt=True
    )
    return ids


def generate_greedy(
    loaded: Any, examples: Sequence[Example], batch_size: int = GENERATION_BATCH
) -> list[TargetOutput]:
    """Greedy generation with the target (KV cache), stopping at ``<|im_end|>`` or after
    ``MAX_NEW_TOKENS``; outputs in the order of ``examples``.

    Prompts of similar length are generated together, left-padded (positions follow the
    attention mask, so each row is its prompt alone up to float rounding; batch 1 takes
    about ``batch_size`` times as long on a 2-core CPU).
    """
    import torch

    from drafters.attention import padded_batch_masks

    tokenizer, model = loaded.tokenizer, loaded.model
    eos_id, pad_id = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    prompts = [_prompt_ids(tokenizer, example) for example in examples]
    order = sorted(range(len(examples)), key=lambda i: (len(prompts[i]), i))
    outputs: dict[int, TargetOutput] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.inference_mode(), padded_batch_masks(model):
            generated = model.generate(
                ids.to(loaded.device),
                attention_mask=mask.to(loaded.device),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
            )
        for row, i in enumerate(chunk):
            output_ids = generated[row, width:].tolist()
            if eos_id in output_ids:  # what follows the end of turn is the batch's padding
                output_ids = output_ids[: output_ids.index(eos_id) + 1]
            text = tokenizer.decode(output_ids, skip_special_tokens=True)
            outputs[i] = TargetOutput(examples[i], prompts[i], output_ids, text, eos_id)
    return [outputs[i] for i in range(len(examples))]


@dataclass(frozen=True)
class Acceptance:
    """Greedy acceptance of one drafter on one task at a fixed draft length."""

    accepted: int
    drafted: int
    steps: int

    @property
    def per_token(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def accepted_per_step(self) -> float:
        return self.accepted / self.steps if self.steps else 0.0


def acceptance_of_matches(
    matches: Sequence[Sequence[bool]], k: int, max_new_tokens: int = MAX_NEW_TOKENS
) -> Acceptance:
    """Greedy acceptance at draft length ``k`` over outputs given as per-token matches of
    a drafter's predictions (generated within ``max_new_tokens``), replayed as the engine
    runs them: from the token after the prefill's, k drafts a step, fewer where the budget
    leaves less room (``SpeculativeEngine``: k <= max_new_tokens - generated - 1), through
    ``drafters.counterfactual.replay_greedy_drafts``, the replay of every counterfactual
    score. Counted here apart from it (from the first token, capped at the output's end
    plus one) the drafts were off near the end: too few before an EOS, too many at the
    budget."""
    from drafters.counterfactual import replay_greedy_drafts

    def drafts_at(position: int, length: int) -> list[bool]:
        return [True] * max(0, min(length, max_new_tokens - position - 1))

    accepted = drafted = steps = 0
    for output in matches:
        drafted_here, accepted_here = replay_greedy_drafts(output, k, drafts_at)
        accepted += sum(accepted_here)
        drafted += sum(drafted_here)
        steps += len(accepted_here)
    return Acceptance(accepted, drafted, steps)


def drafter_acceptance(model: Any, outputs: Sequence[TargetOutput], k: int) -> Acceptance:
    """Teacher-forced greedy acceptance of a drafter over the target's outputs."""
    from drafters.counterfactual import teacher_forced_matches

    return acceptance_of_matches(
        [teacher_forced_matches(model, o.prompt_ids, o.output_ids) for o in outputs], k
    )


def decode_step_seconds(model: Any, context_length: int = 96, steps: int = 40) -> float:
    """Median wall time of one cached single-token decode step (batch 1)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        ids = torch.randint(3, model.config.vocab_size, (1, context_length), device=device)
        out = model(input_ids=ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
    return statistics.median(times[5:])


def decode_step_times(
    target: Any, drafters: Mapping[str, Any], *, rounds: int = STEP_ROUNDS
) -> tuple[float, dict[str, float]]:
    """The target's and each drafter's decode step (:func:`decode_step_seconds`), the
    median over ``rounds`` rounds that each time every model in turn, on one torch thread
    (the sidecar's default ``torch_threads``; the previous count restored afterwards).

    One pass per model, one after the other, put whatever the machine did meanwhile on
    whichever model was being timed: the eight drafters of one architecture measured
    1.1-1.9 ms in one evaluation and 0.8-0.9 ms apart from it, which moved the
    target/drafter ratio between 4 and 6 from run to run (and the policy simulator's
    drafting costs with it). Interleaved rounds spread such spells over all models."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rounds_timed = [
            (decode_step_seconds(target), {n: decode_step_seconds(m) for n, m in drafters.items()})
            for _ in range(rounds)
        ]
    finally:
        torch.set_num_threads(before)
    target_step = statistics.median(t for t, _ in rounds_timed)
    return target_step, {n: statistics.median(d[n] for _, d in rounds_timed) for n in drafters}


def head_dim(config: Any) -> int:
    """Attention head size of a model config: its ``head_dim`` if set, else hidden / heads
    (Qwen2Config's rule)."""
    explicit = getattr(config, "head_dim", None)
    return int(explicit or config.hidden_size // config.num_attention_heads)


def unevenness(values: Sequence[float]) -> dict[str, float]:
    """Spread of per-task values: min, max, max/min, coefficient of variation, Jain's index."""
    from benchmarks.replay.metrics import coefficient_of_variation, jain_index, max_over_min

    return {
        "min": min(values),
        "max": max(values),
        "max_over_min": max_over_min(values),
        "coefficient_of_variation": coefficient_of_variation(values),
        "jain_index": jain_index(values),
    }


def evaluate_world(world: ModelBundle, *, limit: int | None = None) -> dict[str, Any]:
    """Target quality, acceptance matrix and decode-step times on the test split."""
    import torch

    from drafters.loader import load_model

    torch.set_num_threads(2)
    started = time.perf_counter()
    test = read_examples(world.corpus_dir, "test")
    target = load_model(world.target_dir)
    drafters = {name: load_model(path) for name, path in world.drafter_dirs.items()}

    target_outputs: dict[str, list[TargetOutput]] = {}
    quality: dict[str, float] = {}
    for task in world.tasks:
        examples = [e for e in test if e.task == task][:limit]
        target_outputs[task] = generate_greedy(target, examples)
        _, metric = QUALITY_METRICS[task]
        scores = [metric(o.text, o.example.response) for o in target_outputs[task]]
        quality[task] = statistics.fmean(scores) if scores else 0.0
        logger.info("target quality on %s: %.3f", task, quality[task])

    matrix: dict[str, dict[str, Acceptance]] = {
        name: {
            task: drafter_acceptance(d.model, target_outputs[task], DRAFT_LENGTH)
            for task in world.tasks
        }
        for name, d in drafters.items()
    }
    target_step, drafter_steps = decode_step_times(
        target.model, {name: d.model for name, d in drafters.items()}
    )
    drafter_step = statistics.median(drafter_steps.values())
    generic_acceptance = [matrix["generic"][t].per_token for t in world.tasks]
    return {
        "world": str(world.root),
        "scale": world.scale,
        "tasks": list(world.tasks),
        "drafters": list(drafters),
        "draft_length": DRAFT_LENGTH,
        "test_examples": {t: len(target_outputs[t]) for t in world.tasks},
        "quality_metric": {t: QUALITY_METRICS[t][0] for t in world.tasks},
        "target_quality": quality,
        "acceptance": {n: {t: a.per_token for t, a in row.items()} for n, row in matrix.items()},
        "accepted_per_step": {
            n: {t: a.accepted_per_step for t, a in row.items()} for n, row in matrix.items()
        },
        "task_drafter_margin": {
            t: matrix[t][t].per_token - matrix["generic"][t].per_token
            for t in world.tasks
            if t in matrix
        },
        "generic_unevenness": unevenness(generic_acceptance),
        "decode_step_ms": {
            "target": target_step * 1e3,
            "drafter_median": drafter_step * 1e3,
            "drafters": {n: s * 1e3 for n, s in drafter_steps.items()},
            "target_over_drafter": target_step / drafter_step,
        },
        "parameters": {
            "target": target.parameter_count,
            "drafter": drafters["generic"].parameter_count,
        },
        "head_dim": {
            "target": head_dim(target.model.config),
            "drafters": {name: head_dim(d.model.config) for name, d in drafters.items()},
        },
        "max_new_tokens": MAX_NEW_TOKENS,
        "output_tokens": {
            t: statistics.fmean(o.generated_tokens for o in target_outputs[t])
            if target_outputs[t]
            else 0.0
            for t in world.tasks
        },
        "build_seconds": world.manifest.get("build_seconds"),
        "samples": {
            t: [{"prompt": o.example.id, "output": o.text} for o in target_outputs[t][:2]]
            for t in world.tasks
        },
        # The world's classifier on the handwritten, naturally worded prompts (issue 20: >= 0.9).
        "handwritten_routing": world_routing_accuracy(world),
        "eval_seconds": time.perf_counter() - started,
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


EVAL_FILE = "eval.json"


def saved_evaluation(world: ModelBundle) -> dict[str, Any] | None:
    """The evaluation saved in the world (``<world>/eval.json``), or None."""
    path = Path(world.root) / EVAL_FILE
    if not path.is_file():
        return None
    try:
        report: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        logger.warning("ignoring unreadable %s", path)
        return None
    return report if report.get("tasks") else None


def cached_evaluation(world: ModelBundle) -> dict[str, Any]:
    """The world's evaluation: ``saved_evaluation``, else measured in full and saved.

    The world directory is immutable once built (its config hash names its contents), so
    its evaluation is computed once; the demo and the policy simulator read the same file.
    """
    report = saved_evaluation(world)
    if report is None:
        report = evaluate_world(world)
        save_evaluation(world, report)
    return report


def save_evaluation(world: ModelBundle, report: dict[str, Any]) -> None:
    """Write ``report`` as the world's ``eval.json`` (a temporary file renamed into place)."""
    path = Path(world.root) / EVAL_FILE
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        json.dump(report, stream, indent=2)
        stream.write("\n")
    os.replace(temporary, path)
