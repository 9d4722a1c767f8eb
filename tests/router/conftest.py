"""The sidecar on the built-in tiny world (real target, drafters, classifier, policy),
running in-process on free ports in a background event-loop thread, plus model
directories that registration must accept or refuse."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from classifiers.chat import IM_END
from router.pb import router_pb2_grpc
from router.server import RunningSidecar, start_sidecar
from router.service import Components
from router.settings import Limits, Settings

if TYPE_CHECKING:
    from benchmarks.replicas.redis_server import RedisTlsFiles
    from router.bundle import ModelBundle

ADMIN_TOKEN = "admin-secret"
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
MAX_PROMPT_TOKENS = 512
MAX_NEW_TOKENS = 200
# The tiny world's target is barely trained: after a chat template it mostly emits EOS
# at once, while plain completion prompts like this one run to the token limit.
COMPLETION_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class ServingWorld:
    """The tiny world, an extra model root with drafters to register, and bad directories."""

    world: ModelBundle
    extra_root: Path  # a second model root
    spare_dir: Path  # a valid drafter not loaded at start (a copy of the world's math one)
    mismatched_dir: Path  # the generic drafter with one more tokenizer token
    pickle_dir: Path  # pytorch_model.bin only
    outside_dir: Path  # a valid drafter outside every model root
    classifier_v2_dir: Path  # another valid classifier (other seed), under extra_root
    prompts: dict[str, str]  # task -> the user text of one test example

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.world.tasks)

    def settings(self, state_dir: Path, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "world_dir": self.world.root,
            "model_roots": [self.extra_root],
            "state_dir": state_dir,
            "port": 0,
            "http_port": 0,
            "metrics_port": 0,
            "admin_token": ADMIN_TOKEN,
            "limits": Limits(
                max_prompt_tokens=MAX_PROMPT_TOKENS,
                max_new_tokens=MAX_NEW_TOKENS,
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
        """The same settings as a TOML file (for ``specroute serve`` subprocesses)."""
        scalars = {"snapshot_interval_s": 3600.0, "grace_s": 1.0, **extra}
        lines = [
            f"world_dir = {json.dumps(str(self.world.root))}",
            f"model_roots = [{json.dumps(str(self.extra_root))}]",
            *(f"{key} = {json.dumps(value)}" for key, value in scalars.items()),
            "[limits]",
            f"max_prompt_tokens = {MAX_PROMPT_TOKENS}",
            f"max_new_tokens = {MAX_NEW_TOKENS}",
        ]
        path.write_text("\n".join(lines) + "\n")
        return path


def _mismatched_copy(source: Path, destination: Path) -> Path:
    """``source`` with one token added to its tokenizer (and embeddings resized)."""
    from drafters.loader import load_model

    loaded = load_model(source)
    loaded.tokenizer.add_tokens(["<|not-in-the-target|>"])
    loaded.model.resize_token_embeddings(len(loaded.tokenizer))
    loaded.model.save_pretrained(destination, safe_serialization=True)
    loaded.tokenizer.save_pretrained(destination)
    return destination


def _pickle_copy(source: Path, destination: Path) -> Path:
    from drafters.loader import load_model

    loaded = load_model(source)
    loaded.model.save_pretrained(destination, safe_serialization=False)
    loaded.tokenizer.save_pretrained(destination)
    assert not list(destination.glob("*.safetensors"))
    return destination


def _other_classifier(world: ModelBundle, destination: Path) -> Path:
    from classifiers import train_classifier
    from classifiers.world import read_corpus_split

    train = read_corpus_split(world.corpus_dir, "train")
    validation = read_corpus_split(world.corpus_dir, "validation")
    return Path(train_classifier(train, validation, seed=1).save(destination))


@pytest.fixture(scope="session")
def serving_world(
    tiny_world: ModelBundle, tmp_path_factory: pytest.TempPathFactory
) -> ServingWorld:
    from classifiers import ensure_world_classifier

    ensure_world_classifier(tiny_world.root, tiny_world.corpus_dir)
    base = tmp_path_factory.mktemp("serving")
    extra_root = base / "models"
    extra_root.mkdir()
    spare = extra_root / "spare"
    shutil.copytree(tiny_world.drafter_dirs["math"], spare)
    outside = base / "outside" / "spare"
    shutil.copytree(tiny_world.drafter_dirs["math"], outside)
    prompts: dict[str, str] = {}
    from benchmarks.world.layout import read_examples

    for example in read_examples(tiny_world.corpus_dir, "test"):
        prompts.setdefault(example.task, example.messages[-1]["content"])
    generic = tiny_world.drafter_dirs["generic"]
    return ServingWorld(
        world=tiny_world,
        extra_root=extra_root,
        spare_dir=spare,
        mismatched_dir=_mismatched_copy(generic, extra_root / "mismatched"),
        pickle_dir=_pickle_copy(generic, extra_root / "pickled"),
        outside_dir=outside,
        classifier_v2_dir=_other_classifier(tiny_world, extra_root / "classifier-v2"),
        prompts=prompts,
    )


@pytest.fixture(scope="session")
def components(serving_world: ServingWorld, tmp_path_factory: pytest.TempPathFactory) -> Components:
    from router.components import build_components

    return build_components(serving_world.settings(tmp_path_factory.mktemp("unused")))


@pytest.fixture(autouse=True)
def world_classifier_after_each_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """The session's ``components`` (shared by every sidecar a worker process starts) serve
    the world's classifier again after each test that used them: a test that reloads
    another and fails (or ends a loop) before switching back would change what every
    later file of the process routes with, and which files share a process varies."""
    yield
    if "components" not in request.fixturenames:
        return
    holder = request.getfixturevalue("components").classifiers
    world_classifier = request.getfixturevalue("serving_world").world.root / "classifier"
    if Path(holder.current.source).resolve() != world_classifier.resolve():
        holder.reload(world_classifier)


class SidecarThread:
    """A real sidecar (gRPC + HTTP + metrics) on its own event loop in a thread."""

    def __init__(self, settings: Settings, components: Components) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start_sidecar(settings, components), self.loop)
        self.running: RunningSidecar = future.result(timeout=300)
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
    serving_world: ServingWorld,
    components: Components,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SidecarThread]:
    running = SidecarThread(serving_world.settings(tmp_path_factory.mktemp("state")), components)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def compact(
    serving_world: ServingWorld,
    components: Components,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SidecarThread]:
    """A sidecar with ``structured_output.disable_any_whitespace`` and
    ``disable_additional_properties`` (the tiny target, free to, spends its budget on
    whitespace inside JSON, or on keys nobody asked for)."""
    settings = serving_world.settings(
        tmp_path_factory.mktemp("compact"),
        structured_output={"disable_any_whitespace": True, "disable_additional_properties": True},
        limits=Limits(max_prompt_tokens=1024, generation_queue_size=0),  # tools are long
    )
    running = SidecarThread(settings, components)
    try:
        yield running
    finally:
        running.stop()


DATA_TOKEN = "data-secret"


@pytest.fixture(scope="module")
def guarded(
    serving_world: ServingWorld,
    components: Components,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SidecarThread]:
    """A sidecar whose HTTP fronts and data RPCs want ``DATA_TOKEN``."""
    settings = serving_world.settings(tmp_path_factory.mktemp("guarded"), data_token=DATA_TOKEN)
    running = SidecarThread(settings, components)
    yield running
    running.stop()


def _ending_target(target_dir: Path, destination: Path) -> Path:
    """A copy of the tiny target that ends its turn wherever it would write a space: the
    ``<|im_end|>`` row of its (tied) embedding is twice the row of "Ġ", the token the
    barely trained target writes most. Which tokens a tiny target writes depends on its
    few training steps; this makes an end of turn certain without training for it."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(target_dir, destination)
    tokenizer = AutoTokenizer.from_pretrained(destination)
    weights_path = destination / "model.safetensors"
    weights = load_file(weights_path)
    embedding = weights["model.embed_tokens.weight"]
    end, space = tokenizer.convert_tokens_to_ids([IM_END, "Ġ"])
    embedding[end] = 2 * embedding[space]
    save_file(weights, weights_path, metadata={"format": "pt"})
    return destination


@pytest.fixture(scope="session")
def ending_sidecar(
    serving_world: ServingWorld, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarThread]:
    from router.components import build_components

    base = tmp_path_factory.mktemp("ending")
    target = _ending_target(serving_world.world.target_dir, base / "models" / "target")
    settings = serving_world.settings(
        base / "state", target_dir=target, model_roots=[serving_world.extra_root, base / "models"]
    )
    running = SidecarThread(settings, build_components(settings))
    yield running
    running.stop()


def counterfactuals_settled(sidecar: SidecarThread) -> None:
    """Wait until the counterfactual scoring of earlier greedy Generates, off the request
    path, has updated the policy: it moves the policy's version too, and on a busy machine
    it can still run when the next test starts."""
    deadline = time.monotonic() + 60
    while sidecar.service._learning_backlog and time.monotonic() < deadline:
        time.sleep(0.02)


def greedy_reference(
    sidecar: SidecarThread, text: str, max_new_tokens: int, last_tokens: int | None = None
) -> tuple[list[int], str]:
    """The engine's greedy output for ``text`` (its ``last_tokens`` tokens when given)
    without speculation (the target alone)."""
    from router.domain import Prompt

    service = sidecar.service
    none = service.drafters.get("none").drafter
    ids = service.prompt_ids(Prompt(text=text))
    run = service.components.engine.generate(
        ids[-last_tokens:] if last_tokens else ids, none, 0, max_new_tokens=max_new_tokens
    )
    for _ in run:
        pass
    ids = [int(t) for t in run.output_ids]
    return ids, service.tokenizer.decode(ids, skip_special_tokens=True)


def target_logprobs(sidecar: SidecarThread, text: str, output_ids: list[int]) -> list[float]:
    """The target's raw log-probability of each of ``output_ids`` after the prompt
    ``text``, from one forward pass over both (no engine, no cache)."""
    import torch

    from router.domain import Prompt

    service = sidecar.service
    prompt = service.prompt_ids(Prompt(text=text))
    with torch.inference_mode():
        logits = service.components.target.model(torch.tensor([prompt + output_ids])).logits
    rows = torch.log_softmax(logits[0, len(prompt) - 1 : -1].float(), dim=-1)
    return rows.gather(1, torch.tensor(output_ids).unsqueeze(1)).squeeze(1).tolist()


def self_signed_tls(directory: Path, names: str = "IP:127.0.0.1, DNS:localhost") -> RedisTlsFiles:
    """A throwaway CA and a server certificate it signed for ``names`` (openssl CLI)."""
    from benchmarks.replicas.redis_server import RedisTlsFiles

    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, request, cert = (directory / f"server.{ext}" for ext in ("key", "csr", "crt"))
    extensions = directory / "server.ext"
    extensions.write_text(
        f"subjectAltName = {names}\nbasicConstraints = CA:FALSE\nextendedKeyUsage = serverAuth\n"
    )
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca = ["req", "-x509", *new_key, "-keyout", ca_key, "-out", ca_cert, "-days", "2"]
    server = ["req", *new_key, "-keyout", key, "-out", request, "-subj", "/CN=specroute"]
    sign = ["x509", "-req", "-in", request, "-CA", ca_cert, "-CAkey", ca_key, "-days", "2"]
    sign += ["-CAcreateserial", "-out", cert, "-extfile", extensions]
    for command in ([*ca, "-subj", "/CN=specroute test CA"], server, sign):
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return RedisTlsFiles(cert_file=cert, key_file=key, ca_file=ca_cert)


class FailingWrites:
    """A SQLite connection whose every write fails with SQLite's ``errorname`` (reads go
    through): by default a disk with no space left (SQLITE_FULL, what SQLite reports for
    ENOSPC)."""

    def __init__(
        self,
        db: sqlite3.Connection,
        errorname: str = "SQLITE_FULL",
        message: str = "database or disk is full",
    ) -> None:
        self.db, self.errorname, self.message = db, errorname, message

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction

    def execute(self, sql: str, *parameters: Any) -> sqlite3.Cursor:
        if sql.lstrip().upper().startswith(("INSERT", "DELETE", "UPDATE")):
            error = sqlite3.OperationalError(self.message)
            error.sqlite_errorname = self.errorname
            raise error
        return self.db.execute(sql, *parameters)

    def close(self) -> None:
        self.db.close()
