"""A Qwen2.5-0.5B-shaped checkpoint served end to end: Route, greedy Generate over gRPC and
the TGI front, each token for token against transformers' ``generate``.

The model has the real Qwen2.5-0.5B configuration values (24 layers, hidden 896, 14 query
and 2 KV heads of 64, MLP 4864, RoPE base 1e6, tied embeddings, the padded 151,936-row
vocabulary: 494M parameters) with random weights, in fp32. Measured on the 2 shared cores
of the machine this was written on: the module took 30-70 s across runs, of which ~14 s
is the tiny world's fixtures (shared with the other sidecar tests) and 12-47 s the setup
(building and saving the model, 2 GB, and loading it into the sidecar); with 2 layers
it took 25 s. The layer count is the real one, as the real configuration values are
asked for; the checkpoint is written to memory (/dev/shm) where there is room, which took
the module alone from 75 to 60-66 s. The tokenizer is the tiny world's (its ids
are a prefix of the rows; the rest are padding, zero as untrained rows are), so the
world's classifier routes and the world's generic drafter, padded to fewer rows, drafts
after it is resized to 151,936 rows.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from text_generation import Client
from transformers import Qwen2Config, Qwen2ForCausalLM

from router.domain import Prompt
from router.pb import router_pb2 as pb
from tests.drafters.conftest import assert_same_or_near_tie, reference_greedy
from tests.router.conftest import COMPLETION_PROMPT, ServingWorld, SidecarThread

LAYERS = 24  # the real model's
QWEN25_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151_936,
    "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32_768,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "use_sliding_window": False,
}
MAX_NEW_TOKENS = 12


def _available_memory() -> int:
    """MemAvailable in bytes (/dev/shm is memory: its free space is not what is left)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the 2 GB checkpoint goes: memory (/dev/shm) when there is room, since writing
    it to this machine's disk took ~10 s and to memory under 1 s; else the test's tmp."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and _available_memory() > 8 << 30:
        return Path(tempfile.mkdtemp(prefix="specroute-qwen25-05b-", dir=shm))
    return tmp_path_factory.mktemp("qwen25-05b-shape")


@pytest.fixture(scope="module")
def qwen05b_dir(
    serving_world: ServingWorld, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    from drafters.loader import load_tokenizer

    tokenizer = load_tokenizer(serving_world.world.target_dir)
    config = Qwen2Config(
        **QWEN25_05B,
        num_hidden_layers=LAYERS,
        max_window_layers=LAYERS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[len(tokenizer) :].zero_()  # untrained padding
    scratch = _scratch(tmp_path_factory)
    try:  # 2 GB of memory when in /dev/shm: removed however the module ends
        directory = scratch / "model"
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        del model
        yield directory
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def served(
    serving_world: ServingWorld, qwen05b_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarThread]:
    from router.components import build_components

    settings = serving_world.settings(
        tmp_path_factory.mktemp("state"),
        target_dir=qwen05b_dir,
        bundle_drafters=False,
        drafter_dirs={"generic": serving_world.world.drafter_dirs["generic"]},
    )
    sidecar = SidecarThread(settings, build_components(settings))
    yield sidecar
    sidecar.stop()


def _reference(served: SidecarThread, text: str) -> tuple[list[int], list[int]]:
    """(prompt ids, transformers' greedy continuation) for ``text`` as the sidecar reads it."""
    service = served.service
    prompt = service.prompt_ids(Prompt(text=text))
    target, engine = service.components.target, service.components.engine
    return prompt, reference_greedy(target, engine, prompt, MAX_NEW_TOKENS)


def test_the_checkpoint_has_the_real_shape(served: SidecarThread, qwen05b_dir: Path) -> None:
    config = json.loads((qwen05b_dir / "config.json").read_text())
    assert {key: config[key] for key in QWEN25_05B} == QWEN25_05B
    target = served.service.components.target.model
    assert target.get_output_embeddings().weight.shape == (151_936, 896)
    assert target.get_output_embeddings().weight is target.get_input_embeddings().weight
    generic = served.service.drafters.get("generic").drafter.model
    assert generic.get_output_embeddings().weight.shape[0] == 151_936  # resized
    names = sorted(d.name for d in served.stub.ListDrafters(pb.ListDraftersRequest()).drafters)
    assert names == ["generic", "ngram", "none"]


def test_route_decides_for_the_checkpoint(
    served: SidecarThread, serving_world: ServingWorld
) -> None:
    decision = served.stub.Route(pb.RouteRequest(text=COMPLETION_PROMPT))
    assert decision.drafter in {"generic", "ngram", "none"}
    assert decision.task_cluster in serving_world.tasks
    assert decision.prompt_tokens == len(_reference(served, COMPLETION_PROMPT)[0])


@pytest.mark.parametrize(("drafter", "k"), [("generic", 3), ("ngram", 2), ("none", 0)])
def test_greedy_generate_equals_transformers(served: SidecarThread, drafter: str, k: int) -> None:
    prompt, expected = _reference(served, COMPLETION_PROMPT)
    request = pb.GenerateRequest(
        text=COMPLETION_PROMPT,
        max_new_tokens=MAX_NEW_TOKENS,
        force_drafter=drafter,
        force_draft_length=k,
        no_update=True,
    )
    chunks = list(served.stub.Generate(request, timeout=120))
    ours = [token.id for chunk in chunks for token in chunk.tokens]
    assert len(expected) == MAX_NEW_TOKENS  # a real comparison, not a lone EOS
    assert_same_or_near_tie(served.service.components.target, prompt, ours, expected)
    assert chunks[0].decision.drafter == drafter


def test_the_tgi_front_serves_the_same_greedy_tokens(served: SidecarThread) -> None:
    prompt, expected = _reference(served, COMPLETION_PROMPT)
    client = Client(served.http_url, timeout=120)
    response = client.generate(COMPLETION_PROMPT, max_new_tokens=MAX_NEW_TOKENS)
    ours = [token.id for token in response.details.tokens]
    assert_same_or_near_tie(served.service.components.target, prompt, ours, expected)
    tokenizer = served.service.tokenizer
    if ours == expected:
        assert response.generated_text == tokenizer.decode(expected, skip_special_tokens=True)
    with urllib.request.urlopen(f"{served.http_url}/info", timeout=30) as reply:
        info = json.loads(reply.read())
    assert info["model_dtype"] == "float32"
    assert info["model_sha"] == served.service.components.target.weights_digest[:16]
