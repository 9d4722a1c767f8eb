"""The child-process prompt reader: the same counts and classifications as the sidecar's
own tokenizer and classifier, a refused classifier that changed on disk, batches that
take turns, and a sidecar that keeps routing (and restarts the child) when the child is
killed."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from classifiers.holder import ClassifierHolder
from classifiers.runtime import OnnxTaskClassifier
from router.pb import router_pb2 as pb
from router.prompt_reader import PromptsRead
from router.route_process import ChildProcessReader, RouteProcess, RouteProcessError
from router.service import Components, prompt_reader_for
from router.settings import Limits
from tests.router.conftest import ADMIN, ServingWorld, SidecarThread


def _tokenizer_json(components: Components) -> str:
    return str(components.target.tokenizer.backend_tokenizer.to_str())


def _key(directory: Path) -> tuple[str, str]:
    return str(directory), OnnxTaskClassifier.load(directory).fingerprint


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

    counts = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert done.token_counts == counts
    assert done.classifications == in_process
    assert child.batches == 1


def test_a_batch_larger_than_the_pipe_goes_through_in_parts(
    child: RouteProcess, components: Components
) -> None:
    texts = [f"prompt {i}: " + "lorem ipsum dolor " * 150 for i in range(100)]  # ~280 KB
    tokenizer = components.target.tokenizer

    done = asyncio.run(child.run(texts, [], ("", "")))

    counts = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert done.token_counts == counts


def test_child_refuses_a_classifier_that_is_not_the_one_served(
    child: RouteProcess, serving_world: ServingWorld
) -> None:
    directory = serving_world.world.root / "classifier"
    _, served = _key(serving_world.classifier_v2_dir)  # the sidecar serves v2's digest

    with pytest.raises(RouteProcessError, match="the sidecar serves"):
        asyncio.run(child.run(["a"], ["a"], (str(directory), served)))
    # The child stays up and serves the next batch.
    assert asyncio.run(child.run(["a"], ["a"], _key(directory))).classifications
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


@pytest.fixture()
def holder(serving_world: ServingWorld) -> ClassifierHolder:
    return ClassifierHolder(OnnxTaskClassifier.load(serving_world.world.root / "classifier"))


def test_reads_that_come_while_a_batch_is_out_wait_for_the_child(
    components: Components, holder: ClassifierHolder, serving_world: ServingWorld
) -> None:
    # A Generate's read beside a Route batch: both go to the child, one after the other
    # (the child takes one batch at a time; without the turn, the second is read
    # in-process).
    reader = ChildProcessReader(components.target.tokenizer, holder)
    reader.start(wait=True)
    texts = list(serving_world.prompts.values())

    async def together() -> tuple[PromptsRead, PromptsRead]:
        return await asyncio.gather(reader.read(texts, texts), reader.read(texts[:1], []))

    try:
        batch, lone = asyncio.run(together())
        assert reader.process.batches == 2
    finally:
        reader.close()
    assert batch.classifications == holder.current.classify_batch(texts)
    assert lone.token_counts == batch.token_counts[:1] and lone.classifications == []


def test_a_reader_whose_child_is_not_up_reads_in_process_and_starts_it(
    components: Components, holder: ClassifierHolder, serving_world: ServingWorld
) -> None:
    reader = ChildProcessReader(components.target.tokenizer, holder)
    text = serving_world.prompts["math"]
    try:
        read = asyncio.run(reader.read([text], [text]))
        assert read.classifications == [holder.current.classify(text)]
        assert read.token_counts == [
            len(components.target.tokenizer(text, add_special_tokens=False)["input_ids"])
        ]
        assert reader.process.batches == 0
        _wait_until(lambda: reader.process.ready)  # the read started it, in the background
        assert asyncio.run(reader.read([text], [text])) == read
        assert reader.process.batches == 1
    finally:
        reader.close()


def _served_copy(serving_world: ServingWorld, tmp_path: Path) -> tuple[Path, ClassifierHolder]:
    """A copy of the world's classifier, served from its own directory."""
    import shutil

    directory = tmp_path / "classifier"
    shutil.copytree(serving_world.world.root / "classifier", directory)
    return directory, ClassifierHolder(OnnxTaskClassifier.load(directory))


def _overwrite(directory: Path, serving_world: ServingWorld) -> None:
    import shutil

    shutil.rmtree(directory)
    shutil.copytree(serving_world.classifier_v2_dir, directory)


def _damage(directory: Path, serving_world: ServingWorld) -> None:
    (directory / "classifier.json").write_text("damaged{")


@pytest.mark.parametrize(
    ("change", "said"),
    [(_overwrite, "the sidecar serves"), (_damage, "cannot load the served classifier")],
    ids=["overwritten", "damaged"],
)
def test_a_classifier_the_child_cannot_serve_is_read_in_process_without_asking_again(
    components: Components,
    serving_world: ServingWorld,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: Any,
    said: str,
) -> None:
    """The served classifier's directory overwritten with another (v2), or its files damaged,
    after it loaded: the child refuses or fails it, rightly. But every batch made the child
    load the directory again, fail, and the sidecar warn; now the first refusal is the last
    until a reload serves another."""
    import logging

    directory, holder = _served_copy(serving_world, tmp_path)
    change(directory, serving_world)
    reader = ChildProcessReader(components.target.tokenizer, holder)
    reader.start(wait=True)
    text = serving_world.prompts["math"]
    try:
        with caplog.at_level(logging.WARNING, logger="router.route_process"):
            reads = [asyncio.run(reader.read([text], [text])) for _ in range(3)]
        assert all(r.classifications == [holder.current.classify(text)] for r in reads)
        warned = [r.getMessage() for r in caplog.records if "in-process" in r.getMessage()]
        assert len(warned) == 1 and said in warned[0], warned
        # A reload serves another classifier, which the child loads again.
        holder.reload(serving_world.world.root / "classifier")
        assert asyncio.run(reader.read([text], [text])).classifications
        assert reader.process.batches == 1
    finally:
        reader.close()


def test_new_thresholds_reloaded_from_the_same_directory_reach_the_child(
    components: Components, serving_world: ServingWorld, tmp_path: Path
) -> None:
    """The child knew a classifier by its graph's digest only: a recalibration written into
    the served directory (new thresholds, same graph) and reloaded left the child flagging
    prompts by the old thresholds while the in-process path used the new."""
    import json

    directory, holder = _served_copy(serving_world, tmp_path)
    reader = ChildProcessReader(components.target.tokenizer, holder)
    reader.start(wait=True)
    text = serving_world.prompts["math"]
    try:
        before = asyncio.run(reader.read([text], [text])).classifications
        assert before == [holder.current.classify(text)] and not before[0].out_of_distribution
        path = directory / "classifier.json"
        meta = json.loads(path.read_text())
        meta["ood"]["min_probability"] = 1.0  # every prompt is out of distribution now
        path.write_text(json.dumps(meta))
        holder.reload(directory)
        after = asyncio.run(reader.read([text], [text])).classifications
        assert after == [holder.current.classify(text)] and after[0].out_of_distribution
        assert reader.process.batches == 2  # both read by the child
    finally:
        reader.close()


def _states(pid: int, seconds: float) -> list[str]:
    """The scheduler state of process ``pid`` (/proc/PID/stat: R runnable, S sleeping),
    sampled every millisecond for ``seconds``."""
    states = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        states.append(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
        time.sleep(0.001)
    return states


@pytest.mark.parametrize("spin_ms", [0.0, 100.0])
def test_the_child_busy_waits_after_a_lone_batch_only_when_the_setting_asks(
    components: Components, holder: ClassifierHolder, spin_ms: float
) -> None:
    reader = prompt_reader_for(
        Limits(prompt_reader_spin_ms=spin_ms), components.target.tokenizer, holder
    )
    assert isinstance(reader, ChildProcessReader)
    reader.start(wait=True)
    try:
        asyncio.run(reader.read(["a lone prompt"], []))
        pid = reader.process.pid
        assert pid is not None
        # No next batch comes: it spins (sampled at once, within its 100 ms), or sleeps on
        # its pipe (sampled once whatever followed its reply is surely done: on a loaded
        # machine a fixed 20 ms was not always enough).
        if not spin_ms:
            time.sleep(0.3)
        states = _states(pid, 0.03)
    finally:
        reader.close()
    if spin_ms:
        assert states.count("R") > len(states) // 2
    else:
        assert "R" not in states


@pytest.fixture(scope="module")
def sidecar_with_child(
    serving_world: ServingWorld, components: Components, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarThread]:
    running = SidecarThread(
        serving_world.settings(tmp_path_factory.mktemp("state-child")), components
    )
    process = running.service.prompt_reader.process
    _wait_until(lambda: process.ready)
    yield running
    running.stop()
    assert not process.ready


def _route(sidecar: SidecarThread, text: str) -> pb.RouteDecision:
    return sidecar.stub.Route(pb.RouteRequest(text=text, max_new_tokens=8), timeout=30)


def test_route_batches_go_through_the_child(
    sidecar_with_child: SidecarThread, serving_world: ServingWorld
) -> None:
    process = sidecar_with_child.service.prompt_reader.process
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
    process = sidecar_with_child.service.prompt_reader.process
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
    sidecar_with_child: SidecarThread,
    serving_world: ServingWorld,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="router.route_process")
    process = sidecar_with_child.service.prompt_reader.process
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
    # Its status, not None: the pipe closes a moment before the child can be reaped.
    lost = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
    assert lost and f"it exited with {-signal.SIGKILL}" in lost[0], lost


def test_a_child_that_stops_answering_is_killed_and_replaced(components: Components) -> None:
    process = RouteProcess(_tokenizer_json(components), reply_timeout_s=0.5)
    process.start()
    hung = process.pid
    assert hung is not None

    async def scenario() -> PromptsRead:
        with pytest.raises(RouteProcessError, match=r"no reply within 0\.5 s"):
            await process.run(["a"], [], ("", ""))
        with pytest.raises(ProcessLookupError):
            os.kill(hung, 0)  # killed and reaped
        while not process.ready:  # started again in the background, the loop going on
            await asyncio.sleep(0.05)
        return await process.run(["a b"], [], ("", ""))

    os.kill(hung, signal.SIGSTOP)  # alive, but never answers
    try:
        assert asyncio.run(asyncio.wait_for(scenario(), timeout=60)).token_counts == [2]
        assert process.pid != hung and process.starts == 2
    finally:
        process.close()


def test_a_hung_child_is_replaced_also_when_the_caller_of_its_batch_has_gone(
    components: Components,
) -> None:
    """A caller cancelled while its batch was out (a Generate whose client left) took the
    batch's expiry with it: a child that had hung was never killed, and every batch after
    it was refused as "busy" and read in-process, for good."""
    process = RouteProcess(_tokenizer_json(components), reply_timeout_s=0.5)
    process.start()
    hung = process.pid
    assert hung is not None

    async def scenario() -> PromptsRead:
        left = asyncio.create_task(process.run(["a"], [], ("", "")))
        await asyncio.sleep(0.1)
        left.cancel()  # the client goes away while the child does not answer
        with pytest.raises(asyncio.CancelledError):
            await left
        while process.pid == hung or not process.ready:  # expired, killed, started again
            await asyncio.sleep(0.05)
        return await process.run(["a b"], [], ("", ""))

    os.kill(hung, signal.SIGSTOP)
    try:
        assert asyncio.run(asyncio.wait_for(scenario(), timeout=30)).token_counts == [2]
        with pytest.raises(ProcessLookupError):
            os.kill(hung, 0)
    finally:
        process.close()


def test_the_child_outlives_a_ctrl_c_that_reaches_its_process_group(child: RouteProcess) -> None:
    """Ctrl-C goes to the whole foreground process group: the child died with a
    KeyboardInterrupt traceback, and the sidecar, stopping, logged it lost and restarted
    it. It ignores SIGINT and ends when the sidecar closes its input."""
    pid = child.pid
    assert pid is not None
    os.kill(pid, signal.SIGINT)
    read = asyncio.run(asyncio.wait_for(child.run(["a b c"], [], ("", "")), 30))
    assert read.token_counts == [3] and child.pid == pid and child.starts == 1


def test_closing_waits_for_a_child_being_forked(
    components: Components, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between its fork and its exec a child holds a copy of every descriptor of this
    process, the state directory's flock among them: close() returned while a background
    start was forking, the service then closed the store, and a start retried in this
    process found the directory still "in use" (seen under load on a fresh clone)."""
    import subprocess
    import threading

    forking, forked = threading.Event(), threading.Event()
    popen = subprocess.Popen

    def slow_fork(*args: Any, **kwargs: Any) -> Any:
        forking.set()
        time.sleep(0.5)  # the window between fork and exec, stretched
        try:
            return popen(*args, **kwargs)
        finally:
            forked.set()

    monkeypatch.setattr(subprocess, "Popen", slow_fork)
    process = RouteProcess(_tokenizer_json(components))
    process.start_in_background()
    assert forking.wait(10)
    process.close()
    assert forked.is_set(), "close() returned while the child was being forked"
    _wait_until(lambda: not process._starting)
    assert not process.ready


def test_a_route_process_that_cannot_start_says_why(components: Components, tmp_path: Path) -> None:
    missing = RouteProcess(_tokenizer_json(components), python=str(tmp_path / "no-python"))
    with pytest.raises(RouteProcessError, match="cannot start the route process"):
        missing.start()
    broken = RouteProcess("{not a tokenizer", python=sys.executable)
    with pytest.raises(RouteProcessError, match="did not start"):
        broken.start()
    assert not missing.ready and not broken.ready
