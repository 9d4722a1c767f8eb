"""The n-gram (prompt-lookup) drafter on tiny hand-written arrays."""

from __future__ import annotations

import torch

from drafters.ngram import NgramDrafter, NgramIndex


def test_proposes_the_continuation_of_the_longest_suffix_match() -> None:
    index = NgramIndex(min_n=1, max_n=3)
    # Suffix (7, 8, 9) occurred at 0..2, followed by 1, 2; (9) alone last occurred before 5.
    history = [7, 8, 9, 1, 2, 9, 5, 6, 7, 8, 9]
    assert index.propose(history, 2) == [1, 2]


def test_prefers_the_latest_occurrence_of_equally_long_matches() -> None:
    index = NgramIndex(min_n=1, max_n=2)
    assert index.propose([3, 4, 1, 3, 4, 2, 3, 4], 1) == [2]


def test_no_match_proposes_nothing_and_the_suffix_never_matches_itself() -> None:
    index = NgramIndex(min_n=2, max_n=3)
    assert index.propose([1, 2, 3, 4], 3) == []
    assert NgramIndex().propose([5], 4) == []


def test_a_copy_running_past_the_end_continues_the_cycle() -> None:
    index = NgramIndex(min_n=1, max_n=3)
    # Period-2 cycle: the match of (1, 2, 1) ends at 3, and the copy wraps into itself.
    assert index.propose([1, 2, 1, 2, 1], 5) == [2, 1, 2, 1, 2]


def test_the_index_grows_incrementally_as_the_history_grows() -> None:
    index = NgramIndex(min_n=1, max_n=2)
    history = [4, 5, 6]
    assert index.propose(history, 2) == []
    history += [4]
    assert index.propose(history, 2) == [5, 6]
    history += [9, 4]
    assert index.propose(history, 2) == [9, 4]  # (4) last continued with 9 now


def test_counterfactual_replays_greedy_steps() -> None:
    drafter = NgramDrafter(name="ngram", device=torch.device("cpu"), min_n=1, max_n=2)
    prompt = [1, 2, 3]
    # The prefill emits 4; steps start after it. Step 1 at history [1,2,3,4]: no earlier
    # 4 -> nothing drafted, emits 1. Step 2 at [..., 4, 1]: (4, 1)? no; (1) -> drafts
    # 2, 3: both verified, emits 9 as the bonus/correction. Step 3 at [..., 1, 2, 3, 9]:
    # (9)? no -> emits 9 alone.
    output = [4, 1, 2, 3, 9, 9]
    assert drafter.score_counterfactual(prompt, output, 2) == [0, 2, 0]
    assert drafter.score_counterfactual(prompt, output, 0) == [0] * 5
    # Its drafted counts tell the lookups that found nothing (steps 1 and 3) from a match
    # rejected at once, which the accepts alone cannot.
    assert drafter.score_counterfactual_drafts(prompt, output, 2) == ([0, 2, 0], [0, 2, 0])
    assert drafter.score_counterfactual_drafts([1, 2, 3, 4], [1, 7, 7], 2) == ([2, 0], [0, 0])
    # A last copy that runs to the output's end is no rejection: the accepts leave it out,
    # the drafted counts keep it as a step that drafted what it kept (a matched start,
    # which the engine records so: it asks for fewer drafts there, or cuts at a stop).
    # The prefill emits 3; steps 1 and 2 find nothing ((3) and (9) have no earlier
    # continuation); step 3 reads (5) -> 7, 8, 1, 2, and the output's last tokens 7, 8, 1
    # keep three of them.
    prompt, output = [5, 7, 8, 1, 2], [3, 9, 5, 7, 8, 1]
    assert drafter.score_counterfactual(prompt, output, 4) == [0, 0]
    assert drafter.score_counterfactual_drafts(prompt, output, 4) == ([0, 0, 3], [0, 0, 3])
