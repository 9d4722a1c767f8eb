"""Capture, distillation and the operator's view on a real sidecar (tiny world).

The sidecar here serves no bundle drafters (ngram and none only), like a cluster no
drafter fits; captured requests are greedy chat Generates with a task hint.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from router.bundle import read_finetune_sample
from router.capture import CaptureSettings, CaptureStore
from router.cli import build_app
from router.components import build_components
from router.launch import launch_sidecar
from router.pb import router_pb2 as pb
from router.pb import router_pb2_grpc
from router.service import Components
from tests.router.conftest import ADMIN_TOKEN, FailingWrites, ServingWorld, SidecarThread

CLUSTER = "chat"
CAPTURED = 24
MAX_NEW_TOKENS = 32
DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "specroute.json"
WRONG_TOKEN = 17  # what the misled drafter predicts: never the tiny target's output


def _chat_prompts(world: ServingWorld, task: str, count: int) -> list[str]:
    from benchmarks.world.layout import read_examples

    texts = [e.messages[-1]["content"] for e in read_examples(world.world.corpus_dir, "train")]
    tasks = [e.task for e in read_examples(world.world.corpus_dir, "train")]
    chosen = [text for text, t in zip(texts, tasks, strict=True) if t == task][:count]
    assert len(chosen) == count
    return chosen


def _generate(stub: router_pb2_grpc.RouterStub, text: str, task: str) -> list[pb.GenerateChunk]:
    message = pb.ChatMessage(role="user", content=text)
    request = pb.GenerateRequest(
        conversation=pb.Conversation(messages=[message]),
        task_hint=task,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    return list(stub.Generate(request, timeout=120))


def _streamed_ids(chunks: list[pb.GenerateChunk]) -> tuple[int, ...]:
    return tuple(token.id for chunk in chunks for token in chunk.tokens)


def _cli(*args: str) -> object:
    return CliRunner().invoke(build_app(), list(args))


@pytest.fixture(scope="module")
def misled_drafter(serving_world: ServingWorld) -> Path:
    """The generic drafter fine-tuned to predict a token the target never writes: it starts
    far below every served arm, so a distillation that learns the traffic must beat them."""
    from drafters.distill import DistillConfig, TrainingPair, distill
    from drafters.loader import load_model

    loaded = load_model(serving_world.world.drafter_dirs["generic"])
    prompts = [(3 + i, 40 + i, 90 + i) for i in range(8)]
    pairs = [TrainingPair(p, (WRONG_TOKEN,) * 24) for p in prompts]
    distill(loaded.model, pairs, DistillConfig(steps=30, learning_rate=3e-3), pad_id=0)
    out = serving_world.extra_root / "misled"
    loaded.model.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def capturing(
    serving_world: ServingWorld, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SidecarThread, list[tuple[tuple[int, ...], ...]]]]:
    """A capturing sidecar after CAPTURED chat Generates and 2 math ones; the streamed
    output ids of each."""
    state = tmp_path_factory.mktemp("capture-state")
    settings = serving_world.settings(
        state,
        bundle_drafters=False,
        capture=CaptureSettings(enabled=True, clusters=[CLUSTER, "math"]),
    )
    components: Components = build_components(settings)
    sidecar = SidecarThread(settings, components)
    outputs = []
    for text in _chat_prompts(serving_world, CLUSTER, CAPTURED):
        outputs.append(_streamed_ids(_generate(sidecar.stub, text, CLUSTER)))
    for text in _chat_prompts(serving_world, "math", 2):
        _generate(sidecar.stub, text, "math")
    _generate(sidecar.stub, _chat_prompts(serving_world, "qa", 1)[0], "qa")  # not captured
    yield sidecar, outputs
    sidecar.stop()


def test_capture_clusters_the_classifier_lacks_are_named_at_start(
    serving_world: ServingWorld,
    components: Components,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A typo ("Chat" for "chat") or a cluster the classifier lacks started a sidecar that
    never captured anything of it, without a word."""
    from router.metrics import create_metrics
    from router.service import RouterService
    from router.store import SidecarStore

    clusters = ["Chat", "bogus", "math"]
    settings = serving_world.settings(
        tmp_path / "state", capture=CaptureSettings(enabled=True, clusters=clusters)
    )
    with caplog.at_level(logging.WARNING, logger="router.service"):
        service = RouterService(
            settings, components, SidecarStore(tmp_path / "state"), create_metrics()
        )
        service.close()
    said = caplog.text
    assert "capture.clusters names 'Chat' (did you mean 'chat'?), 'bogus', not a cluster" in said
    assert "'math'" not in said.split("its clusters")[0]


def test_nothing_is_captured_unless_enabled(
    sidecar: SidecarThread, serving_world: ServingWorld
) -> None:
    """The default sidecar: Generates leave no capture store behind."""
    _generate(sidecar.stub, serving_world.prompts[CLUSTER], CLUSTER)
    assert sidecar.service.capture is None
    assert not (Path(sidecar.running.settings.state_dir) / "capture.sqlite3").exists()


def test_generates_are_captured_with_their_verified_outputs(capturing: tuple) -> None:
    sidecar, outputs = capturing
    store = sidecar.service.capture
    assert {s.cluster: s.samples for s in store.stats()} == {CLUSTER: CAPTURED, "math": 2}
    assert [p.output_ids for p in store.pairs(CLUSTER)] == outputs
    assert all(p.prompt_ids for p in store.pairs(CLUSTER))


def test_clusters_command_and_gauges(capturing: tuple) -> None:
    sidecar, _ = capturing
    state_dir = str(sidecar.running.settings.state_dir)
    result = _cli(
        "clusters", "--address", sidecar.running.address, "--state-dir", state_dir, "--json"
    )
    assert result.exit_code == 0, result.output
    views = {v["cluster"]: v for v in map(json.loads, result.output.splitlines())}
    chat = views[CLUSTER]
    assert chat["captured_samples"] == CAPTURED
    assert chat["requests"] > 0 and 0 < chat["traffic_share"] <= 1
    assert chat["best_drafter"] in {"ngram", "none"}
    assert sum(v["traffic_share"] for v in views.values()) == pytest.approx(1.0)
    table = _cli("clusters", "--address", sidecar.running.address, "--state-dir", state_dir)
    assert table.exit_code == 0 and "headroom" in table.output and CLUSTER in table.output
    scraped = _scrape(sidecar.metrics_url)
    assert scraped[("specroute_capture_samples", (("cluster", CLUSTER),))] == CAPTURED
    share = scraped[("specroute_cluster_traffic_share_ratio", (("cluster", CLUSTER),))]
    assert share == pytest.approx(chat["traffic_share"])


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_every_metric_the_dashboard_queries_is_exported(capturing: tuple) -> None:
    sidecar, _ = capturing
    exported = {name for name, _ in _scrape(sidecar.metrics_url)}
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bspecroute_[a-z0-9_]+", target["expr"])
    }
    assert len(queried) >= 12
    assert queried - exported == set(), f"queried, not exported: {sorted(queried - exported)}"


def _distill(sidecar: SidecarThread, world: ServingWorld, out: Path, *extra: str) -> object:
    return _cli(
        "drafters", "distill", "--cluster", CLUSTER, "--out", str(out),
        "--state-dir", str(sidecar.running.settings.state_dir),
        "--world", str(world.world.root),
        "--address", sidecar.running.address, "--token", ADMIN_TOKEN, *extra,
    )  # fmt: skip


def _served(sidecar: SidecarThread) -> set[str]:
    return {d.name for d in sidecar.stub.ListDrafters(pb.ListDraftersRequest()).drafters}


def test_a_distilled_drafter_that_does_not_beat_the_current_arm_is_not_registered(
    capturing: tuple, serving_world: ServingWorld, misled_drafter: Path
) -> None:
    sidecar, _ = capturing
    out = serving_world.extra_root / "unchanged"
    # No steps: the drafter is the one it started from, which it must beat.
    result = _distill(
        sidecar, serving_world, out, "--from", str(misled_drafter), "--steps", "0",
        "--register", "unchanged",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    refusal = [line for line in result.output.splitlines() if line.startswith("not registered")]
    assert len(refusal) == 1 and "does not beat" in refusal[0]
    assert "unchanged" not in _served(sidecar)
    counts = CaptureStore(Path(sidecar.running.settings.state_dir)).distillation_counts()
    assert counts["refused"] >= 1


@pytest.mark.parametrize(
    ("name", "told"),
    [
        ("bad name", "'bad name' is not a drafter name"),
        ("none", "'none' is not a drafter name"),
        ("ngram", "has a drafter named 'ngram'"),
    ],
)
def test_a_name_registration_would_refuse_is_told_before_the_fine_tune(
    capturing: tuple, serving_world: ServingWorld, misled_drafter: Path, name: str, told: str
) -> None:
    """``--register`` with a name the sidecar refuses (not a name, or one it has) was
    told after the whole fine-tune, hours with a real model, and the run written."""
    sidecar, _ = capturing
    out = serving_world.extra_root / "never-written"
    result = _distill(
        sidecar, serving_world, out, "--from", str(misled_drafter), "--steps", "1",
        "--register", name,
    )  # fmt: skip
    assert result.exit_code != 0
    assert told in " ".join(result.output.split()), result.output
    assert "distilling" not in result.output and not out.exists()


def test_distillation_on_captured_traffic_registers_a_drafter_that_pays(
    capturing: tuple, serving_world: ServingWorld, misled_drafter: Path
) -> None:
    from drafters.loader import load_model

    sidecar, _ = capturing
    out = serving_world.extra_root / "chat-distilled"
    result = _distill(
        sidecar, serving_world, out, "--from", str(misled_drafter), "--steps", "40",
        "--lr", "3e-3", "--register", "chat-distilled",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = {
        line.split(" of ")[-1].split(":")[0] if " of " in line else "after": float(line.split()[-1])
        for line in result.output.splitlines()
        if line.startswith("held-out acceptance")
    }
    assert figures["after"] > max(v for k, v in figures.items() if k != "after"), figures
    report = json.loads((out / "distill.json").read_text())
    assert report["labels"] == "soft" and report["acceptance_after"] == figures["after"]
    assert report["held_out_samples"] + report["train_samples"] == CAPTURED
    assert "chat-distilled" in _served(sidecar)
    assert load_model(out).parameter_count > 0
    sample = read_finetune_sample(out)
    assert len(sample) == report["train_samples"] and "<|im_start|>" in sample[0]
    chunks = list(
        sidecar.stub.Generate(
            pb.GenerateRequest(
                text=sample[0],
                max_new_tokens=8,
                force_drafter="chat-distilled",
                force_draft_length=3,
                no_update=True,
            ),
            timeout=120,
        )
    )
    assert chunks[-1].stats.accepted_tokens > 0
    counts = CaptureStore(Path(sidecar.running.settings.state_dir)).distillation_counts()
    assert counts["registered"] == 1


def test_capture_survives_sigkill_and_purge_removes_it(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    """A real ``specroute serve`` killed with SIGKILL keeps every capture committed before
    the kill; ``specroute capture purge`` removes them, per cluster and all."""
    state_dir = tmp_path / "state"
    config = serving_world.toml(tmp_path / "sidecar.toml")
    with config.open("a") as handle:
        handle.write("[capture]\nenabled = true\nsamples_per_cluster = 3\n")
    prompts = _chat_prompts(serving_world, CLUSTER, 4) + _chat_prompts(serving_world, "math", 1)
    with launch_sidecar(
        state_dir=state_dir, config_file=config, admin_token=ADMIN_TOKEN, http=False
    ) as launched:
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(launched.grpc_address))
        for text in prompts[:4]:
            _generate(stub, text, CLUSTER)
        _generate(stub, prompts[4], "math")
        launched.process.send_signal(signal.SIGKILL)
        assert launched.process.wait(30) == -signal.SIGKILL
    store = CaptureStore(state_dir)
    assert {s.cluster: s.samples for s in store.stats()} == {CLUSTER: 3, "math": 1}
    store.close()
    stats = _cli("capture", "stats", "--state-dir", str(state_dir))
    assert stats.exit_code == 0 and re.search(rf"^{CLUSTER}\s+3\s", stats.output, re.M)
    purged = _cli("capture", "purge", "--cluster", "math", "--state-dir", str(state_dir))
    assert purged.exit_code == 0 and "purged 1 " in purged.output
    assert [s.cluster for s in CaptureStore(state_dir).stats()] == [CLUSTER]
    # Every cluster: asked first (declined: nothing purged), or --yes.
    declined = CliRunner().invoke(
        build_app(), ["capture", "purge", "--state-dir", str(state_dir)], input="n\n"
    )
    assert declined.exit_code == 1 and "purged" not in declined.output
    assert [s.cluster for s in CaptureStore(state_dir).stats()] == [CLUSTER]
    purged = _cli("capture", "purge", "--state-dir", str(state_dir), "--yes")
    assert purged.exit_code == 0 and "purged 3 " in purged.output
    assert CaptureStore(state_dir).stats() == []
    shutil.rmtree(state_dir)
    # A mistyped state directory is an error, not "purged 0".
    typo = _cli("capture", "purge", "--state-dir", str(tmp_path / "stat"), "--yes")
    assert typo.exit_code == 1 and "no capture database" in typo.output


def test_purge_names_the_registered_drafters_that_keep_prompts(tmp_path: Path) -> None:
    """A distilled drafter keeps 64 captured prompts as its fine-tuning sample (drafter
    store and directory), which purge does not delete: it said nothing of them."""
    from router.store import DrafterRecord, SidecarStore

    state_dir = tmp_path / "state"
    capture = CaptureStore(state_dir, CaptureSettings(enabled=True))
    assert capture.record("code", [1, 2, 3], [4, 5])
    capture.close()
    purged = _cli("capture", "purge", "--state-dir", str(state_dir), "--yes")
    assert purged.exit_code == 0 and "note:" not in purged.output  # no drafter store yet
    assert not (state_dir / "sidecar.sqlite3").exists()  # and none made by looking
    store = SidecarStore(state_dir)
    sample = ("def add(a, b):", "sort a list")
    store.add_drafter(DrafterRecord("code-v2", "model", "/models/code-v2", ("code",), sample))
    store.add_drafter(DrafterRecord("ngram-wide", "ngram"))
    store.close()
    purged = _cli("capture", "purge", "--state-dir", str(state_dir), "--yes")
    assert purged.exit_code == 0, purged.output
    note = " ".join(purged.output.split())
    assert "code-v2 (/models/code-v2)" in note and "ngram-wide" not in note, note


def test_the_current_arm_of_any_kind_is_scored_as_the_sidecar_builds_it(
    serving_world: ServingWorld, components: Components
) -> None:
    """`drafters distill` compares the distilled drafter with the cluster's current arm. A
    copy-or-model or self arm was scored as no drafter (acceptance 0), which any distilled
    drafter beats; now it is built as the sidecar builds it, or, without the target's
    weights on this host, the comparison is refused rather than passed."""
    from types import SimpleNamespace

    import torch

    from drafters.loader import DevicePlacement
    from router.capture_cli import _scorer

    placement = DevicePlacement(torch.device("cpu"), torch.float32)
    generic = serving_world.world.drafter_dirs["generic"]
    info = SimpleNamespace(kind="copy-or-model", path=str(generic), options={})
    scorer = _scorer("copy", info, placement, lambda: components.target)
    prompt = list(components.target.tokenizer("one two three four five six")["input_ids"])
    output = prompt * 3  # repeats the prompt: a copy drafter's best case
    assert sum(scorer(prompt, output, 4)) > 0
    assert _scorer("copy", info, placement, lambda: None) is None


def test_a_full_disk_fails_no_request_and_is_logged_once(
    capturing: tuple, serving_world: ServingWorld, caplog: pytest.LogCaptureFixture
) -> None:
    """A capture store with no room left logged a traceback for every request it served.
    The requests are still served; each failure is counted in
    ``specroute_capture_failures_total``, only the first is logged, and the first capture
    stored once there is room again says so. (Last in this module: it adds a math sample.)"""
    sidecar, _ = capturing
    store = sidecar.service.capture
    metric = ("specroute_capture_failures_total", ())
    failures_before = _scrape(sidecar.metrics_url)[metric]
    samples_before = {s.cluster: s.samples for s in store.stats()}["math"]
    prompts = _chat_prompts(serving_world, "math", 4)
    with caplog.at_level(logging.INFO, logger="router"):
        store._db = FailingWrites(store._db)
        try:
            for text in prompts[:3]:
                assert _streamed_ids(_generate(sidecar.stub, text, "math"))
        finally:
            store._db = store._db.db  # room again
        assert _streamed_ids(_generate(sidecar.stub, prompts[3], "math"))
    assert _scrape(sidecar.metrics_url)[metric] == failures_before + 3
    logged = [r for r in caplog.records if r.getMessage().startswith("capturing a math request")]
    assert len(logged) == 1
    assert "capture stored again after 3 that failed" in caplog.text
    assert {s.cluster: s.samples for s in store.stats()}["math"] == samples_before + 1
