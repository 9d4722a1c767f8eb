"""Route and Generate read prompts through the one prompt reader the settings choose:
over real gRPC, either implementation gives both RPCs the same token counts and
classifications as the sidecar's tokenizer and classifier."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from classifiers.runtime import OnnxTaskClassifier
from router.domain import Prompt
from router.pb import router_pb2 as pb
from router.prompt_reader import InProcessReader
from router.route_process import ChildProcessReader
from router.service import Components
from tests.router.conftest import ServingWorld, SidecarThread

READERS = {"child_process": ChildProcessReader, "in_process": InProcessReader}


@pytest.fixture(scope="module", params=sorted(READERS))
def sidecar_reading(
    request: pytest.FixtureRequest,
    serving_world: ServingWorld,
    components: Components,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SidecarThread]:
    state_dir = tmp_path_factory.mktemp(f"state-{request.param}")
    limits = serving_world.settings(state_dir).limits.model_copy(
        update={"prompt_reader": request.param}
    )
    running = SidecarThread(serving_world.settings(state_dir, limits=limits), components)
    reader = running.service.prompt_reader
    assert type(reader) is READERS[request.param]
    if isinstance(reader, ChildProcessReader):
        deadline = time.monotonic() + 60
        while not reader.process.ready:
            assert time.monotonic() < deadline, "the child did not start"
            time.sleep(0.05)
    yield running
    running.stop()


def _first_chunk(sidecar: SidecarThread, request: pb.GenerateRequest) -> pb.RouteDecision:
    chunks = list(sidecar.stub.Generate(request, timeout=60))
    assert chunks and chunks[0].HasField("decision")
    return chunks[0].decision


def _chat(text: str) -> pb.Conversation:
    return pb.Conversation(messages=[pb.ChatMessage(role="user", content=text)])


def test_route_and_generate_read_prompts_alike_with_either_reader(
    sidecar_reading: SidecarThread, serving_world: ServingWorld
) -> None:
    service = sidecar_reading.service
    classifier = OnnxTaskClassifier.load(serving_world.world.root / "classifier")
    batches_before = (
        service.prompt_reader.process.batches
        if isinstance(service.prompt_reader, ChildProcessReader)
        else 0
    )
    for task, text in sorted(serving_world.prompts.items()):
        for prompt, as_chat in (
            (Prompt(text=text), False),
            (Prompt(messages=({"role": "user", "content": text},)), True),
        ):
            expected = classifier.classify(text)
            tokens = len(service.prompt_ids(prompt))
            fields = {"conversation": _chat(text)} if as_chat else {"text": text}
            routed = sidecar_reading.stub.Route(pb.RouteRequest(**fields), timeout=30)
            generated = _first_chunk(
                sidecar_reading,
                pb.GenerateRequest(**fields, max_new_tokens=1, no_update=True),
            )
            for decision in (routed, generated):
                assert decision.task_cluster == expected.cluster, (task, as_chat)
                assert decision.confidence == pytest.approx(expected.probability, rel=1e-6)
                assert decision.out_of_distribution == expected.out_of_distribution
                assert decision.prompt_tokens == tokens, (task, as_chat)
    if isinstance(service.prompt_reader, ChildProcessReader):
        # Both RPCs were read by the child: one batch per call here (calls in sequence).
        assert service.prompt_reader.process.batches == batches_before + 4 * len(
            serving_world.prompts
        )


def test_a_task_hint_is_taken_as_is_by_route_and_generate(
    sidecar_reading: SidecarThread, serving_world: ServingWorld
) -> None:
    text = serving_world.prompts["code"]
    tokens = len(sidecar_reading.service.prompt_ids(Prompt(text=text)))
    routed = sidecar_reading.stub.Route(pb.RouteRequest(text=text, task_hint="math"), timeout=30)
    generated = _first_chunk(
        sidecar_reading,
        pb.GenerateRequest(text=text, task_hint="math", max_new_tokens=1, no_update=True),
    )
    for decision in (routed, generated):
        assert decision.task_cluster == "math" and decision.confidence == pytest.approx(1.0)
        assert not decision.out_of_distribution and decision.prompt_tokens == tokens
