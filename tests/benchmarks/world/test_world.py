"""The tiny built world: layout, shared tokenizer, caching, and its evaluation report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.world.build import (
    BUILD_CONFIGS,
    HEAD_DIM,
    ModelShape,
    NotAWorldDirectoryError,
    build_world,
    existing_manifest,
    refuse_foreign_directory,
)
from benchmarks.world.corpus import TASKS, prompt_text
from benchmarks.world.layout import read_examples
from router.bundle import ModelBundle


def test_world_has_a_target_and_one_drafter_per_task(tiny_world: ModelBundle) -> None:
    assert tiny_world.scale == "tiny"
    assert tiny_world.tasks == TASKS
    assert list(tiny_world.drafter_dirs) == ["generic", *TASKS]
    for directory in [tiny_world.target_dir, *tiny_world.drafter_dirs.values()]:
        assert (directory / "config.json").is_file()
        assert list(directory.glob("*.safetensors"))
        assert not list(directory.glob("*.bin"))
    assert tiny_world.manifest["config_hash"] == BUILD_CONFIGS["tiny"].digest()


def test_drafters_share_the_targets_tokenizer_and_vocabulary(tiny_world: ModelBundle) -> None:
    from drafters.loader import load_model

    target = load_model(tiny_world.target_dir)
    assert type(target.model).__name__ == "Qwen2ForCausalLM"
    target_vocab = target.tokenizer.get_vocab()
    for directory in tiny_world.drafter_dirs.values():
        drafter = load_model(directory)
        assert type(drafter.model).__name__ == "Qwen2ForCausalLM"
        assert drafter.tokenizer.get_vocab() == target_vocab
        assert drafter.model.config.vocab_size == target.model.config.vocab_size
        assert drafter.parameter_count < target.parameter_count


def test_every_model_has_heads_of_64_with_grouped_query_attention(
    tiny_world: ModelBundle,
) -> None:
    for directory in [tiny_world.target_dir, *tiny_world.drafter_dirs.values()]:
        config = json.loads((directory / "config.json").read_text())
        assert config["hidden_size"] // config["num_attention_heads"] == HEAD_DIM == 64
        assert config["num_key_value_heads"] < config["num_attention_heads"], directory.name
    for scale, config in BUILD_CONFIGS.items():
        for shape in (config.target, config.drafter):
            assert shape.head_dim == HEAD_DIM, scale
            assert shape.num_key_value_heads < shape.num_attention_heads, scale
    assert tiny_world.manifest["head_dim"] == {"target": 64, "drafter": 64}


def test_a_shape_whose_heads_do_not_divide_is_refused() -> None:
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads"):
        ModelShape(100, 256, 2, 3, 1)
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        ModelShape(384, 256, 2, 6, 4)


def test_the_manifest_records_the_build_time(tiny_world: ModelBundle) -> None:
    seconds = tiny_world.manifest["build_seconds"]
    assert 0 < seconds == round(tiny_world.manifest["timings"]["total_s"], 1)


def test_task_drafters_differ_from_the_generic_one(tiny_world: ModelBundle) -> None:
    from safetensors.torch import load_file

    generic = load_file(str(tiny_world.drafter_dirs["generic"] / "model.safetensors"))
    tuned = load_file(str(tiny_world.drafter_dirs["qa"] / "model.safetensors"))
    assert generic.keys() == tuned.keys()
    assert any(not generic[k].equal(tuned[k]) for k in generic)


def test_longer_distillation_applies_to_its_tasks_only() -> None:
    distill = BUILD_CONFIGS["default"].distill
    assert set(distill.longer) <= set(BUILD_CONFIGS["default"].target_task_weights)
    for task, (steps, batches) in distill.longer.items():
        training, task_batches = distill.for_task(task)
        assert (training.steps, task_batches) == (steps, batches)
        assert training.learning_rate == distill.training.learning_rate
    assert distill.for_task("chat") == (distill.training, distill.batches)
    assert BUILD_CONFIGS["tiny"].distill.longer == {}


def test_drafters_carry_a_sample_of_their_finetuning_data(tiny_world: ModelBundle) -> None:
    train_prompts = {
        prompt_text(e) for e in read_examples(tiny_world.corpus_dir, "train") if e.task == "math"
    }
    path = tiny_world.drafter_dirs["math"] / "finetune_sample.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows
    assert all(row["task"] == "math" and row["text"] in train_prompts for row in rows)


def test_corpus_files_hold_the_splits(tiny_world: ModelBundle) -> None:
    train, test = (
        read_examples(tiny_world.corpus_dir, "train"),
        read_examples(tiny_world.corpus_dir, "test"),
    )
    assert {e.split for e in train} == {"train"}
    assert {e.task for e in test} == set(TASKS)
    assert not {prompt_text(e) for e in train} & {prompt_text(e) for e in test}
    with pytest.raises(ValueError, match="unknown split"):
        read_examples(tiny_world.corpus_dir, "dev")


def test_second_build_is_cached(tiny_world: ModelBundle) -> None:
    weights = tiny_world.target_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = build_world(tiny_world.root, "tiny", progress=False)
    assert again.root == tiny_world.root
    assert weights.stat().st_mtime_ns == before  # not trained again


def test_a_world_whose_manifest_is_damaged_is_built_anew(tmp_path: Path) -> None:
    """A manifest that is not JSON raised out of `world build` (a traceback); such a
    directory is a world's and is rebuilt like a stale one."""
    (tmp_path / "manifest.json").write_text("garbage{")
    (tmp_path / "target").mkdir()
    manifest = existing_manifest(tmp_path)
    assert manifest == {}  # no config hash: stale
    refuse_foreign_directory(tmp_path, manifest)  # not refused as an operator's directory
    assert existing_manifest(tmp_path / "absent") is None


def test_never_builds_over_a_directory_that_is_not_a_world(tmp_path: Path) -> None:
    precious = tmp_path / "models"
    precious.mkdir()
    (precious / "weights.safetensors").write_bytes(b"operator data")
    with pytest.raises(NotAWorldDirectoryError, match="not empty"):
        build_world(precious, "tiny", progress=False)
    assert (precious / "weights.safetensors").read_bytes() == b"operator data"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotAWorldDirectoryError, match="not a directory"):
        build_world(a_file, "tiny", progress=False)


@pytest.fixture(scope="module")
def report(tiny_world: ModelBundle) -> dict[str, Any]:
    from benchmarks.world.evaluate import evaluate_world

    return evaluate_world(tiny_world, limit=3)


def test_eval_report_has_the_documented_keys_and_ranges(report: dict[str, Any]) -> None:
    assert report["tasks"] == list(TASKS)
    assert report["drafters"] == ["generic", *TASKS]
    assert set(report["target_quality"]) == set(TASKS)
    assert all(0.0 <= q <= 1.0 for q in report["target_quality"].values())
    assert set(report["acceptance"]) == set(report["drafters"])
    for row in report["acceptance"].values():
        assert set(row) == set(TASKS)
        assert all(0.0 <= a <= 1.0 for a in row.values())
    for row in report["accepted_per_step"].values():
        assert all(0.0 <= a <= 4.0 for a in row.values())
    assert report["decode_step_ms"]["target"] > 0
    assert report["decode_step_ms"]["drafter_median"] > 0
    json.dumps(report)


def test_eval_report_has_output_lengths_head_sizes_and_build_time(
    report: dict[str, Any], tiny_world: ModelBundle
) -> None:
    from benchmarks.world.evaluate import MAX_NEW_TOKENS

    assert report["max_new_tokens"] == MAX_NEW_TOKENS == 128
    assert set(report["output_tokens"]) == set(TASKS)
    assert all(0 <= n <= MAX_NEW_TOKENS for n in report["output_tokens"].values())
    assert report["head_dim"] == {
        "target": 64,
        "drafters": dict.fromkeys(["generic", *TASKS], 64),
    }
    assert report["build_seconds"] == tiny_world.manifest["build_seconds"] > 0


def test_eval_cli_writes_the_json_report(tiny_world: ModelBundle, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from router.cli import build_app

    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        build_app(),
        ["world", "eval", "--world", str(tiny_world.root), "--json", str(out), "--limit", "1"],
    )
    assert result.exit_code == 0, result.output
    assert "Target quality" in result.output
    saved = json.loads(out.read_text())
    assert {"tasks", "target_quality", "acceptance", "drafters"} <= set(saved)
    assert {"output_tokens", "head_dim", "build_seconds"} <= set(saved)
    assert "output tokens" in result.output and "head_dim: target 64" in result.output


def test_a_stale_world_is_rebuilt_and_the_same_seed_builds_the_same_world(
    tiny_world: ModelBundle, tmp_path: Path
) -> None:
    """One build over a directory whose manifest has another config hash: it is built
    anew, nothing is left behind, and the new world equals the session's (same seed).

    Corpus and tokenizer byte for byte; weights to within float rounding. Builds in
    fresh processes matched to the last bit (six of six on 2026-12-04), but a second build
    late in a long test session once differed in the last bits: the CPU's matrix kernels
    may sum in another order when buffers land at other addresses. Another seed (or an
    unseeded step) moves every weight by about its init scale (~0.02), far past this
    tolerance."""
    import torch
    from safetensors.torch import load_file

    root = tmp_path / "world"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"config_hash": "old"}))
    again = build_world(root, "tiny", progress=False)
    assert again.manifest["config_hash"] == BUILD_CONFIGS["tiny"].digest()
    assert list(tmp_path.iterdir()) == [root], "no staging or stale directory left behind"
    for name in ("corpus/train.jsonl", "corpus/test.jsonl", "target/tokenizer.json"):
        assert (tiny_world.root / name).read_bytes() == (again.root / name).read_bytes(), name
    for name in ("target", "drafters/generic", "drafters/rag"):
        first = load_file(tiny_world.root / name / "model.safetensors")
        second = load_file(again.root / name / "model.safetensors")
        assert first.keys() == second.keys(), name
        for key, tensor in first.items():
            torch.testing.assert_close(
                second[key], tensor, rtol=0.0, atol=2e-3, msg=f"{name} {key}"
            )


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tiny_world: ModelBundle) -> None:
    from benchmarks.world.evaluate import generate_greedy
    from drafters.loader import load_model

    target = load_model(tiny_world.target_dir)
    test = read_examples(tiny_world.corpus_dir, "test")
    examples = [next(e for e in test if e.task == task) for task in TASKS]  # mixed lengths
    batched = generate_greedy(target, examples, batch_size=len(examples))
    alone = generate_greedy(target, examples, batch_size=1)
    assert [o.example for o in batched] == examples
    assert [o.output_ids for o in batched] == [o.output_ids for o in alone]
    assert all(o.output_ids.count(o.eos_id) <= 1 for o in batched)


def test_decode_steps_are_timed_in_interleaved_rounds_on_one_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every model is timed once per round, in turn, on one torch thread; each figure is
    the median over the rounds, so a busy spell during one model's pass does not become
    that model's cost. The caller's thread count is restored."""
    import torch

    from benchmarks.world import evaluate

    calls: list[tuple[str, int]] = []
    spell = {("a", 0)}  # the machine was busy while drafter a was timed in round 0

    def timed(model: str) -> float:
        round_ = sum(1 for name, _ in calls if name == model)
        calls.append((model, torch.get_num_threads()))
        return 10.0 if (model, round_) in spell else {"target": 5.0, "a": 1.0, "b": 1.0}[model]

    monkeypatch.setattr(evaluate, "decode_step_seconds", timed)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        target, drafters = evaluate.decode_step_times("target", {"a": "a", "b": "b"}, rounds=3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert [name for name, _ in calls] == ["target", "a", "b"] * 3
    assert {threads for _, threads in calls} == {1}
    assert target == 5.0
    assert drafters == {"a": 1.0, "b": 1.0}
