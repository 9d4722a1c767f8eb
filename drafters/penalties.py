"""Penalties, a logit bias and ``min_tokens`` on the target's logits, row by row of a
verify pass.

vLLM's (and OpenAI's) parameters, with vLLM's meaning:

- ``logit_bias`` (OpenAI's): a fixed value added to the logits of the tokens it names;

- ``repetition_penalty`` r (1: off): the logit of every token already in the prompt or
  the output is divided by r where positive and multiplied by r where negative;
- ``frequency_penalty`` f and ``presence_penalty`` p (0: off): each logit is lowered by
  f times the token's count in the output so far, and by p if it occurs there at all;
- ``min_tokens`` m: until m tokens are generated the end-of-sequence and stop token ids
  cannot be chosen (their logits are -inf);
- ``allowed_token_ids``: only these tokens can be chosen (every other logit is -inf);
- ``bad_words``: a word's last token cannot be chosen where the output ends with the
  word's other tokens (its token sequences: :func:`bad_word_ids`, as vLLM tokenizes them).

Where bad words and ``min_tokens`` would leave no allowed token at a position (``min_tokens``
with stop tokens alone allowed, say), they give way there and the allowed tokens are
scored as they are: a row with no token left has no distribution to sample from.

Speculative decoding stays lossless under them because each row of a verify pass is
adjusted for its own prefix: row i scores the token after the i-th draft, so the drafts
before it count as output there. The drafter proposes from its own distribution as
before; a draft the adjusted target would not choose is rejected like any other. The
reported log-probabilities stay the model's own (vLLM's default ``raw_logprobs``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Penalties:
    """The adjustments one request asks for (module doc); the defaults ask for none."""

    repetition: float = 1.0
    presence: float = 0.0
    frequency: float = 0.0
    min_tokens: int = 0
    bias: tuple[tuple[int, float], ...] = ()  # (token id, value added to its logit)
    allowed: tuple[int, ...] | None = None  # None: every token
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences never completed

    def __post_init__(self) -> None:
        if self.repetition <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.allowed is not None and not self.allowed:
            raise ValueError("allowed token ids must not be empty (None allows every token)")
        if any(not word for word in self.bad_words):
            raise ValueError("a bad word must have at least one token")

    @property
    def active(self) -> bool:
        return (
            self.penalises
            or self.min_tokens > 0
            or bool(self.bias)
            or self.allowed is not None
            or bool(self.bad_words)
        )

    @property
    def penalises(self) -> bool:
        """Whether any penalty (not only ``min_tokens``) is on."""
        return bool(self.repetition != 1.0 or self.presence or self.frequency)


NO_PENALTIES = Penalties()


def bad_word_ids(
    words: Sequence[str], encode: Callable[[str], list[int]]
) -> tuple[tuple[int, ...], ...]:
    """vLLM's token sequences for ``bad_words``: each word without its leading spaces,
    and with one space before it where that is a new first token of as many tokens (a
    word at the start of the text, and in the middle of it). ``encode``: the tokenizer,
    no special tokens. A word that tokenizes to nothing is refused (ValueError)."""
    sequences: list[tuple[int, ...]] = []
    for word in dict.fromkeys(words):
        plain = tuple(encode(word.lstrip()))
        if not plain:
            raise ValueError(f"bad word {word!r} tokenizes to no token")
        sequences.append(plain)
        spaced = tuple(encode(" " + word.lstrip()))
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    return tuple(sequences)


class PenaltyState:
    """One request's running counts: which tokens the prompt and output hold, how often
    each occurs in the output, and how many tokens were generated. Penalties touch only
    the columns of those tokens and of the step's drafts (a few hundred of Qwen2.5's ~152k
    tokens; on the whole vocabulary they cost a CPU step ~25 times as much,
    ``benchmarks/engine/HISTORY.md``)."""

    def __init__(
        self, penalties: Penalties, prompt_ids: Sequence[int], stop_ids: Collection[int]
    ) -> None:
        self.penalties = penalties
        self._stop_ids = sorted(stop_ids)
        # The repetition penalty reads the prompt's tokens too; the others the output's.
        self._seen: dict[int, None] = (
            dict.fromkeys(int(t) for t in prompt_ids) if penalties.repetition != 1.0 else {}
        )
        self._counts: Counter[int] = Counter()  # occurrences in the output
        self.generated = 0
        # The output's last tokens, as many as the longest bad word's prefix.
        self._tail_length = max((len(w) - 1 for w in penalties.bad_words), default=0)
        self._tail: list[int] = []
        self._disallowed: torch.Tensor | None = None  # [vocab] bool, built on first use

    def extend(self, tokens: Sequence[int]) -> None:
        """Tokens emitted: they count as output from now on."""
        self.generated += len(tokens)
        if self.penalties.penalises:
            self._counts.update(tokens)
            self._seen.update(dict.fromkeys(tokens))
        if self._tail_length:
            self._tail = [*self._tail, *(int(t) for t in tokens)][-self._tail_length :]

    def adjust(self, logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """``logits`` [d + 1, vocab] of a verify pass over ``drafts`` [d], each row as its
        own prefix asks (module doc); the same tensor when nothing applies to these rows."""
        rows = logits.shape[0]
        p = self.penalties
        masked = min(rows, p.min_tokens - self.generated)
        stops = masked > 0 and bool(self._stop_ids)
        if not (p.penalises or p.bias or p.allowed is not None or p.bad_words or stops):
            return logits
        out = logits.float().clone()
        if p.allowed is not None:
            out[:, self._disallowed_mask(out)] = float("-inf")
        if p.bias:
            ids, values = zip(*p.bias, strict=True)
            out[:, list(ids)] += torch.tensor(values, dtype=out.dtype, device=out.device)
        # What bad words and min_tokens give way to where they leave no allowed token.
        gives_way = p.allowed is not None and (bool(p.bad_words) or stops)
        fallback = out.clone() if gives_way else None
        if p.bad_words:
            self._mask_bad_words(out, drafts)
        if stops:
            out[:masked, self._stop_ids] = float("-inf")
        if fallback is not None:
            empty = torch.isneginf(out).all(dim=-1)
            if bool(empty.any()):
                out[empty] = fallback[empty]
        if p.penalises:
            out = self._penalised(out, drafts)
        return out

    def _disallowed_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The columns ``allowed`` leaves out (padding columns past the tokenizer too)."""
        if self._disallowed is None or self._disallowed.shape[0] != logits.shape[1]:
            mask = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
            mask[[t for t in self.penalties.allowed or () if t < logits.shape[1]]] = False
            self._disallowed = mask
        return self._disallowed

    def _mask_bad_words(self, logits: torch.Tensor, drafts: torch.Tensor) -> None:
        """Row i's prefix is the output and the drafts before it: a bad word whose other
        tokens end that prefix cannot end there (changed in place)."""
        drafted = [int(t) for t in drafts[: logits.shape[0] - 1].tolist()]
        tokens = [*self._tail, *drafted]
        base = len(self._tail)
        output_length = self.generated
        for row in range(logits.shape[0]):
            end = base + row  # the prefix of row i: tokens[:end] (its output's tail)
            for word in self.penalties.bad_words:
                prefix = len(word) - 1
                if prefix > output_length + row:
                    continue  # the output is shorter than the word's prefix
                if tuple(tokens[end - prefix : end]) == word[:-1]:
                    logits[row, word[-1]] = float("-inf")

    def _penalised(self, logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """``logits`` (a copy, changed in place) penalised on the columns of the tokens seen
        so far and of the drafts; row i counts the drafts before it as output."""
        rows = logits.shape[0]
        drafted = [int(t) for t in drafts[: rows - 1].tolist()]
        columns = list(dict.fromkeys([*self._seen, *drafted]))
        if not columns:
            return logits
        where = {token: i for i, token in enumerate(columns)}
        device = logits.device
        before = torch.zeros(rows, len(columns), dtype=torch.float32)  # drafts before row i
        for row, token in enumerate(drafted, start=1):
            before[row:, where[token]] += 1
        base = torch.tensor([float(self._counts[t]) for t in columns])
        counts = (base.unsqueeze(0) + before).to(device)  # [rows, columns]
        index = torch.tensor(columns, dtype=torch.long, device=device)
        values = logits[:, index]
        p = self.penalties
        if p.repetition != 1.0:
            seen = torch.tensor([t in self._seen for t in columns]).unsqueeze(0)
            present = (seen | (before > 0)).to(device)
            scaled = torch.where(values > 0, values / p.repetition, values * p.repetition)
            # A tiny penalty (1e-40) overflowed a positive logit to +inf, and the row to NaN.
            scaled = scaled.clamp(max=torch.finfo(scaled.dtype).max)
            values = torch.where(present, scaled, values)
        if p.frequency:
            values = values - p.frequency * counts
        if p.presence:
            values = values - p.presence * (counts > 0).float()
        logits[:, index] = values
        return logits
