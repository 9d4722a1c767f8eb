"""One replay end to end: resolve the trace, reach (or start) a sidecar, calibrate, replay, report.

Used by ``specroute replay``, ``specroute study`` and ``specroute demo``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from benchmarks.replay.background import BackgroundLoadConfig, background_load, describe_load
from benchmarks.replay.builtin import (
    ExampleLike,
    TraceOptions,
    builtin_trace,
    check_trace_name,
    request_from_example,
)
from benchmarks.replay.calibration import Calibration, CalibrationOptions, calibrate
from benchmarks.replay.client import ReplayClient
from benchmarks.replay.learn import (
    CALIBRATED_POLICIES,
    LEARNING_POLICY,
    DistillationWatch,
    LearnOptions,
    awaited,
    capture_threshold,
    default_learn_task,
    distillation_figures,
    learn_figures,
    learn_sidecar_env,
    measure_reference,
    probe_request,
)
from benchmarks.replay.replay import (
    BASELINE_POLICY,
    DEFAULT_POLICIES,
    POLICY_SETTINGS,
    DrafterSource,
    EventHandlers,
    PolicyRun,
    PolicySetting,
    check_policy_labels,
    check_schedule,
    policy_settings,
    replay_policies,
    withheld_drafters,
)
from benchmarks.replay.report import build_report, write_report
from benchmarks.replay.trace import Trace, TraceRequest, read_trace
from benchmarks.world.layout import read_examples
from router.channel import client_tls

logger = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "SPECROUTE_ADMIN_TOKEN"


@dataclass(frozen=True)
class ReplayConfig:
    """Everything one ``specroute replay`` needs."""

    trace: str  # a built-in trace name or a JSONL file
    out_dir: Path
    policies: tuple[str, ...] = DEFAULT_POLICIES
    address: str | None = None  # None: start a sidecar on the world
    world_dir: Path | None = None  # None: the default world
    admin_token: str | None = None
    trace_options: TraceOptions = field(default_factory=TraceOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    generic_k: int | None = None  # None: the calibrated best k of the generic drafter
    task_hints: bool = False  # send the trace's task label as task_hint (skips the classifier)
    schedule: str = "interleaved"  # or "sequential": the whole trace per policy
    progress: bool = True
    plots: bool = True
    # Other work run beside the sidecar while the policies are replayed (not while calibrating).
    background: BackgroundLoadConfig = field(default_factory=BackgroundLoadConfig)
    # The learn trace's capture, distillation and reference (benchmarks.replay.learn).
    learn: LearnOptions = field(default_factory=LearnOptions)


ReportFinisher = Callable[[ReplayClient, Mapping[str, PolicyRun], dict[str, Any]], None]
"""Adds to a replay's report before it is written (it may still call the sidecar)."""


@dataclass
class ReplayOutcome:
    """What a replay produced."""

    report: dict[str, Any]
    report_path: Path
    trace: Trace
    runs: dict[str, PolicyRun]
    calibration: Calibration


class WorldLike(DrafterSource, Protocol):
    """What replays need of a model bundle (:class:`router.bundle.ModelBundle`)."""

    @property
    def root(self) -> Path: ...
    @property
    def tasks(self) -> Sequence[str]: ...
    @property
    def corpus_dir(self) -> Path: ...


def world_root(world: WorldLike | None) -> str | None:
    """How reports and calibrations name a world: its directory (None without one)."""
    return str(world.root) if world is not None else None


def load_world(world_dir: Path | None) -> WorldLike:
    """The world at ``world_dir``; without one, the default-scale world (built if missing)."""
    from router.bundle import ModelBundle

    if world_dir is not None:
        loaded: WorldLike = ModelBundle.load(world_dir)
        return loaded
    from benchmarks.world.build import build_world

    built: WorldLike = build_world(scale="default", progress=True)
    return built


def resolve_trace(spec: str, world: WorldLike | None, options: TraceOptions) -> Trace:
    """A trace file if ``spec`` is a path that exists, else a built-in trace of the world
    (``real``: the human-written prompts it was not built from, ``benchmarks/replay/real.py``)."""
    path = Path(spec)
    if path.suffix == ".jsonl" or path.is_file():
        return read_trace(path)
    if world is None:
        raise ValueError(f"{spec!r} is not a trace file, and built-in traces need a world")
    if spec == "real":
        from benchmarks.replay.real import real_trace

        return real_trace(options, world.tasks)
    return builtin_trace(spec, read_examples(world.corpus_dir, "test"), options)


def calibration_requests(
    world: WorldLike | None, trace: Trace, options: TraceOptions, per_task: int
) -> dict[str, list[TraceRequest]]:
    """Prompts per task to calibrate on: the world's validation split, else the trace's own."""
    grouped: dict[str, list[TraceRequest]] = {}
    if world is not None:
        examples: Sequence[ExampleLike] = read_examples(world.corpus_dir, "validation")
        for example in examples:
            if len(grouped.setdefault(example.task, [])) < per_task:
                grouped[example.task].append(request_from_example(example, 0, options))
        return grouped
    for request in trace.requests:
        if request.task and len(grouped.setdefault(request.task, [])) < per_task:
            grouped[request.task].append(request)
    if not grouped:  # it failed inside the calibration (StopIteration)
        raise ValueError(
            f'trace {trace.name!r}: no request has a "task", and without a world the '
            "calibration has no prompts per task: label some requests, or pass --world DIR "
            "to calibrate on the world's validation split"
        )
    return grouped


def world_env_without(world_dir: Path | None, withheld: Sequence[str]) -> dict[str, str]:
    """Sidecar settings (environment) serving the world minus the ``withheld`` drafters.

    Built-in drafters cannot be removed over the API, so a trace that starts without one
    gets a sidecar configured from explicit directories instead of ``--world``.
    """
    from router.bundle import ModelBundle, default_bundle_dir

    world = ModelBundle.load(world_dir or default_bundle_dir())
    drafters = {n: str(p) for n, p in world.drafter_dirs.items() if n not in withheld}
    classifier_dir = os.environ.get("SPECROUTE_CLASSIFIER_DIR")
    if not classifier_dir:
        from classifiers import ensure_world_classifier

        # Trained once, then cached in the bundle.
        classifier_dir = str(ensure_world_classifier(world.root, world.corpus_dir))
    return {
        "SPECROUTE_TARGET_DIR": str(world.target_dir),
        "SPECROUTE_CLASSIFIER_DIR": classifier_dir,
        "SPECROUTE_DRAFTER_DIRS": json.dumps(drafters),
        "SPECROUTE_MODEL_ROOTS": json.dumps([str(world.root)]),
    }


def replay_sidecar_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Settings the replay's own sidecar gets unless ``environ`` sets them."""
    return {
        # Passive OpenMP waits: spinning workers slow torch several-fold on shared cores.
        "OMP_WAIT_POLICY": environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        # fp32: the replay checks every output token for token against plain decoding, and
        # in bf16 a verify pass over k + 1 positions can round differently from one-token
        # steps and flip a near-tie (2-5 of 70 demo prompts on the v2 world's barely
        # trained target with dtype auto = bf16, 2026-12-02; none in fp32).
        "SPECROUTE_DTYPE": environ.get("SPECROUTE_DTYPE", "float32"),
    }


@contextlib.contextmanager
def sidecar(
    address: str | None,
    world_dir: Path | None,
    admin_token: str | None,
    withheld: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    state_dir: Path | None = None,
    log_path: Path | None = None,
) -> Iterator[tuple[str, str | None]]:
    """Yield (address, admin token): the given sidecar, or one started on the world (with
    ``extra_env`` settings, ``state_dir`` and ``log_path``, temporary ones when None)."""
    if address is not None:
        yield address, admin_token or os.environ.get(ADMIN_TOKEN_ENV)
        return
    from router.launch import launch_sidecar

    # A fresh sidecar with a one-off admin token: SetPolicy and drafter events need it.
    token = admin_token or secrets.token_urlsafe(24)
    env = replay_sidecar_env(os.environ)
    if withheld:
        env.update(world_env_without(world_dir, withheld))
    env.update(extra_env or {})
    with launch_sidecar(
        None if withheld else world_dir,
        state_dir=state_dir,
        log_path=log_path,
        admin_token=token,
        http=False,
        metrics=False,
        env=env,
    ) as launched:
        yield launched.grpc_address, token


def replay_on_client(
    client: ReplayClient,
    trace: Trace,
    config: ReplayConfig,
    world: WorldLike | None,
    calibration: Calibration | None = None,
    settings: Sequence[PolicySetting] | None = None,
    handlers: EventHandlers | None = None,
    finish: ReportFinisher | None = None,
) -> ReplayOutcome:
    """Calibrate (unless given), replay every policy (or the given settings), write the report
    (``finish`` adds to it first; ``handlers`` act on the trace's other events)."""
    if calibration is None:
        requests = calibration_requests(
            world, trace, config.trace_options, config.calibration.prompts_per_task
        )
        calibration = calibrate(
            client, requests, client.list_drafters(), config.calibration, world_root(world)
        )
    if config.generic_k is not None:
        calibration.generic_k = config.generic_k
    settings = list(settings or policy_settings(config.policies, calibration))
    with background_load(config.background) as load:
        runs = replay_policies(
            client,
            trace,
            settings,
            schedule=config.schedule,
            world=world,
            progress=config.progress,
            task_hints=config.task_hints,
            handlers=handlers,
        )
    report = build_report(
        trace,
        runs,
        calibration,
        address=client.address,
        world=world_root(world),
    )
    report["background_load"] = load.summary()
    report["out_dir"] = str(config.out_dir)
    if finish is not None:
        finish(client, runs, report)
    path = write_report(report, runs, calibration, config.out_dir, plots=config.plots)
    logger.info("report written to %s", path)
    return ReplayOutcome(report, path, trace, runs, calibration)


def run_replay(config: ReplayConfig) -> ReplayOutcome:
    """Replay ``config.trace`` under every policy and write the report to ``config.out_dir``."""
    # A typo is told before a world is loaded, or built (minutes), or the sidecar reached
    # and calibrated (a misspelt policy or schedule was told only after that).
    check_policy_labels(config.policies)
    check_schedule(config.schedule)
    trace_file = Path(config.trace)
    if trace_file.suffix == ".jsonl" and not trace_file.is_file():
        raise FileNotFoundError(f"no trace file {trace_file}")
    if not trace_file.is_file():
        check_trace_name(config.trace)
    needs_world = config.address is None or not trace_file.is_file()
    world = load_world(config.world_dir) if needs_world or config.world_dir else None
    options = config.trace_options
    if config.trace == "learn" and options.learn_task is None and world is not None:
        task = default_learn_task(Path(world.root) / "eval.json", world.tasks)
        options = dataclasses.replace(options, learn_task=task)
    trace = resolve_trace(config.trace, world, options)
    world_dir = Path(world.root) if world is not None else None
    if awaited(trace) is not None:
        return run_learn_replay(config, world, trace)
    # A sidecar given by address may serve TLS ($SPECROUTE_CA_FILE); one started here does not.
    tls = client_tls() if config.address is not None else None
    with (
        sidecar(config.address, world_dir, config.admin_token, withheld_drafters(trace)) as (
            address,
            token,
        ),
        ReplayClient(address, token, tls) as client,
    ):
        client.wait_ready()
        return replay_on_client(client, trace, config, world)


def needs_calibration(labels: Sequence[str], generic_k: int | None) -> bool:
    """Whether the policies' settings need a calibration (the learn replay may skip it)."""
    return bool(CALIBRATED_POLICIES & set(labels)) or ("generic" in labels and generic_k is None)


def learn_calibration(
    config: ReplayConfig, world: WorldLike, trace: Trace, withheld: Sequence[str]
) -> Calibration:
    """The learn replay's calibration, on a sidecar without capture (its forced arms are not
    traffic to learn from), or none when its policies need none."""
    if not needs_calibration(config.policies, config.generic_k):
        return Calibration(
            method="none (the learn replay's policies need no calibration)",
            prompts_per_task=0,
            probe_k=0,
            generic_k=config.generic_k or 4,
        )
    with (
        sidecar(None, Path(world.root), config.admin_token, withheld) as (address, token),
        ReplayClient(address, token) as client,
    ):
        client.wait_ready()
        requests = calibration_requests(
            world, trace, config.trace_options, config.calibration.prompts_per_task
        )
        return calibrate(
            client, requests, client.list_drafters(), config.calibration, world_root(world)
        )


def run_learn_replay(config: ReplayConfig, world: WorldLike | None, trace: Trace) -> ReplayOutcome:
    """The learn trace (benchmarks.replay.learn): its own sidecar with capture and automatic
    distillation, the halfway wait, the reference after the replay, the ``learn`` section."""
    found = awaited(trace)
    if world is None or config.address is not None or found is None:
        raise ValueError(
            "the learn trace starts its own sidecar on a world (capture and automatic "
            "distillation on): leave out --address"
        )
    if config.schedule != "interleaved":
        raise ValueError("the learn trace replays interleaved (its halves share one sidecar)")
    event, boundary = found
    task = event.tasks[0]
    withheld = withheld_drafters(trace)
    labels = list(dict.fromkeys([BASELINE_POLICY, *config.policies]))
    calibration = learn_calibration(config, world, trace, withheld)
    min_samples = capture_threshold(trace, len(labels), config.learn.capture_share)
    env = learn_sidecar_env(task, min_samples, config.learn)
    logger.info("learn %s: distillation after %d captured samples", task, min_samples)
    learner = POLICY_SETTINGS[LEARNING_POLICY](calibration) if LEARNING_POLICY in labels else None
    config.out_dir.mkdir(parents=True, exist_ok=True)
    log = config.out_dir / "sidecar.log"  # the distillation's verdict is logged there
    with (
        tempfile.TemporaryDirectory(prefix="specroute-learn-") as state,
        sidecar(None, Path(world.root), config.admin_token, withheld, env, Path(state), log) as (
            address,
            token,
        ),
        ReplayClient(address, token) as client,
    ):
        client.wait_ready()
        probe = probe_request(trace, task, config.learn.probe_max_new_tokens)
        watch = DistillationWatch(client, Path(state), probe, learner, config.learn, log)
        watch.measure_idle()

        def finish(
            client: ReplayClient, runs: Mapping[str, PolicyRun], report: dict[str, Any]
        ) -> None:
            second = [r for r in trace.requests[boundary:] if r.task == task]
            reference = measure_reference(client, world, task, second, config.learn.reference_k)
            label = LEARNING_POLICY if LEARNING_POLICY in runs else BASELINE_POLICY
            report["learn"] = learn_figures(
                runs[label].results,
                runs[BASELINE_POLICY].results,
                task,
                boundary,
                reference,
                distillation_figures(watch),
            )
            report["learn"]["policy"] = label
            report["learn"]["capture_threshold"] = min_samples

        return replay_on_client(
            client,
            trace,
            config,
            world,
            calibration,
            handlers={"await_drafter": watch},
            finish=finish,
        )


#: Validation prompts per task the demo calibrates its forced arms on (at most its
#: ``per_task``).
DEMO_CALIBRATION_PROMPTS = 2


def run_demo_replay(
    world_dir: Path | None,
    out_dir: Path,
    *,
    per_task: int = 10,
    policies: Sequence[str] = DEFAULT_POLICIES,
    address: str | None = None,
    admin_token: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The demo's replay: the uniform mixed trace on the world; returns the report (JSON data).

    ``report["out_dir"]`` says where report.json, report.md and the plots are.
    """
    config = ReplayConfig(
        trace="uniform",
        out_dir=out_dir,
        policies=tuple(policies),
        address=address,
        world_dir=world_dir,
        admin_token=admin_token,
        trace_options=TraceOptions(per_task=per_task),
        # A lighter calibration than the benchmark's: the demo should take minutes, and a
        # replay of one request per task (a quick look) calibrates on one prompt per task.
        calibration=CalibrationOptions(
            prompts_per_task=min(DEMO_CALIBRATION_PROMPTS, per_task),
            k_grid=(1, 2, 3, 4, 6),
            top_drafters=1,
            progress=progress,
        ),
        progress=progress,
    )
    return run_replay(config).report


def format_task_table(report: Mapping[str, Any]) -> str:
    """The per-task speed-up table (tasks x policies, then evenness rows) as aligned text."""
    from benchmarks.replay.report import lossless_note, task_table_rows

    header, rows = task_table_rows(report)
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = (
        f"Replay of '{report['trace']['name']}' ({report['trace']['requests']} requests); "
        + describe_load(report.get("background_load"))
    )
    footer = (
        f"report: {report['out_dir']}/report.md (and report.json, plots)"
        if report.get("out_dir")
        else ""
    )
    return "\n".join([title, *lines, lossless_note(report), footer]).rstrip() + "\n"
