"""Penalties, a logit bias and ``min_tokens`` on the target's logits, row by row of a
verify pass.

vLLM's (and OpenAI's) parameters, with vLLM's meaning:

- ``logit_bias`` (OpenAI's): a fixed value added to the logits of the tokens it names;

- ``repetition_penalty`` r (1: off): the logit of every token already in the prompt or
  the output is divided by r where positive and multiplied by r where negative;
- ``frequency_penalty`` f and ``presence_penalty`` p (0: off): each logit is lowered by
  f times the token's count in the output so far, and by p if it occurs there at all;
- ``min_tokens`` m: until m tokens are generated the end-of-sequence and stop token ids
  cannot be chosen (their logits are -inf).

Speculative decoding stays lossless under them because each row of a verify pass is
adjusted for its own prefix: row i scores the token after the i-th draft, so the drafts
before it count as output there. The drafter proposes from its own distribution as
before; a draft the adjusted target would not choose is rejected like any other. The
reported log-probabilities stay the model's own (vLLM's default ``raw_logprobs``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
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

    def __post_init__(self) -> None:
        if self.repetition <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")

    @property
    def active(self) -> bool:
        return self.penalises or self.min_tokens > 0 or bool(self.bias)

    @property
    def penalises(self) -> bool:
        """Whether any penalty (not only ``min_tokens``) is on."""
        return bool(self.repetition != 1.0 or self.presence or self.frequency)


NO_PENALTIES = Penalties()


class PenaltyState:
    """One request's running counts: which tokens the prompt and output hold, how often
    each occurs in the output, and how many tokens were generated."""

    def __init__(
        self, penalties: Penalties, prompt_ids: Sequence[int], stop_ids: Collection[int]
    ) -> None:
        self.penalties = penalties
        self._prompt_ids = list(prompt_ids)
        self._output: list[int] = []  # until the counts are first needed
        self._stop_ids = sorted(stop_ids)
        self._seen: torch.Tensor | None = None  # [vocab] bool: in the prompt or output
        self._counts: torch.Tensor | None = None  # [vocab] float: occurrences in the output
        self.generated = 0

    def _start(self, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._seen is None or self._counts is None:
            self._seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self._seen[torch.tensor(self._prompt_ids, dtype=torch.long, device=device)] = True
            self._counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            self._count(self._output)
        return self._seen, self._counts

    def _count(self, tokens: Sequence[int]) -> None:
        if self._seen is None or self._counts is None or not tokens:
            return
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self._counts.device)
        self._seen[ids] = True
        self._counts.index_add_(0, ids, torch.ones(len(ids), device=ids.device))

    def extend(self, tokens: Sequence[int]) -> None:
        """Tokens emitted: they count as output from now on."""
        self.generated += len(tokens)
        if self._counts is None:
            self._output.extend(tokens)
        else:
            self._count(tokens)

    def adjust(self, logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """``logits`` [d + 1, vocab] of a verify pass over ``drafts`` [d], each row as its
        own prefix asks (module doc); the same tensor when nothing applies to these rows."""
        rows = logits.shape[0]
        masked = min(rows, self.penalties.min_tokens - self.generated)
        bias = self.penalties.bias
        if not self.penalties.penalises and not bias and (masked <= 0 or not self._stop_ids):
            return logits
        out = logits.float().clone()
        if bias:
            ids, values = zip(*bias, strict=True)
            out[:, list(ids)] += torch.tensor(values, dtype=out.dtype, device=out.device)
        if masked > 0 and self._stop_ids:
            out[:masked, self._stop_ids] = float("-inf")
        if self.penalties.penalises:
            out = self._penalised(out, drafts)
        return out

    def _penalised(self, logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        rows, vocab = logits.shape
        seen, counts = self._start(vocab, logits.device)
        # Row i's output holds the drafts before it: a running count of them per row.
        before = torch.zeros(rows, vocab, dtype=torch.float32, device=logits.device)
        if rows > 1:
            ones = torch.ones(rows - 1, dtype=torch.float32, device=logits.device)
            before[1:].scatter_add_(1, drafts[: rows - 1].long().unsqueeze(1), ones.unsqueeze(1))
            before = before.cumsum(dim=0)
        row_counts = counts.unsqueeze(0) + before  # [rows, vocab]
        p = self.penalties
        if p.repetition != 1.0:
            present = seen.unsqueeze(0) | (before > 0)
            scaled = torch.where(logits > 0, logits / p.repetition, logits * p.repetition)
            logits = torch.where(present, scaled, logits)
        if p.frequency:
            logits = logits - p.frequency * row_counts
        if p.presence:
            logits = logits - p.presence * (row_counts > 0).float()
        return logits
