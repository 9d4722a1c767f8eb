"""``specroute replay`` and ``specroute study``: benchmark replays through the live gRPC API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from benchmarks.outputs import not_a_file
from router.serve_cli import address_option, token_option

DEFAULT_REPORTS_DIR = Path("out")  # git-ignored
# Kept here (not imported from replay.py) so that `specroute --help` stays light.
DEFAULT_POLICIES = ("none", "generic", "static", "ucb", "thompson", "oracle")
# The learn trace's defaults (benchmarks.replay.learn and builtin, also kept light here).
LEARN_POLICIES = ("none", "thompson")
LEARN_PER_TASK = 12
LEARN_WEIGHT = 4
# The built-in traces' names (benchmarks.replay.builtin, kept light here), for --help.
BUILTIN_TRACES = (
    "uniform",
    "chat-heavy",
    "drift",
    "new-drafter",
    "learn",
    "structured",
    "real",
    "single-<task>",
)


def _policies(text: str) -> tuple[str, ...]:
    """The comma-separated policy labels; none at all is a usage error (``--policies ,``
    replayed the baseline alone, as if asked for it)."""
    labels = tuple(p.strip() for p in text.split(",") if p.strip())
    if not labels:
        raise typer.BadParameter("names no policy", param_hint="--policies")
    return labels


def replay_command(
    trace: str = typer.Option(
        ...,
        "--trace",
        help=f"A built-in trace ({', '.join(BUILTIN_TRACES)}) or a JSONL trace file.",
    ),
    address: str | None = typer.Option(
        None,
        "--address",
        callback=address_option,
        help="host:port of a running sidecar; default: start one on the world.",
    ),
    policies: str | None = typer.Option(
        None,
        "--policies",
        help="Comma-separated; 'none' always runs first (default: "
        f"{','.join(DEFAULT_POLICIES)}; for learn: {','.join(LEARN_POLICIES)}).",
    ),
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", callback=not_a_file, help="Report folder (default: out/replay-<trace>)."
        ),
    ] = None,
    world: Annotated[
        Path | None, typer.Option("--world", help="World directory (default: the default world).")
    ] = None,
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="SPECROUTE_ADMIN_TOKEN",
        callback=token_option,
        help="Admin bearer token (SetPolicy).",
    ),
    per_task: int | None = typer.Option(
        None,
        "--per-task",
        min=1,
        help=f"Requests per task (built-in; default 40, for learn {LEARN_PER_TASK}, its "
        f"task {LEARN_WEIGHT} times as many).",
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Cap per request."),
    seed: int = typer.Option(0, "--seed", help="Seed of the built-in trace."),
    calibration_prompts: int = typer.Option(
        3, "--calibration-prompts", min=1, help="Validation prompts per task for calibration."
    ),
    generic_k: int | None = typer.Option(
        None, "--generic-k", min=1, help="k of the generic policy (default: the calibrated best)."
    ),
    task_hints: bool = typer.Option(
        False, "--task-hints", help="Send trace task labels as task_hint (skips the classifier)."
    ),
    schedule: str = typer.Option(
        "interleaved",
        "--schedule",
        help="interleaved: each request under every policy back to back (paired timings); "
        "sequential: the whole trace per policy.",
    ),
    background_load: str = typer.Option(
        "none",
        "--background-load",
        help="Other work beside the sidecar while the policies are replayed: none, steady "
        "(busy loops) or bursty (busy and idle spells of random 0.2-2 s).",
    ),
    load_procs: int = typer.Option(2, "--load-procs", min=1, help="Background load processes."),
    load_seed: int = typer.Option(0, "--load-seed", help="Seed of the bursty spells."),
    learn_cluster: str | None = typer.Option(
        None,
        "--learn-cluster",
        help="learn: the task whose world drafter is withheld (default: the one whose own "
        "drafter gains most tokens per step over generic in the world's eval.json).",
    ),
    distill_steps: int = typer.Option(
        100, "--distill-steps", min=1, help="learn: steps of the automatic distillation."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    plots: bool = typer.Option(True, "--plots/--no-plots"),
) -> None:
    """Replay a trace under each policy through Generate; write report.json, report.md, plots."""
    from benchmarks.replay.background import LOAD_MODES, BackgroundLoadConfig
    from benchmarks.replay.builtin import TraceOptions
    from benchmarks.replay.calibration import CalibrationOptions
    from benchmarks.replay.learn import LearnOptions
    from benchmarks.replay.runner import ReplayConfig, format_task_table, run_replay
    from benchmarks.replay.trace import TraceFormatError

    if background_load not in LOAD_MODES:
        typer.echo(
            f"error: unknown --background-load {background_load!r}; known: {', '.join(LOAD_MODES)}",
            err=True,
        )
        raise typer.Exit(2)
    name = Path(trace).stem if trace.endswith(".jsonl") else trace
    learn = trace == "learn"
    if per_task is None:
        per_task = LEARN_PER_TASK if learn else 40
    if learn and per_task < 2:  # its first half, which the distillation learns from, empty
        raise typer.BadParameter(
            "the learn trace needs at least 2: its first half is the traffic the automatic "
            "distillation learns from (with 1 it is empty, and the replay waited for a "
            "drafter never made)",
            param_hint="--per-task",
        )
    if learn_cluster is not None and not learn:  # it was ignored without a word
        raise typer.BadParameter("is for --trace learn only", param_hint="--learn-cluster")
    if policies is None:
        policies = ",".join(LEARN_POLICIES if learn else DEFAULT_POLICIES)
    config = ReplayConfig(
        trace=trace,
        out_dir=out or DEFAULT_REPORTS_DIR / f"replay-{name}",
        policies=_policies(policies),
        address=address,
        world_dir=world,
        admin_token=token,
        trace_options=TraceOptions(
            per_task=per_task,
            seed=seed,
            max_new_tokens_cap=max_new_tokens,
            learn_task=learn_cluster,
        ),
        calibration=CalibrationOptions(prompts_per_task=calibration_prompts, progress=progress),
        generic_k=generic_k,
        task_hints=task_hints,
        schedule=schedule,
        progress=progress,
        plots=plots,
        background=BackgroundLoadConfig(background_load, load_procs, load_seed),
        learn=LearnOptions(steps=distill_steps),
    )
    try:
        outcome = run_replay(config)
    except (TraceFormatError, KeyError, FileNotFoundError, ValueError) as error:
        # str(KeyError) is its message quoted; the message alone reads as the others do.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from error
    typer.echo(format_task_table(outcome.report))


def study_command(
    out: Annotated[
        Path, typer.Option("--out", callback=not_a_file, help="Study folder.")
    ] = DEFAULT_REPORTS_DIR / "study",
    world: Annotated[
        Path | None, typer.Option("--world", help="World directory (default: the default world).")
    ] = None,
    address: str | None = typer.Option(
        None, "--address", callback=address_option, help="Running sidecar (default: start one)."
    ),
    token: str | None = typer.Option(
        None, "--token", envvar="SPECROUTE_ADMIN_TOKEN", callback=token_option
    ),
    mixed_per_task: int = typer.Option(40, "--mixed-per-task", min=1),
    single_per_task: int = typer.Option(10, "--single-per-task", min=1),
    chat_heavy_per_task: int = typer.Option(10, "--chat-heavy-per-task", min=1),
    rq1_per_task: int = typer.Option(4, "--rq1-per-task", min=1),
    calibration_prompts: int = typer.Option(3, "--calibration-prompts", min=1),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    reuse: bool = typer.Option(True, "--reuse/--no-reuse", help="Reuse finished replays in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Answer the four research questions with measured replays; write study.json and study.md."""
    from benchmarks.replay.calibration import CalibrationOptions
    from benchmarks.replay.study import StudyConfig, run_study

    config = StudyConfig(
        out_dir=out,
        world_dir=world,
        address=address,
        admin_token=token,
        mixed_per_task=mixed_per_task,
        single_per_task=single_per_task,
        chat_heavy_per_task=chat_heavy_per_task,
        rq1_per_task=rq1_per_task,
        calibration=CalibrationOptions(prompts_per_task=calibration_prompts, progress=progress),
        max_new_tokens_cap=max_new_tokens,
        progress=progress,
        reuse=reuse,
    )
    path = run_study(config)
    typer.echo(f"study: {path.with_name('study.md')} (and study.json, plots)")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add ``replay`` and ``study`` to the root app."""
    app.command("replay")(replay_command)
    app.command("study")(study_command)
