"""Domain types: length buckets, decisions, outcomes built from steps or from totals."""

from __future__ import annotations

import pytest

from router.policy.base import (
    LENGTH_BUCKET_EDGES,
    Context,
    Decision,
    IncompatibleStateError,
    Outcome,
    check_state,
    length_bucket,
)


def test_length_buckets_follow_the_edges() -> None:
    assert LENGTH_BUCKET_EDGES == (64, 256, 1024)
    assert [length_bucket(n) for n in (0, 63, 64, 255, 256, 1023, 1024, 10**6)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    assert length_bucket(-5) == 0


def test_context_is_hashable_and_compares_by_value() -> None:
    assert Context("code", 1) == Context("code", 1)
    assert len({Context("code", 1), Context("code", 1), Context("code", 2)}) == 2


def test_decision_ties_none_to_k_zero() -> None:
    Decision("none", 0)
    Decision("generic", 4, 1.5, True)
    with pytest.raises(ValueError, match="k = 0"):
        Decision("none", 3)
    with pytest.raises(ValueError, match="k = 0"):
        Decision("generic", 0)
    with pytest.raises(ValueError, match=">= 0"):
        Decision("generic", -1)


def test_outcome_counts_follow_the_truncated_geometric_likelihood() -> None:
    outcome = Outcome.from_steps([4, 4, 4, 2], [4, 1, 0, 2], draft_time_s=0.1, verify_time_s=0.4)
    # Successes: 4 + 1 + 0 + 2; failures: steps that stopped short of k (the 2nd and 3rd).
    assert outcome.acceptance_counts(4) == (7, 2)
    assert outcome.generated_tokens == 7 + 4
    assert outcome.wall_time_s == pytest.approx(0.5)
    assert outcome.plain_token_time_s is None


def test_a_step_that_asked_for_a_draft_and_got_none_is_a_failure() -> None:
    """An n-gram drafter that finds no match drafts nothing: the step emits one token, as a
    rejected first draft does, so it counts as one failure; a step that asked for nothing
    (the loss guard's k' = 0, the last step's cap) counts nothing."""
    outcome = Outcome.from_steps([4, 0, 0, 2], [3, 0, 0, 2], draft_time_s=0.1, verify_time_s=0.4)
    assert outcome.acceptance_counts(4) == (5, 3)  # the 1st step's rejection, two empty steps
    guarded = Outcome.from_steps(
        [4, 0, 0, 2],
        [3, 0, 0, 2],
        draft_time_s=0.1,
        verify_time_s=0.4,
        requested_per_step=[4, 4, 0, 2],
    )
    assert guarded.acceptance_counts(4) == (5, 2)  # the 3rd step asked for nothing
    with pytest.raises(ValueError, match="requested"):
        Outcome.from_steps([4], [3], draft_time_s=0, verify_time_s=0, requested_per_step=[2])
    with pytest.raises(ValueError, match="entries"):
        Outcome.from_steps([4], [3], draft_time_s=0, verify_time_s=0, requested_per_step=[4, 4])


def test_outcome_rejects_inconsistent_steps() -> None:
    with pytest.raises(ValueError, match="entries"):
        Outcome.from_steps([4, 4], [1], draft_time_s=0, verify_time_s=0)
    with pytest.raises(ValueError, match="outside"):
        Outcome.from_steps([2], [3], draft_time_s=0, verify_time_s=0)
    with pytest.raises(ValueError, match="times"):
        Outcome.from_steps([2], [1], draft_time_s=-1, verify_time_s=0)
    # The steps without drafts are a share of the verify time, never more.
    for share in (-0.1, 0.5):
        with pytest.raises(ValueError, match="plain_steps_time_s"):
            Outcome.from_steps(
                [2, 0], [1, 0], draft_time_s=0, verify_time_s=0.4, plain_steps_time_s=share
            )
    # The first forwards timed apart: of drafting steps only, with the further forwards
    # a share of the draft time.
    for lead_steps, lead_time, further in (
        (2, 0.01, 0),
        (-1, 0.01, 0),
        (1, 0.3, 0),
        (1, -0.1, 0),
        (1, 0.1, 0.15),
        (1, 0.1, -1),
    ):
        with pytest.raises(ValueError, match="draft_"):
            Outcome.from_steps(
                [2, 0],
                [1, 0],
                draft_time_s=0.2,
                verify_time_s=0.4,
                draft_lead_steps=lead_steps,
                draft_lead_time_s=lead_time,
                draft_further_forwards=1 if further >= 0 else -1,
                draft_further_time_s=max(further, 0.0),
            )


def test_outcome_from_totals_reconstructs_steps_from_positions() -> None:
    steps = [4, 1, 0, 2, 4, 3]
    # Position i counts the steps whose draft token i was accepted.
    per_position = [sum(n > i for n in steps) for i in range(4)]
    outcome = Outcome.from_totals(
        steps=len(steps),
        drafted_tokens=4 * len(steps),
        accepted_tokens=sum(steps),
        accepted_per_position=per_position,
        draft_time_s=0.2,
        verify_time_s=0.6,
        plain_token_time_s=0.0,
    )
    assert sorted(outcome.accepted_per_step) == sorted(steps)
    assert outcome.drafted_per_step == (4,) * 6
    assert outcome.acceptance_counts(4) == (14, 4)
    assert outcome.plain_token_time_s is None  # 0 on the wire means "not measured"


def test_totals_with_the_decisions_k_keep_empty_lookups_apart_from_short_drafts() -> None:
    """k = 4; six steps drafted 4 and accepted all, four lookups found nothing: as totals
    (10 steps, 24 drafted, 24 accepted) k was taken as round(24 / 10) = 2, the accepts past
    position 2 were lost and each step read as a draft of 2: (12, 4) for the truth's
    (24, 4). With the decision's k the steps are the truth's."""
    truth = Outcome.from_steps(
        [4] * 6 + [0] * 4, [4] * 6 + [0] * 4, draft_time_s=0.1, verify_time_s=0.5
    )
    outcome = Outcome.from_totals(
        steps=10,
        drafted_tokens=24,
        accepted_tokens=24,
        accepted_per_position=[6, 6, 6, 6],
        draft_time_s=0.1,
        verify_time_s=0.5,
        draft_length=4,
    )
    assert outcome.acceptance_counts(4) == truth.acceptance_counts(4) == (24, 4)
    assert outcome.drafted_per_step == truth.drafted_per_step
    assert outcome.generated_tokens == truth.generated_tokens == 34
    # A short last draft (the budget's end) keeps its accepts within what it drafted.
    short = Outcome.from_totals(
        steps=4, drafted_tokens=13, accepted_tokens=10, accepted_per_position=[4, 3, 3],
        draft_time_s=0.1, verify_time_s=0.5, draft_length=4,
    )  # fmt: skip
    assert short.drafted_per_step == (4, 4, 4, 1)
    assert short.accepted_per_step == (3, 3, 3, 1)
    # Ten steps that each drafted 2 of k = 4 and kept them: more steps accepted a token
    # than "k or nothing" has drafting steps (10 > 5), so they are short drafts.
    halves = Outcome.from_totals(
        steps=10, drafted_tokens=20, accepted_tokens=20, accepted_per_position=[10, 10],
        draft_time_s=0.1, verify_time_s=0.5, draft_length=4,
    )  # fmt: skip
    assert halves.drafted_per_step == (2,) * 10 and halves.accepted_tokens == 20
    assert halves.acceptance_counts(2) == (20, 0)


def test_outcome_from_totals_without_positions_spreads_the_total() -> None:
    outcome = Outcome.from_totals(
        steps=4, drafted_tokens=16, accepted_tokens=10, draft_time_s=0.1, verify_time_s=0.2
    )
    assert sorted(outcome.accepted_per_step) == [2, 2, 3, 3]
    assert outcome.accepted_tokens == 10


def test_outcome_from_totals_for_plain_decoding() -> None:
    outcome = Outcome.from_totals(
        steps=0,
        drafted_tokens=0,
        accepted_tokens=0,
        draft_time_s=0.0,
        verify_time_s=0.5,
        generated_tokens=50,
    )
    assert outcome.steps == 0 and outcome.generated_tokens == 50


@pytest.mark.parametrize(
    ("drafted", "accepted", "positions", "drafted_per_step", "accepted_per_step"),
    [
        # Steps that all decoded plainly: the steps' list was built twice over (a strict
        # zip then refused the report with a message that named no field).
        (0, 0, (), [0] * 10, [0] * 10),
        # Fewer drafted tokens than half the steps rounded to k = 0, and were lost.
        (4, 2, (), [1] * 4 + [0] * 6, [1, 1] + [0] * 8),
        (4, 2, (2,), [1] * 4 + [0] * 6, [1, 1] + [0] * 8),
    ],
)
def test_outcome_from_totals_with_few_or_no_drafts(
    drafted: int,
    accepted: int,
    positions: tuple[int, ...],
    drafted_per_step: list[int],
    accepted_per_step: list[int],
) -> None:
    outcome = Outcome.from_totals(
        steps=10,
        drafted_tokens=drafted,
        accepted_tokens=accepted,
        accepted_per_position=positions,
        draft_time_s=0.0,
        verify_time_s=0.1,
    )
    assert list(outcome.drafted_per_step) == drafted_per_step
    assert list(outcome.accepted_per_step) == accepted_per_step


@pytest.mark.parametrize("positions", [(), (80, 40)])
def test_totals_of_short_drafts_keep_every_drafted_and_accepted_token(
    positions: tuple[int, ...],
) -> None:
    """149 tokens drafted over 100 steps (a stop rule's short drafts): a k of the rounded
    mean kept 100 of them and 80 of 120 accepts, and the draft time over 100 overpriced
    the drafter 1.5x."""
    outcome = Outcome.from_totals(
        steps=100,
        drafted_tokens=149,
        accepted_tokens=120,
        accepted_per_position=positions,
        draft_time_s=0.149,
        verify_time_s=2.0,
        draft_length=4,
    )
    assert (outcome.drafted_tokens, outcome.accepted_tokens) == (149, 120)
    assert sorted(set(outcome.drafted_per_step)) == [1, 2]


def test_totals_of_stopped_drafts_keep_the_accepts_past_a_short_drafts_length() -> None:
    """A stop rule's drafts, per step [4, 4, 1 x 8] accepting [4, 4, 1 x 6, 0, 0], sent as
    totals with positions (8, 2, 2, 2): a spread's k (2) cut the accepts past it, 14 read
    as 10 and (10, 6) for the truth's (14, 2)."""
    truth = Outcome.from_steps(
        [4, 4] + [1] * 8, [4, 4] + [1] * 6 + [0, 0], draft_time_s=0.1, verify_time_s=0.2
    )
    outcome = Outcome.from_totals(
        steps=10,
        drafted_tokens=16,
        accepted_tokens=14,
        accepted_per_position=(8, 2, 2, 2),
        draft_time_s=0.1,
        verify_time_s=0.2,
        draft_length=4,
    )
    assert outcome.acceptance_counts(4) == truth.acceptance_counts(4) == (14, 2)
    assert sorted(outcome.drafted_per_step) == sorted(truth.drafted_per_step)


def test_check_state_refuses_other_versions_and_policies() -> None:
    check_state({"version": 1, "policy": "ucb"}, "ucb")
    with pytest.raises(IncompatibleStateError, match="format version 99"):
        check_state({"version": 99, "policy": "ucb"}, "ucb")
    with pytest.raises(IncompatibleStateError, match="saved by policy 'ucb'"):
        check_state({"version": 1, "policy": "ucb"}, "thompson")


def test_a_contexts_choice_is_made_among_the_drafters_served() -> None:
    """A fleet serves only its configurations: the state's choice is among them."""
    from router.policy.base import ArmSummary, ContextSummary

    arms = (
        ArmSummary("code", 0.8, 8.0, 2.0, 7, 2.1, 0),
        ArmSummary("ngram", 0.5, 5.0, 5.0, 3, 1.6, 4),
        ArmSummary("generic", 0.3, 3.0, 7.0, 3, 1.2, 1),
        ArmSummary("chat", 0.1, 1.0, 9.0, 0, 1.0, 0),
    )
    summary = ContextSummary("code", 1, arms, "code", 7, 5)
    assert summary.chosen_among({"code", "ngram"}) is summary
    served = summary.chosen_among({"ngram", "generic"})
    assert (served.chosen_drafter, served.chosen_k, served.arms) == ("ngram", 3, arms)
    assert summary.chosen_among({"chat"}).chosen_drafter == "none"
    assert summary.chosen_among({"chat"}).chosen_k == 0
    plain = ContextSummary("code", 1, arms, "none", 0, 5)
    assert plain.chosen_among(set()) is plain
