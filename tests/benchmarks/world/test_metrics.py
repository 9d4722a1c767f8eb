"""Quality metrics and acceptance bookkeeping of the world evaluation."""

from __future__ import annotations

import pytest

from benchmarks.world.evaluate import (
    acceptance_of_matches,
    answer_contained,
    chrf,
    exact_match,
    math_correct,
    token_f1,
    unevenness,
)


def test_token_f1() -> None:
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("dog", "the cat sat") == 0.0
    assert token_f1("the cat", "the cat sat") == pytest.approx(0.8)


def test_chrf_scores_characters_so_japanese_and_inflections_get_credit() -> None:
    assert chrf("Le chat est noir", "Le chat est noir") == 1.0
    assert chrf("Le chat", "Le chat est noir") < chrf("Le chat est noi", "Le chat est noir") < 1.0
    assert chrf("abc", "xyz") == 0.0
    assert 0.0 < chrf("選択された", "選択された項目") < 1.0  # no spaces: word F1 would give 0
    assert chrf("Le  chat", "Le chat") == 1.0  # whitespace is not scored


def test_exact_match_ignores_whitespace_only() -> None:
    assert exact_match(" Enregistrer |  Supprimer", "Enregistrer | Supprimer") == 1.0
    assert exact_match("Enregistrer", "enregistrer") == 0.0


def test_answer_contained_checks_the_short_answer_as_whole_words() -> None:
    reference = "The language code for German is de."
    assert answer_contained("It is de.", reference) == 1.0
    assert answer_contained("It is dev.", reference) == 0.0
    assert answer_contained("Speakers of Welsh call it Cymraeg.", "cy is the code for Welsh.")


def test_math_correct_compares_final_numbers() -> None:
    assert math_correct("3 + 4 = 7. The answer is 7.", "3 + 4 = 7. The answer is 7.") == 1.0
    assert math_correct("3 + 4 = 8. The answer is 8.", "3 + 4 = 7. The answer is 7.") == 0.0


def test_acceptance_counts_the_drafts_the_engine_makes() -> None:
    """Replayed as the engine runs (token 0 is the prefill's, k drafts a step, fewer only
    where max_new_tokens leaves less room): the counts were taken from token 0 and capped
    at the output's end, too few drafts before an EOS and too many at the budget."""
    t, f = True, False
    # Ended by EOS: the step at token 4 drafts 4 (the drafter cannot know the end is
    # near) and matches nothing; the last, censored by the end, is left out.
    before_eos = acceptance_of_matches([[t, f, f, f, f, t]], 4)
    assert (before_eos.accepted, before_eos.drafted, before_eos.steps) == (0, 16, 4)
    # Ended by the budget (6 tokens): the second step may draft 3 (6 - 2 - 1), all kept.
    at_budget = acceptance_of_matches([[t, f, t, t, t, t]], 4, max_new_tokens=6)
    assert (at_budget.accepted, at_budget.drafted, at_budget.steps) == (3, 7, 2)
    assert acceptance_of_matches([[t, t, t, t, t, t]], 4, max_new_tokens=6).drafted == 4


def test_unevenness() -> None:
    even = unevenness([0.5, 0.5])
    assert even["jain_index"] == pytest.approx(1.0)
    assert even["coefficient_of_variation"] == 0.0
    spread = unevenness([0.2, 0.8])
    assert spread["max_over_min"] == pytest.approx(4.0)
    assert spread["jain_index"] < 1.0
