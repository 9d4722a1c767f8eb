"""The onnxruntime path: odd inputs, chat messages, OOD flag, similarity, load errors."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from classifiers import ClassifierLoadError, OnnxTaskClassifier, TaskClassifier
from classifiers.text import LabeledPrompt
from tests.classifiers.synthetic import UNRELATED_TEXTS, synthetic_prompts


def test_satisfies_the_protocol(classifier: OnnxTaskClassifier) -> None:
    assert isinstance(classifier, TaskClassifier)
    assert classifier.labels == ("code", "math", "summarize", "translate")


def test_empty_text_is_a_clear_out_of_distribution_result(classifier: OnnxTaskClassifier) -> None:
    result = classifier.classify("")
    assert result.out_of_distribution
    assert result.cluster in classifier.labels
    assert 0.0 < result.probability < 1.0


def test_very_long_text_is_classified(classifier: OnnxTaskClassifier) -> None:
    text = ("please translate this french sentence into german " * 2100)[:100_000]
    assert len(text) == 100_000
    result = classifier.classify(text)
    assert result.cluster == "translate"
    assert not result.out_of_distribution


def test_non_ascii_and_emoji(classifier: OnnxTaskClassifier) -> None:
    assert classifier.classify("😀🚀 東京 ñandú ÉÉÉ").out_of_distribution
    # In the training prompts' format (one line ending in "?"; see the format-rule test).
    mixed = classifier.classify("😀 Solve the équation prime number 🚀 sum divisible remainder?")
    assert mixed.cluster == "math"
    assert not mixed.out_of_distribution


def test_non_string_input_is_a_clear_error(classifier: OnnxTaskClassifier) -> None:
    with pytest.raises(TypeError, match="must be str"):
        classifier.classify(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be str"):
        classifier.classify_batch(["ok", 3])  # type: ignore[list-item]


def test_unrelated_text_is_flagged(classifier: OnnxTaskClassifier) -> None:
    assert all(r.out_of_distribution for r in classifier.classify_batch(list(UNRELATED_TEXTS)))


def test_a_text_is_decided_alike_alone_and_in_a_batch(
    classifier: OnnxTaskClassifier, test_prompts: list[LabeledPrompt]
) -> None:
    # Each row's decision reads only its own scores and format, flagged texts included
    # (unrelated words; known words in an unseen format); an empty batch decides nothing.
    passages = "\n".join(f"[{n}] solve the prime number sum ({n}); {n * 17}." for n in (1, 2))
    texts = [p.text for p in test_prompts[:20]] + list(UNRELATED_TEXTS) + [passages, ""]
    batch = classifier.classify_batch(texts)
    assert {r.out_of_distribution for r in batch} == {True, False}
    for text, result in zip(texts, batch, strict=True):
        single = classifier.classify(text)
        assert single.cluster == result.cluster
        assert single.probability == pytest.approx(result.probability, abs=1e-6)
        assert single.out_of_distribution == result.out_of_distribution
    assert classifier.classify_batch([]) == []


def test_decisions_follow_the_scores_and_thresholds(
    classifier: OnnxTaskClassifier, test_prompts: list[LabeledPrompt]
) -> None:
    # The rule, row by row: the most probable cluster; out of distribution when its
    # probability, the best centroid cosine or the format distance misses its threshold.
    ood = classifier.metadata.ood
    assert ood.format_profile is not None and ood.max_format_distance is not None
    passages = "\n".join(f"[{n}] solve the prime number sum ({n}); {n * 17}." for n in (1, 2))
    texts = [p.text for p in test_prompts[:20]] + list(UNRELATED_TEXTS) + [passages, "", "?"]
    scores = classifier.scores(texts)
    results = classifier.classify_batch(texts)
    for text, probabilities, cosines, result in zip(
        texts, scores.probabilities, scores.centroid_cosine, results, strict=True
    ):
        best = int(np.argmax(probabilities))
        assert result.cluster == classifier.labels[best]
        assert result.probability == float(probabilities[best])
        distance = float(ood.format_profile.distances([text], [best])[0])
        assert result.out_of_distribution == (
            result.probability < ood.min_probability
            or float(cosines.max()) < ood.min_centroid_cosine
            or distance > ood.max_format_distance
        )
    assert {r.out_of_distribution for r in results} == {True, False}


def test_messages_use_system_prompt_and_last_user_turn(classifier: OnnxTaskClassifier) -> None:
    messages = [
        {"role": "system", "content": "You help with language questions."},
        {"role": "user", "content": "solve the equation prime number sum remainder"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "translate this sentence into french and german"},
    ]
    assert classifier.classify_messages(messages).cluster == "translate"


def test_a_text_in_qwens_chat_format_is_classified_by_its_messages(
    classifier: OnnxTaskClassifier,
) -> None:
    from tests.classifiers.test_text import rendered

    texts = [p.text for p in synthetic_prompts(8, seed=3)]
    chats = [[{"role": "user", "content": text}] for text in texts]
    as_sent = [rendered(chat) for chat in chats]
    assert classifier.classify_batch(as_sent) == classifier.classify_batch(texts)
    for text, chat, sent in zip(texts, chats, as_sent, strict=True):  # a lone text too
        assert classifier.classify(sent) == classifier.classify_messages(chat)
        assert classifier.classify(sent) == classifier.classify(text)
    assert classifier.similarity(as_sent) == classifier.similarity(texts)


def test_similarity_ranks_the_source_cluster_first(classifier: OnnxTaskClassifier) -> None:
    for task in classifier.labels:
        sample = [p.text for p in synthetic_prompts(20, seed=7, tasks=(task,))]
        similarity = classifier.similarity(sample)
        assert set(similarity) == set(classifier.labels)
        assert max(similarity, key=similarity.__getitem__) == task
        assert similarity[task] > 0.3
    assert classifier.similarity([]) == dict.fromkeys(classifier.labels, 0.0)


def test_a_lone_surrogate_in_a_fine_tuning_sample_is_read_not_raised(
    classifier: OnnxTaskClassifier,
) -> None:
    """A drafter's fine-tuning sample comes from a file, unchecked: a lone surrogate made
    the graph's input unencodable and the registration fail with UnicodeEncodeError."""
    similarity = classifier.similarity(["broken \ud800 text", "plain text"])
    assert set(similarity) == set(classifier.labels)


def test_a_long_text_is_scored_in_a_run_of_its_own(
    classifier: OnnxTaskClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graph's tokenizer pads every row of a run to its longest: one 100k-character
    prompt in a Route batch of 64 made the batch take 216 ms (1.2 ms without it, 13 ms for
    it alone) and +200 MB. Long texts run alone; every text's scores stay its own."""
    from classifiers import runtime

    texts = ["translate this sentence please", "x " * 3000, "what is two plus two", "y"]
    alone = [classifier.scores([t]) for t in texts]
    monkeypatch.setattr(runtime, "LONG_TEXT_CHARS", 1000)
    runs: list[int] = []
    session_run = classifier._session.run

    def recorded(outputs: Any, feed: Any) -> Any:
        runs.append(len(feed[runtime.INPUT_NAME]))
        return session_run(outputs, feed)

    monkeypatch.setattr(classifier._session, "run", recorded)
    batch = classifier.scores(texts)
    assert sorted(runs) == [1, 3]  # the long one alone, the others together
    for row, single in enumerate(alone):
        np.testing.assert_allclose(batch.probabilities[row], single.probabilities[0], atol=1e-6)
        np.testing.assert_allclose(batch.centroid_cosine[row], single.centroid_cosine[0], atol=1e-6)


def test_load_errors_are_clear(tmp_path: Path, classifier_dir: Path) -> None:
    with pytest.raises(ClassifierLoadError, match="not a classifier directory"):
        OnnxTaskClassifier.load(tmp_path / "missing")
    copy = tmp_path / "copy"
    shutil.copytree(classifier_dir, copy)
    (copy / "classifier.json").unlink()
    with pytest.raises(ClassifierLoadError, match=r"classifier\.json is missing"):
        OnnxTaskClassifier.load(copy)
    shutil.copy(classifier_dir / "classifier.json", copy / "classifier.json")
    (copy / "classifier.onnx").unlink()
    with pytest.raises(ClassifierLoadError, match=r"cannot read classifier\.onnx"):
        OnnxTaskClassifier.load(copy)


def test_known_words_in_an_unseen_format_are_flagged(classifier: OnnxTaskClassifier) -> None:
    # Synthetic training prompts are one line ending in "?"; the same math words laid out
    # as numbered retrieved passages share the vocabulary but not the format.
    words = "solve the equation prime number sum divisible remainder"
    assert not classifier.classify(words.capitalize() + "?").out_of_distribution
    passages = "\n".join(f"[{n}] {words} ({n}); {words}: {n * 17}." for n in range(1, 4))
    unseen = classifier.classify(f"{passages}\n\nQuestion: what does [2] say?")
    assert unseen.cluster == "math"
    assert unseen.probability >= classifier.metadata.ood.min_probability
    assert unseen.out_of_distribution


def test_format_rule_is_calibrated_and_stored(classifier: OnnxTaskClassifier) -> None:
    ood = classifier.metadata.ood
    assert ood.format_profile is not None and ood.max_format_distance is not None
    assert len(ood.format_profile.means) == len(classifier.labels)
    assert ood.calibration_false_flags <= ood.false_flag_rate + 1e-9


def test_serving_a_classifier_imports_neither_scikit_learn_nor_onnx() -> None:
    """Loading and serving a classifier (the runtime, the bundle's cached classifier) needs
    onnxruntime only: scikit-learn and onnx, for training and export, cost a sidecar about
    0.6 s of its start-up (4.1 -> 3.5 s to serving, tiny world, 2026-12-04)."""
    import subprocess
    import sys

    code = (
        "import sys, classifiers.runtime, classifiers.world, classifiers.holder; "
        "print(sorted(m for m in ('onnx', 'sklearn', 'skl2onnx') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
