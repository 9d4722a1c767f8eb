"""Per-request statistics of speculative decoding, in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field


def mean_accepted_length(accepted: int, steps: int) -> float:
    """Tokens emitted per target step: the accepted drafts plus the one target token (the
    bonus or correction) of every step, 1 + accepted / steps; 1.0 for plain decoding, 0.0
    before any step. The one definition, for one request and for tallies pooled over many.
    """
    return 1.0 + accepted / steps if steps else 0.0


@dataclass
class GenerationStats:
    """What one request did: steps, drafted and accepted tokens, where time went.

    A step is one target forward over the last verified token plus the step's drafts.
    ``drafted_per_step`` counts tokens the drafter actually proposed (an n-gram drafter may
    propose fewer than asked, or none; a stop rule may end a model drafter's draft sooner);
    ``requested_per_step`` the draft length asked for; ``stopped_steps`` the steps whose
    draft a stop rule ended before the requested length (``drafters/stopping.py``).
    ``wall_time_s`` is time spent inside the engine (prefill included), not time the
    consumer of the stream spends between tokens.
    """

    steps: int = 0
    drafted_per_step: list[int] = field(default_factory=list)
    accepted_per_step: list[int] = field(default_factory=list)
    requested_per_step: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    stopped_steps: int = 0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    plain_steps: int = 0  # steps that drafted nothing (one-position target forwards)
    plain_verify_time_s: float = 0.0  # their share of verify_time_s
    # Drafting steps that timed their drafter's forwards after the first apart
    # (``Proposal.further_time_s``): their lead (the first forward with the catch-up on
    # the verified tokens, and the step's fixed work) and their further forwards.
    lead_steps: int = 0
    lead_time_s: float = 0.0
    further_forwards: int = 0
    further_time_s: float = 0.0
    prefill_time_s: float = 0.0
    wall_time_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reason: str = ""

    def observe_step(
        self,
        *,
        requested: int,
        drafted: int,
        accepted: int,
        draft_time_s: float,
        verify_time_s: float,
        stopped: bool = False,
        further_time_s: float | None = None,
        further_forwards: int = 0,
    ) -> None:
        """Record one step: ``accepted`` leading drafts of ``drafted`` were accepted;
        ``stopped``: a stop rule ended the draft before ``requested``;
        ``further_time_s``: the time of the draft's ``further_forwards`` forwards after its
        first one, when the drafter timed them apart (``Proposal``): the rest of
        ``draft_time_s`` is the step's lead."""
        self.steps += 1
        self.stopped_steps += stopped
        self.requested_per_step.append(requested)
        self.drafted_per_step.append(drafted)
        self.accepted_per_step.append(accepted)
        if len(self.accepted_per_position) < accepted:
            self.accepted_per_position.extend([0] * (accepted - len(self.accepted_per_position)))
        for position in range(accepted):
            self.accepted_per_position[position] += 1
        self.draft_time_s += draft_time_s
        self.verify_time_s += verify_time_s
        if further_time_s is not None and drafted > 0:
            further = min(further_time_s, draft_time_s)
            self.lead_steps += 1
            self.lead_time_s += draft_time_s - further
            self.further_forwards += further_forwards
            self.further_time_s += further
        if drafted == 0:
            self.plain_steps += 1
            self.plain_verify_time_s += verify_time_s

    @property
    def drafted(self) -> int:
        return sum(self.drafted_per_step)

    @property
    def accepted(self) -> int:
        return sum(self.accepted_per_step)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per step (:func:`mean_accepted_length`)."""
        return mean_accepted_length(self.accepted, self.steps)

    @property
    def per_token_acceptance(self) -> float:
        """Estimate of the i.i.d. per-token acceptance a at the requested draft lengths.

        Each step tries its requested positions in order until the first rejection; a
        position the drafter left empty counts as rejected. The maximum-likelihood a of
        that truncated geometric model is accepted / (accepted + steps that stopped early).
        """
        accepted, tried = self.acceptance_trials()
        return accepted / tried if tried else 0.0

    def acceptance_trials(self) -> tuple[int, int]:
        """(accepted, tried) positions behind ``per_token_acceptance``, for pooling runs."""
        accepted = 0
        tried = 0
        for requested, taken in zip(self.requested_per_step, self.accepted_per_step, strict=True):
            if requested == 0:
                continue
            accepted += taken
            tried += taken + (1 if taken < requested else 0)
        return accepted, tried
