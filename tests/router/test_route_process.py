"""The route process: the same counts and classes as the sidecar's own tokenizer and
classifier, a refused classifier that changed on disk, and a sidecar that keeps routing
(and restarts the child) when the child is killed."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from classifiers.runtime import OnnxTaskClassifier
from router.pb import router_pb2 as pb
from router.route_process import Classified, RouteProcess, RouteProcessError
from router.service import Components
from tests.router.conftest import ADMIN, ServingWorld, SidecarThread


def _tokenizer_json(components: Components) -> str:
    return str(components.target.tokenizer.backend_tokenizer.to_str())


def _key(directory: Path) -> tuple[str, str]:
    return str(directory), OnnxTaskClassifier.load(directory).metadata.model_sha256


def _wait_until(condition: Any, timeout_s: float = 60.0, step: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        if step is not None:
            step()
        time.sleep(0.05)


@pytest.fixture()
def child(components: Components) -> Iterator[RouteProcess]:
    process = RouteProcess(_tokenizer_json(components))
    process.start()
    yield process
    process.close()


def test_child_counts_and_classes_equal_the_sidecars_own(
    child: RouteProcess, components: Components, serving_world: ServingWorld
) -> None:
    texts = [*serving_world.prompts.values(), "", "héllo wörld ✓ " * 40]
    classifier_dir = serving_world.world.root / "classifier"
    in_process = OnnxTaskClassifier.load(classifier_dir).classify_batch(texts)
    tokenizer = components.target.tokenizer

    done = asyncio.run(child.run(texts, texts, _key(classifier_dir)))

    assert done.counts == [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert done.classes == [
        (c.cluster, float(c.probability), bool(c.out_of_distribution)) for c in in_process
    ]
    assert child.batches == 1


def test_a_batch_larger_than_the_pipe_goes_through_in_parts(
    child: RouteProcess, components: Components
) -> None:
    texts = [f"prompt {i}: " + "lorem ipsum dolor " * 150 for i in range(100)]  # ~280 KB
    tokenizer = components.target.tokenizer

    done = asyncio.run(child.run(texts, [], ("", "")))

    assert done.counts == [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def test_child_refuses_a_classifier_that_is_not_the_one_served(
    child: RouteProcess, serving_world: ServingWorld
) -> None:
    directory = serving_world.world.root / "classifier"
    _, served = _key(serving_world.classifier_v2_dir)  # the sidecar serves v2's digest

    with pytest.raises(RouteProcessError, match="the sidecar serves"):
        asyncio.run(child.run(["a"], ["a"], (str(directory), served)))
    # The child stays up and serves the next batch.
    assert asyncio.run(child.run(["a"], ["a"], _key(directory))).classes
    assert child.ready and child.starts == 1


def test_closing_stops_the_child(components: Components) -> None:
    process = RouteProcess(_tokenizer_json(components))
    process.start()
    pid = process.pid
    assert pid is not None
    process.close()
    assert not process.ready
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped: no zombie, no orphan


@pytest.fixture(scope="module")
def sidecar_with_child(
    serving_world: ServingWorld, components: Components, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarThread]:
    running = SidecarThread(
        serving_world.settings(tmp_path_factory.mktemp("state-child")), components
    )
    process = running.service.route_process
    assert process is not None
    _wait_until(lambda: process.ready)
    yield running
    running.stop()
    assert not process.ready


def _route(sidecar: SidecarThread, text: str) -> pb.RouteDecision:
    return sidecar.stub.Route(pb.RouteRequest(text=text, max_new_tokens=8), timeout=30)


def test_route_batches_go_through_the_child(
    sidecar_with_child: SidecarThread, serving_world: ServingWorld
) -> None:
    process = sidecar_with_child.service.route_process
    before = process.batches
    text = serving_world.prompts["math"]
    expected = OnnxTaskClassifier.load(serving_world.world.root / "classifier").classify(text)

    decision = _route(sidecar_with_child, text)

    assert process.batches > before
    assert decision.task_cluster == expected.cluster
    assert decision.confidence == pytest.approx(float(expected.probability))


def test_a_reloaded_classifier_reaches_the_child(
    sidecar_with_child: SidecarThread, serving_world: ServingWorld
) -> None:
    process = sidecar_with_child.service.route_process
    texts = list(serving_world.prompts.values())
    v2 = OnnxTaskClassifier.load(serving_world.classifier_v2_dir).classify_batch(texts)
    sidecar_with_child.stub.ReloadClassifier(
        pb.ReloadClassifierRequest(path=str(serving_world.classifier_v2_dir)), metadata=ADMIN
    )
    try:
        before = process.batches
        decisions = [_route(sidecar_with_child, text) for text in texts]
        assert process.batches >= before + len(texts)
        assert [d.confidence for d in decisions] == pytest.approx(
            [float(c.probability) for c in v2]
        )
    finally:
        sidecar_with_child.stub.ReloadClassifier(
            pb.ReloadClassifierRequest(path=str(serving_world.world.root / "classifier")),
            metadata=ADMIN,
        )


def test_routing_goes_on_when_the_child_is_killed_and_the_child_comes_back(
    sidecar_with_child: SidecarThread, serving_world: ServingWorld
) -> None:
    process = sidecar_with_child.service.route_process
    text = serving_world.prompts["qa"]
    expected = _route(sidecar_with_child, text).task_cluster
    killed = process.pid
    assert killed is not None

    os.kill(killed, signal.SIGKILL)
    decisions: list[pb.RouteDecision] = []
    _wait_until(
        lambda: process.ready and process.pid != killed,
        step=lambda: decisions.append(_route(sidecar_with_child, text)),
    )
    before = process.batches
    decisions.append(_route(sidecar_with_child, text))

    assert decisions and all(d.task_cluster == expected for d in decisions)  # no call failed
    assert process.starts >= 2 and process.batches > before  # the new child serves


def test_without_a_route_process_the_sidecar_routes_on_its_thread(
    serving_world: ServingWorld, components: Components, tmp_path: Path
) -> None:
    limits = serving_world.settings(tmp_path).limits.model_copy(update={"route_process": False})
    running = SidecarThread(serving_world.settings(tmp_path, limits=limits), components)
    try:
        text = serving_world.prompts["code"]
        expected = OnnxTaskClassifier.load(serving_world.world.root / "classifier").classify(text)
        assert running.service.route_process is None
        assert _route(running, text).task_cluster == expected.cluster
    finally:
        running.stop()


def test_a_child_that_stops_answering_is_killed_and_replaced(components: Components) -> None:
    process = RouteProcess(_tokenizer_json(components), reply_timeout_s=0.5)
    process.start()
    hung = process.pid
    assert hung is not None

    async def scenario() -> Classified:
        with pytest.raises(RouteProcessError, match=r"no reply within 0\.5 s"):
            await process.run(["a"], [], ("", ""))
        with pytest.raises(ProcessLookupError):
            os.kill(hung, 0)  # killed and reaped
        while not process.ready:  # started again in the background, the loop going on
            await asyncio.sleep(0.05)
        return await process.run(["a b"], [], ("", ""))

    os.kill(hung, signal.SIGSTOP)  # alive, but never answers
    try:
        assert asyncio.run(asyncio.wait_for(scenario(), timeout=60)).counts == [2]
        assert process.pid != hung and process.starts == 2
    finally:
        process.close()


def test_a_route_process_that_cannot_start_says_why(components: Components, tmp_path: Path) -> None:
    missing = RouteProcess(_tokenizer_json(components), python=str(tmp_path / "no-python"))
    with pytest.raises(RouteProcessError, match="cannot start the route process"):
        missing.start()
    broken = RouteProcess("{not a tokenizer", python=sys.executable)
    with pytest.raises(RouteProcessError, match="did not start"):
        broken.start()
    assert not missing.ready and not broken.ready
