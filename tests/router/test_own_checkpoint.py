"""Serving your own checkpoint without surprises: a configured drafter for another vocabulary
stops ``specroute serve`` with one line and status 2; bundle drafters that do not fit your
target are left out with a warning; the bundle's drafters can be left out while ngram and
none stay; the dtype setting reaches the loaded models; weight digests are cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from router.launch import launch_sidecar
from router.pb import router_pb2 as pb
from router.pb import router_pb2_grpc
from router.settings import load_settings
from tests.router.conftest import COMPLETION_PROMPT, ServingWorld, SidecarThread

MISMATCHED_TOKEN = "<|not-in-the-target|>"  # the one token _mismatched_copy adds


def _vocabulary_size(model_dir: Path) -> int:
    from drafters.loader import load_tokenizer

    return len(load_tokenizer(model_dir).get_vocab())


def _extra_token_difference(world: ServingWorld) -> str:
    """How the mismatched copy's tokenizer differs from the world target's."""
    size = _vocabulary_size(world.world.target_dir)
    return (
        f"vocabulary sizes differ: target {size}, drafter {size + 1}; "
        f"first difference at id {size}: target absent, drafter {MISMATCHED_TOKEN!r}"
    )


def test_a_configured_drafter_for_another_vocabulary_stops_serve(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    config = serving_world.toml(tmp_path / "sidecar.toml")
    env = {
        **os.environ,
        "SPECROUTE_STATE_DIR": str(tmp_path / "state"),
        "SPECROUTE_DRAFTER_DIRS": json.dumps({"odd": str(serving_world.mismatched_dir)}),
    }
    command = [sys.executable, "-m", "router.cli", "serve", "--config", str(config)]
    command += ["--port", "0", "--http-port", "-1", "--metrics-port", "-1"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: drafter 'odd' at {serving_world.mismatched_dir} cannot draft for the target at "
        f"{serving_world.world.target_dir}: {_extra_token_difference(serving_world)}"
    ]


def test_a_classifier_directory_that_does_not_load_stops_serve_with_exit_2(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    """A settings error like the others (exit status 1 before)."""
    (tmp_path / "empty").mkdir()
    env = {
        **os.environ,
        "SPECROUTE_STATE_DIR": str(tmp_path / "state"),
        "SPECROUTE_CLASSIFIER_DIR": str(tmp_path / "empty"),
    }
    config = serving_world.toml(tmp_path / "sidecar.toml")
    command = [sys.executable, "-m", "router.cli", "serve", "--config", str(config)]
    command += ["--port", "0", "--http-port", "-1", "--metrics-port", "-1"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(tmp_path / "empty") in errors[0], done.stderr


def test_bundle_drafters_that_do_not_fit_your_target_are_left_out(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    """The world with your own target_dir, whose tokenizer has one more token than the
    world's: every bundle drafter is left out with a warning, and ngram and none serve."""
    own_target = serving_world.mismatched_dir
    config = serving_world.toml(tmp_path / "sidecar.toml", target_dir=str(own_target))
    log = tmp_path / "sidecar.log"
    with launch_sidecar(
        config_file=config, state_dir=tmp_path / "state", http=False, metrics=False, log_path=log
    ) as sidecar:
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(sidecar.grpc_address))
        names = [d.name for d in stub.ListDrafters(pb.ListDraftersRequest()).drafters]
        decision = stub.Route(pb.RouteRequest(text=COMPLETION_PROMPT))
        chunks = list(
            stub.Generate(pb.GenerateRequest(text=COMPLETION_PROMPT, max_new_tokens=4), timeout=60)
        )
    assert sorted(names) == ["ngram", "none"]
    assert decision.drafter in {"ngram", "none"}
    assert chunks[-1].stats.generated_tokens > 0
    warnings = [line for line in log.read_text().splitlines() if "bundle drafter left out" in line]
    size = _vocabulary_size(own_target)
    difference = (
        f"vocabulary sizes differ: target {size}, drafter {size - 1}; "
        f"first difference at id {size - 1}: target {MISMATCHED_TOKEN!r}, drafter absent"
    )
    for name, directory in serving_world.world.drafter_dirs.items():
        expected = f"drafter {name!r} at {directory} cannot draft for the target at {own_target}"
        assert [w for w in warnings if f"{expected}: {difference}" in w], (name, warnings)
    assert len(warnings) == len(serving_world.world.drafter_dirs)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def without_bundle_drafters(
    request: pytest.FixtureRequest,
    serving_world: ServingWorld,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SidecarThread]:
    """A sidecar with bundle_drafters = false, one configured drafter, and a dtype."""
    from router.components import build_components

    settings = serving_world.settings(
        tmp_path_factory.mktemp("state"),
        bundle_drafters=False,
        drafter_dirs={"mine": serving_world.spare_dir},
        dtype=request.param,
    )
    sidecar = SidecarThread(settings, build_components(settings))
    yield sidecar
    sidecar.stop()


def test_bundle_drafters_false_keeps_ngram_none_and_configured_drafters(
    without_bundle_drafters: SidecarThread,
) -> None:
    stub = without_bundle_drafters.stub
    drafters = {d.name: d for d in stub.ListDrafters(pb.ListDraftersRequest()).drafters}
    assert sorted(drafters) == ["mine", "ngram", "none"]
    assert drafters["mine"].kind == "model" and drafters["mine"].builtin


def test_the_dtype_setting_reaches_target_and_drafters(
    without_bundle_drafters: SidecarThread,
) -> None:
    service = without_bundle_drafters.service
    expected = {"float32": torch.float32, "bfloat16": torch.bfloat16}[service.settings.dtype]
    target = service.components.target
    assert target.dtype == expected
    assert {p.dtype for p in target.model.parameters()} == {expected}
    mine = service.drafters.get("mine").drafter
    assert {p.dtype for p in mine.model.parameters()} == {expected}
    # And it serves in that precision: a short forced speculative generation.
    request = pb.GenerateRequest(
        text=COMPLETION_PROMPT, max_new_tokens=6, force_drafter="mine", force_draft_length=2
    )
    chunks = list(without_bundle_drafters.stub.Generate(request, timeout=60))
    assert chunks[-1].stats.generated_tokens == 6


def test_weight_digests_are_cached_in_the_state_dir(
    without_bundle_drafters: SidecarThread,
) -> None:
    from router.components import WEIGHTS_DIGEST_CACHE

    service = without_bundle_drafters.service
    cache = Path(service.settings.state_dir) / WEIGHTS_DIGEST_CACHE
    entries = json.loads(cache.read_text())["entries"].values()
    digests = sorted(entry["digest"] for entry in entries)
    mine = service.drafters.get("mine").record
    assert digests == sorted([service.components.target.weights_digest, mine.weights_digest])


def test_builtin_drafters_is_refused_with_its_new_name(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text("builtin_drafters = false\n")
    with pytest.raises(ValueError, match="builtin_drafters was renamed: bundle_drafters"):
        load_settings(config)
    config.write_text("bundle_drafters = false\n")
    assert load_settings(config).bundle_drafters is False
    command = [sys.executable, "-m", "router.cli", "serve", "--print-config"]
    env = {"PATH": "/usr/bin:/bin", "SPECROUTE_BUILTIN_DRAFTERS": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "builtin_drafters was renamed" in done.stderr and "Traceback" not in done.stderr


def _with_bos(target_dir: Path, out: Path) -> Path:
    """A copy of ``target_dir`` whose tokenizer puts <|endoftext|> before a text, as Llama's,
    Mistral's and Gemma's put their BOS."""
    import shutil

    from tokenizers import Tokenizer, processors

    shutil.copytree(target_dir, out)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A",
        pair="<|endoftext|> $A $B",
        special_tokens=[("<|endoftext|>", tokenizer.token_to_id("<|endoftext|>"))],
    )
    tokenizer.save(str(out / "tokenizer.json"))
    return out


def test_a_text_prompt_gets_the_bos_its_tokenizer_adds(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    """Text prompts were tokenized without the tokenizer's special tokens: for a target with
    a BOS, TGI's /generate and vLLM's completions read one token more than the sidecar sent
    (fleet mode sends the ids) or generated from. A chat's template spells its own."""
    from router.components import build_components

    target = _with_bos(serving_world.world.target_dir, serving_world.extra_root / "bos-target")
    settings = serving_world.settings(tmp_path / "state", target_dir=target)
    sidecar = SidecarThread(settings, build_components(settings))
    try:
        tokenizer = sidecar.service.tokenizer
        text = COMPLETION_PROMPT
        plain = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        routed = sidecar.stub.Route(pb.RouteRequest(text=text))
        assert routed.prompt_tokens == plain + 1
        chunks = list(sidecar.stub.Generate(pb.GenerateRequest(text=text, max_new_tokens=2)))
        assert chunks[0].decision.prompt_tokens == chunks[-1].stats.prompt_tokens == plain + 1
        chat = pb.Conversation(messages=[pb.ChatMessage(role="user", content=text)])
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        spelt = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        assert sidecar.stub.Route(pb.RouteRequest(conversation=chat)).prompt_tokens == spelt
    finally:
        sidecar.stop()
