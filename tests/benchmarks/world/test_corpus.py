"""The multitask corpus: seeded, split cleanly, in Qwen chat format."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks.world.corpus import (
    KNOWLEDGE_BASE_SIZE,
    TASKS,
    Corpus,
    Example,
    build_corpus,
    knowledge_base,
    math_answer,
    prompt_text,
)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return build_corpus(seed=0, scale="tiny")


@pytest.fixture(scope="module")
def big() -> Corpus:
    return build_corpus(seed=0, scale="default")


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


def test_test_prompts_never_occur_in_training(corpus: Corpus) -> None:
    train_prompts = {prompt_text(e) for e in corpus.train}
    assert not train_prompts & {prompt_text(e) for e in corpus.test}
    assert not {e.id for e in corpus.train} & {e.id for e in corpus.test}


def test_test_split_uses_held_out_wording(big: Corpus) -> None:
    for task in ("translation", "summarization", "math", "code"):
        first_lines = {prompt_text(e).split("\n")[0][:25] for e in big.by_task("train", task)}
        test_lines = {prompt_text(e).split("\n")[0][:25] for e in big.by_task("test", task)}
        assert not first_lines & test_lines, task


def test_messages_are_qwen_turns_ending_with_the_user(corpus: Corpus) -> None:
    for example in corpus.train + corpus.test:
        roles = [m["role"] for m in example.messages]
        assert roles[-1] == "user"
        assert set(roles) <= {"system", "user", "assistant"}
        assert example.response.strip()


def test_chat_is_multi_turn_and_prompt_text_has_system_and_last_user_turn(big: Corpus) -> None:
    chats = big.by_task("train", "chat")
    assert any(sum(m["role"] == "user" for m in e.messages) >= 2 for e in chats)
    rag = big.by_task("test", "rag")[0]
    text = prompt_text(rag)
    assert text.startswith(rag.messages[0]["content"])
    assert text.endswith(rag.messages[-1]["content"])


def test_example_round_trips_through_json(corpus: Corpus) -> None:
    example = corpus.test[0]
    assert Example.from_dict(json.loads(example.to_json())) == example


def test_tasks_differ_in_prompt_length(big: Corpus) -> None:
    def mean_prompt(task: str) -> float:
        rows = big.by_task("train", task)
        return sum(len(prompt_text(e)) for e in rows) / len(rows)

    assert mean_prompt("rag") > 4 * mean_prompt("qa")


def test_math_answer_reads_the_final_number() -> None:
    assert math_answer("3 + 4 = 7. The answer is 7.") == "7"
    assert math_answer("12 - 5 = 7. The answer is 17.") == "17"
    assert math_answer("no answer") == ""


def test_unknown_scale_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown scale"):
        build_corpus(scale="huge")


def test_summarization_and_rag_answer_from_the_fixed_knowledge_base(big: Corpus) -> None:
    leads = {section.sentences[0] for section in knowledge_base()}
    assert len(leads) == KNOWLEDGE_BASE_SIZE
    for split in ("train", "test"):
        for task in ("summarization", "rag"):
            examples = big.by_task(split, task)
            assert examples and all(e.response in leads for e in examples)
            # The answer is in the prompt: the copy-heavy property the drafters see.
            assert all(e.response in e.messages[-1]["content"] for e in examples)


def test_translation_asks_for_two_labels_and_math_stays_in_the_small_tables(big: Corpus) -> None:
    for example in big.by_task("test", "translation") + big.by_task("train", "translation"):
        assert example.response.count(" | ") == 1
    worked_step = re.compile(r"(\d+) ([-+*]) (\d+) = \d+\. The answer is \d+\.")
    for example in big.by_task("train", "math"):
        step = worked_step.fullmatch(example.response)
        if step is None:
            continue  # a real CHAMP solution
        a, operation, b = step.groups()
        limit = 4 if operation == "*" else 9
        assert int(a) <= limit and int(b) <= limit
