"""``specroute study``: four research questions (docs/benchmarks.md), measured through the API.

One sidecar, one calibration, then these replays (each a normal replay report in its own
folder, reused when already there with the same size and policies):

- ``uniform``: the uniform mix under every policy (RQ2, RQ3);
- ``single-<task>``: each task alone, and ``chat-heavy``: the LMSYS-like mix (RQ4);
- ``rq1-single`` / ``rq1-mixed``: every drafter forced at k0 (``fixed`` policy) on the same
  prompts, grouped by task vs shuffled (RQ1), against the TF-IDF similarity of each
  drafter's fine-tuning sample to each task's training text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.replay.builtin import TraceOptions, builtin_trace
from benchmarks.replay.calibration import (
    Calibration,
    CalibrationOptions,
    calibrate,
    calibration_from_json,
    stale_calibration,
    warm_up,
)
from benchmarks.replay.client import ReplayClient
from benchmarks.replay.replay import PolicySetting
from benchmarks.replay.report import load_runs
from benchmarks.replay.runner import (
    ReplayConfig,
    WorldLike,
    calibration_requests,
    load_world,
    replay_on_client,
    sidecar,
    world_root,
)
from benchmarks.replay.study_report import write_study
from benchmarks.replay.trace import Trace
from benchmarks.world.layout import read_examples
from router.bundle import read_finetune_sample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyConfig:
    """Sizes and policies of the study's replays."""

    out_dir: Path
    world_dir: Path | None = None
    address: str | None = None
    admin_token: str | None = None
    mixed_per_task: int = 40
    single_per_task: int = 10
    chat_heavy_per_task: int = 10
    rq1_per_task: int = 4
    mixed_policies: tuple[str, ...] = ("none", "generic", "static", "ucb", "thompson", "oracle")
    single_policies: tuple[str, ...] = ("none", "generic", "static", "thompson")
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    max_new_tokens_cap: int = 128
    seed: int = 0
    progress: bool = True
    reuse: bool = True


@dataclass
class StudyRuns:
    """The reports and runs the analyses read (report data, runs) per trace name."""

    calibration: Calibration
    replays: dict[str, tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=dict)


def _matches(out_dir: Path, trace: Trace, labels: Sequence[str]) -> bool:
    path = out_dir / "report.json"
    if not path.is_file():
        return False
    report = json.loads(path.read_text())
    replayed = [p for p, section in report["policies"].items() if not section.get("derived")]
    # The same requests, not only as many: a study at another --max-new-tokens (or on
    # another world) reused replays of other budgets (or prompts) without a word.
    return report["trace"].get("digest") == trace.digest() and replayed == list(labels)


def _replay(
    client: ReplayClient,
    trace: Trace,
    settings: list[PolicySetting] | None,
    labels: Sequence[str],
    config: StudyConfig,
    world: WorldLike,
    calibration: Calibration,
    runs: StudyRuns,
) -> None:
    """Replay (or reuse) one trace into ``<out>/<trace name>``."""
    out_dir = config.out_dir / trace.name
    if config.reuse and _matches(out_dir, trace, labels):
        logger.info("reusing %s", out_dir)
        runs.replays[trace.name] = load_runs(out_dir)
        return
    replay_config = ReplayConfig(
        trace=trace.name, out_dir=out_dir, policies=tuple(labels), progress=config.progress
    )
    outcome = replay_on_client(client, trace, replay_config, world, calibration, settings)
    runs.replays[trace.name] = (outcome.report, outcome.runs)


def rq1_settings(calibration: Calibration, drafters: Sequence[str]) -> list[PolicySetting]:
    """``none`` plus every drafter pinned at the probe length (``fixed`` policy)."""
    fixed = [
        PolicySetting(f"fixed-{d}", "fixed", {"drafter": d, "k": calibration.probe_k})
        for d in drafters
    ]
    return [PolicySetting("none", "none"), *fixed]


def _grouped_by_task(trace: Trace, name: str) -> Trace:
    """The same requests, task after task (a sequence of single-task traces)."""
    ordered = sorted(trace.requests, key=lambda r: (r.task or "", r.arrival_s))
    return Trace(name=name, records=tuple(ordered))


def _reusable_calibration(
    client: ReplayClient, config: StudyConfig, world: WorldLike, path: Path
) -> Calibration | None:
    """The calibration saved at ``path`` when the study may reuse it: asked to reuse, and
    measured on this world, of the sidecar's drafters, with the study's options."""
    if not config.reuse or not path.is_file():
        return None
    saved = calibration_from_json(json.loads(path.read_text()))
    drafters = [d.name for d in client.list_drafters()]
    why = stale_calibration(saved, world_root(world), drafters, config.calibration)
    if why is not None:
        logger.warning("not reusing %s: %s; calibrating anew", path, why)
        return None
    return saved


def run_study_replays(client: ReplayClient, config: StudyConfig, world: WorldLike) -> StudyRuns:
    """Calibrate once, then every replay the four questions need."""
    options = TraceOptions(seed=config.seed, max_new_tokens_cap=config.max_new_tokens_cap)
    test = read_examples(world.corpus_dir, "test")
    calibration_path = config.out_dir / "calibration.json"
    uniform_report = config.out_dir / "uniform" / "report.json"
    if config.reuse and not calibration_path.is_file() and uniform_report.is_file():
        # A uniform replay run into the study's folder beforehand carries its calibration.
        report = json.loads(uniform_report.read_text())
        saved = report.get("calibration")
        if saved:
            saved["world"] = saved.get("world") or report.get("world")
            calibration_path.write_text(json.dumps(saved, indent=2) + "\n")
    calibration = _reusable_calibration(client, config, world, calibration_path)
    if calibration is not None:
        # Measured by another sidecar: this one has not served a request yet.
        warm = builtin_trace("uniform", test, replace(options, per_task=1)).requests
        warm_up(client, warm, [d.name for d in client.list_drafters()], config.calibration)
    else:
        probe = builtin_trace("uniform", test, replace(options, per_task=1))
        requests = calibration_requests(world, probe, options, config.calibration.prompts_per_task)
        calibration = calibrate(
            client, requests, client.list_drafters(), config.calibration, world_root(world)
        )
        calibration_path.parent.mkdir(parents=True, exist_ok=True)
        calibration_path.write_text(json.dumps(calibration.to_json(), indent=2) + "\n")
    runs = StudyRuns(calibration)

    def replay(trace: Trace, labels: Sequence[str], settings: list[PolicySetting] | None) -> None:
        _replay(client, trace, settings, labels, config, world, calibration, runs)

    mixed = builtin_trace("uniform", test, replace(options, per_task=config.mixed_per_task))
    replay(mixed, config.mixed_policies, None)
    chat = builtin_trace("chat-heavy", test, replace(options, per_task=config.chat_heavy_per_task))
    replay(chat, config.single_policies, None)
    for task in world.tasks:
        single = replace(options, per_task=config.single_per_task)
        replay(builtin_trace(f"single-{task}", test, single), config.single_policies, None)

    drafters = [d.name for d in client.list_drafters() if d.name != "none"]
    settings = rq1_settings(calibration, drafters)
    labels = [s.label for s in settings]
    rq1 = builtin_trace("uniform", test, replace(options, per_task=config.rq1_per_task))
    replay(Trace("rq1-mixed", rq1.records), labels, settings)
    replay(_grouped_by_task(rq1, "rq1-single"), labels, settings)
    return runs


def finetune_samples(world: WorldLike) -> dict[str, list[str]]:
    """Each world drafter's fine-tuning sample (drafters without one are left out)."""
    samples = {
        name: list(read_finetune_sample(Path(path), limit=400))
        for name, path in world.drafter_dirs.items()
    }
    return {name: texts for name, texts in samples.items() if texts}


def task_texts(world: WorldLike, per_task: int = 300) -> dict[str, list[str]]:
    """Training text per task (prompt and response), as a drafter would have seen it."""
    texts: dict[str, list[str]] = {}
    for example in read_examples(world.corpus_dir, "train"):
        bucket = texts.setdefault(example.task, [])
        if len(bucket) < per_task:
            turns = " ".join(m["content"] for m in example.messages)
            bucket.append(f"{turns} {example.response}")
    return texts


def run_study(config: StudyConfig) -> Path:
    """Run (or reuse) every replay, analyse, write study.json / study.md / plots."""
    world = load_world(config.world_dir)
    with (
        sidecar(config.address, Path(world.root), config.admin_token) as (address, token),
        ReplayClient(address, token) as client,
    ):
        client.wait_ready()
        runs = run_study_replays(client, config, world)
    return write_study(
        runs.calibration,
        runs.replays,
        finetune_samples(world),
        task_texts(world),
        list(world.tasks),
        config.out_dir,
    )
