"""The multitask corpus: seeded, split by source item, in Qwen chat format, with answers a
tiny target can derive from its prompt."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks.world.corpus import (
    TASKS,
    Corpus,
    Example,
    build_corpus,
    math_answer,
    prompt_text,
    qa_answer,
)
from benchmarks.world.tasks.documents import key_phrases, section_pools
from benchmarks.world.tasks.translation import LANGUAGES


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return build_corpus(seed=0, scale="tiny")


@pytest.fixture(scope="module")
def small() -> Corpus:
    return build_corpus(seed=0, scale="small")


def test_same_seed_gives_the_same_corpus(corpus: Corpus) -> None:
    again = build_corpus(seed=0, scale="tiny")
    assert again.train == corpus.train
    assert again.test == corpus.test


def test_another_seed_gives_another_corpus(corpus: Corpus) -> None:
    other = build_corpus(seed=1, scale="tiny")
    assert [e.messages for e in other.train] != [e.messages for e in corpus.train]


def test_every_task_is_in_every_split(corpus: Corpus) -> None:
    for split in ("train", "validation", "test"):
        assert {e.task for e in corpus.split(split)} == set(TASKS)


def test_test_split_uses_held_out_wording(small: Corpus) -> None:
    for task in ("translation", "summarization", "code"):
        first = {prompt_text(e).split("\n")[0][:25] for e in small.by_task("train", task)}
        held = {prompt_text(e).split("\n")[0][:25] for e in small.by_task("test", task)}
        assert not first & held, task


def test_messages_are_qwen_turns_ending_with_the_user(corpus: Corpus) -> None:
    for example in corpus.train + corpus.test:
        roles = [m["role"] for m in example.messages]
        assert roles[-1] == "user"
        assert set(roles) <= {"system", "user", "assistant"}
        assert example.response.strip()


def test_chat_is_multi_turn_and_prompt_text_has_system_and_last_user_turn(small: Corpus) -> None:
    chats = small.by_task("train", "chat")
    assert any(sum(m["role"] == "user" for m in e.messages) >= 2 for e in chats)
    rag = next(e for e in small.by_task("train", "rag") if e.messages[0]["role"] == "system")
    text = prompt_text(rag)
    assert text.startswith(rag.messages[0]["content"])
    assert text.endswith(rag.messages[-1]["content"])


def test_example_round_trips_through_json(corpus: Corpus) -> None:
    example = corpus.test[0]
    assert Example.from_dict(json.loads(example.to_json())) == example


def test_answers_have_realistic_length(small: Corpus) -> None:
    """Multi-sentence answers (words, not tokens: the tokenizer is trained later)."""

    def mean_words(task: str) -> float:
        rows = small.by_task("test", task)
        return sum(len(e.response.split()) for e in rows) / len(rows)

    long_tasks = [t for t in TASKS if mean_words(t) >= 25]
    assert len(long_tasks) >= 5, {t: mean_words(t) for t in TASKS}


def test_copy_tasks_answer_from_their_prompt(small: Corpus) -> None:
    """summarization, qa and rag references are sentences of the passage in the prompt."""
    for split in ("train", "test"):
        for example in small.by_task(split, "summarization"):
            prompt = example.messages[-1]["content"]
            for line in example.response.split("\n"):
                assert line.removeprefix("- ") in prompt
        for example in small.by_task(split, "rag"):
            quoted = example.response.split('": ', 1)[1]
            assert quoted in example.messages[-1]["content"]
        passages = [e for e in small.by_task(split, "qa") if len(prompt_text(e)) > 200]
        assert passages
        assert all(e.response in e.messages[-1]["content"] for e in passages)


def test_qa_test_split_is_reading_comprehension_and_training_also_closed_book(
    small: Corpus,
) -> None:
    assert all(e.response in e.messages[-1]["content"] for e in small.by_task("test", "qa"))
    closed = [e for e in small.by_task("train", "qa") if e.response not in prompt_text(e)]
    assert closed
    assert qa_answer("The language code for German is de.") == "de"


def test_key_phrases_occur_once_in_the_passage() -> None:
    sentence = "You can renew your registration online and print a temporary document."
    others = "Registration fees depend on the vehicle weight."
    phrases = key_phrases(sentence, others)
    assert "temporary document" in phrases
    assert all(p.lower() not in others.lower() for p in phrases)
    assert not any("," in p or p.split()[0].lower() == "you" for p in phrases)


def test_translation_spans_languages_and_directions(small: Corpus) -> None:
    prompts = [prompt_text(e) for e in small.by_task("train", "translation")]
    named = {name for name in LANGUAGES.values() for p in prompts if name in p}
    assert len(named) >= 6
    assert any(("English" in p and "into English" in p) or "to English" in p for p in prompts)


def test_math_solutions_stay_in_the_small_table_and_end_with_the_answer(small: Corpus) -> None:
    # One operation "a op b = c", not the tail of a chained check ("2 * 3 + 3 = 6 + 3").
    step = re.compile(r"(?<![-+*/] )\b(\d+) ([-+*/]) (\d+) = (\d+)")
    for example in small.by_task("test", "math") + small.by_task("validation", "math"):
        assert example.response.splitlines()[-1].startswith("The answer is ")
        found = step.findall(example.response)
        assert found, example.response
        for a, operation, b, result in found:
            assert max(int(a), int(b), int(result)) <= 10, example.response
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}.get(
                operation, int(a) // int(b)
            )
            assert value == int(result), example.response


def test_math_answer_reads_the_final_number() -> None:
    assert math_answer("3 + 4 = 7. The answer is 7.") == "7"
    assert math_answer("12 - 5 = 7. The answer is 17.") == "17"
    assert math_answer("Divide: x = 6 / 2 = 3.\nThe answer is x = 3.") == "3"
    assert math_answer("no answer") == ""


def test_summarization_and_rag_test_sections_come_from_held_out_documents() -> None:
    pools = section_pools()
    train_documents = {s.document for s in pools["train"]}
    assert pools["test"]
    assert not {s.document for s in pools["test"]} & train_documents


def test_unknown_scale_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown scale"):
        build_corpus(scale="huge")
