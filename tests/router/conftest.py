"""A tiny serving world (random Qwen2 target + drafters, a trained ONNX classifier) and a
real sidecar running in-process on free ports, in a background event-loop thread."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from router.pb import router_pb2_grpc
from router.server import RunningSidecar, start_sidecar
from router.service import Components
from router.settings import Limits, Settings

ADMIN_TOKEN = "admin-secret"
VOCAB_WORDS = 61
# Words the synthetic classifier knows, so routes spread over its clusters.
TASK_WORDS = {
    "translate": "translate french sentence into german word",
    "math": "solve equation integer sum prime number",
    "code": "python function return list string implement",
    "summarize": "summarize article paragraph summary main points",
}


def tiny_tokenizer(extra_token: str | None = None) -> PreTrainedTokenizerFast:
    """Word-level: specials 0-2, words w0..w60, then the classifier's task words."""
    vocab = {"<|endoftext|>": 0, "<|im_end|>": 1, "<|im_start|>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(VOCAB_WORDS)})
    for words in TASK_WORDS.values():
        for word in words.split():
            vocab.setdefault(word, len(vocab))
    if extra_token is not None:
        vocab[extra_token] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>")


def tiny_config(vocab: int, layers: int = 2) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.25,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
    )


def _save(model: Qwen2ForCausalLM, directory: Path, extra_token: str | None = None) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    tiny_tokenizer(extra_token).save_pretrained(directory)
    return directory


@dataclass(frozen=True)
class TinyServingWorld:
    """Model directories under ``root`` (the model root) and two classifier versions."""

    root: Path
    target_dir: Path
    drafter_dirs: dict[str, Path]
    spare_dir: Path  # a valid drafter not loaded at start (for RegisterDrafter)
    mismatched_dir: Path  # tokenizer with one more token
    pickle_dir: Path  # pytorch_model.bin only
    outside_dir: Path  # a valid drafter outside the model root
    classifier_dir: Path
    classifier_v2_dir: Path

    def settings(self, state_dir: Path, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "target_dir": self.target_dir,
            "classifier_dir": self.classifier_dir,
            "drafter_dirs": self.drafter_dirs,
            "model_roots": [self.root],
            "state_dir": state_dir,
            "port": 0,
            "http_port": 0,
            "metrics_port": 0,
            "admin_token": ADMIN_TOKEN,
            "limits": Limits(
                max_prompt_tokens=48,
                max_new_tokens=200,
                generation_workers=1,
                generation_queue_size=0,
                counterfactual_budget_s=5.0,
            ),
            "snapshot_interval_s": 3600.0,
            "grace_s": 1.0,
        }
        values.update(overrides)
        return Settings(**values)

    def toml(self, path: Path, **extra: Any) -> Path:
        """The same world as a TOML settings file (for ``specroute serve`` subprocesses)."""
        scalars = {"snapshot_interval_s": 3600.0, "grace_s": 1.0, **extra}
        lines = [
            f'target_dir = "{self.target_dir}"',
            f'classifier_dir = "{self.classifier_dir}"',
            f'model_roots = ["{self.root}"]',
            *(f"{key} = {json.dumps(value)}" for key, value in scalars.items()),
            "[drafter_dirs]",
            *(f'{name} = "{directory}"' for name, directory in self.drafter_dirs.items()),
            "[limits]",
            "max_prompt_tokens = 48",
            "max_new_tokens = 200",
        ]
        path.write_text("\n".join(lines) + "\n")
        return path


def labeled_prompts(count: int, seed: int) -> list[Any]:
    """Prompts mixing each task's words with filler words, labeled with the task."""
    import random

    from classifiers.text import LabeledPrompt

    rng = random.Random(seed)
    tasks = sorted(TASK_WORDS)
    prompts = []
    for index in range(count):
        task = tasks[index % len(tasks)]
        vocabulary = TASK_WORDS[task].split()
        words = [
            rng.choice(vocabulary) if rng.random() < 0.6 else f"w{rng.randrange(VOCAB_WORDS)}"
            for _ in range(rng.randint(5, 20))
        ]
        prompts.append(LabeledPrompt(text=" ".join(words), task=task))
    return prompts


def _train_classifier(directory: Path, seed: int) -> Path:
    from classifiers.train import train_classifier

    return Path(train_classifier(labeled_prompts(160, seed), seed=seed).save(directory))


@pytest.fixture(scope="session")
def serving_world(tmp_path_factory: pytest.TempPathFactory) -> TinyServingWorld:
    base = tmp_path_factory.mktemp("serving-world")
    root = base / "models"
    vocab = len(tiny_tokenizer().get_vocab())
    torch.manual_seed(0)
    target = Qwen2ForCausalLM(tiny_config(vocab)).eval()
    with torch.no_grad():
        target.get_input_embeddings().weight[:3].mul_(0.2)  # EOS ends few outputs early
    close = Qwen2ForCausalLM(tiny_config(vocab)).eval()
    close.load_state_dict(target.state_dict())
    with torch.no_grad():
        for parameter in close.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    torch.manual_seed(1)
    generic = Qwen2ForCausalLM(tiny_config(vocab, layers=1)).eval()
    torch.manual_seed(2)
    spare = Qwen2ForCausalLM(tiny_config(vocab, layers=1)).eval()
    mismatched = Qwen2ForCausalLM(tiny_config(vocab + 1, layers=1)).eval()
    pickle_dir = root / "pickled"
    spare.save_pretrained(pickle_dir, safe_serialization=False)
    tiny_tokenizer().save_pretrained(pickle_dir)
    return TinyServingWorld(
        root=root,
        target_dir=_save(target, root / "target"),
        drafter_dirs={
            "generic": _save(generic, root / "generic"),
            "close": _save(close, root / "close"),
        },
        spare_dir=_save(spare, root / "spare"),
        mismatched_dir=_save(mismatched, root / "mismatched", extra_token="extra"),
        pickle_dir=pickle_dir,
        outside_dir=_save(spare, base / "outside" / "spare"),
        classifier_dir=_train_classifier(base / "classifier", seed=0),
        classifier_v2_dir=_train_classifier(base / "classifier-v2", seed=1),
    )


@pytest.fixture(scope="session")
def components(
    serving_world: TinyServingWorld, tmp_path_factory: pytest.TempPathFactory
) -> Components:
    from router.components import build_components

    return build_components(serving_world.settings(tmp_path_factory.mktemp("unused")))


class SidecarThread:
    """A real sidecar (gRPC + HTTP + metrics) on its own event loop in a thread."""

    def __init__(self, settings: Settings, components: Components) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start_sidecar(settings, components), self.loop)
        self.running: RunningSidecar = future.result(timeout=120)
        self.channel = grpc.insecure_channel(self.running.address)
        self.stub = router_pb2_grpc.RouterStub(self.channel)

    @property
    def service(self) -> Any:
        return self.running.service

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.running.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.running.metrics_port}/metrics"

    def stop(self) -> None:
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.running.stop(0.5), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def sidecar(
    serving_world: TinyServingWorld,
    components: Components,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SidecarThread]:
    running = SidecarThread(serving_world.settings(tmp_path_factory.mktemp("state")), components)
    yield running
    running.stop()


ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
