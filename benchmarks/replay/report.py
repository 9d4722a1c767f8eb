"""The replay report: ``report.json`` (fixed keys), ``report.md``, per-request JSONL and plots.

``report.json`` holds, under ``policies``, per policy: ``per_task`` (task -> ``speedup``,
``tokens_per_s``, ``acceptance``, plus ``mean_accepted_length``, ``requests``, ``arms``),
``mean_speedup`` (traffic-weighted), ``min_speedup``, ``max_speedup``, ``max_over_min``,
``cv``, ``jain``, ``lossless``, ``dominant_arms_by_phase`` (cluster -> most chosen arm in
each phase: before/after the trace's events, else its halves), and with an oracle run
``fraction_of_oracle``, ``regret_s`` and ``regret_per_request_windows`` (8 slices).
Infinite values are written as ``null`` (JSON has no infinity).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.replay.background import describe_load
from benchmarks.replay.calibration import Calibration
from benchmarks.replay.learn import learn_markdown
from benchmarks.replay.metrics import (
    RequestResult,
    aggregate,
    cumulative_regret,
    dominant_arms,
    evenness,
    lossless_mismatches,
    paired_speedup,
    per_task_speedup,
    regret_per_window,
    speedup_by_length,
    task_stats,
)
from benchmarks.replay.replay import BASELINE_POLICY, PolicyRun, PolicySetting
from benchmarks.replay.trace import Trace, TraceRequest

ORACLE_POLICY = "oracle"
HINDSIGHT_POLICY = "oracle-hindsight"
ORACLE_REFERENCE_METHOD = (
    "fraction_of_oracle and regret use the better (mean speed-up) of the replayed oracle "
    "(calibrated table) and oracle-hindsight (per task, the fastest fixed-arm policy replayed: "
    "none, generic, static or oracle, on the same requests)"
)
REGRET_WINDOWS = 8
REPORT_SCHEMA = 1


def machine_description() -> dict[str, Any]:
    """Where the replay ran (the report's date-and-machine line)."""
    cpu = platform.processor() or ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "sched_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def event_request_indices(trace: Trace) -> list[int]:
    """For each event, how many requests were replayed before it."""
    indices: list[int] = []
    seen = 0
    for record in trace.records:
        if isinstance(record, TraceRequest):
            seen += 1
        else:
            indices.append(seen)
    return indices


def phase_boundaries(trace: Trace) -> list[int]:
    """Where a trace's phases start: its events, else (drift) the half-way request."""
    indices = [i for i in event_request_indices(trace) if i > 0]
    return indices or [len(trace.requests) // 2]


def finite(value: float | None) -> float | None:
    """``None`` for NaN/inf (JSON cannot hold them), else the value rounded to 6 digits."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, 6)


def policy_section(
    results: Sequence[RequestResult],
    baseline: Sequence[RequestResult],
    traffic: Mapping[str, float],
) -> dict[str, Any]:
    """Per-task figures and evenness of one policy against the baseline."""
    stats = task_stats(results)
    speedups = per_task_speedup(results, baseline)
    paired = paired_speedup(results, baseline)
    spread = evenness(speedups, traffic)
    mismatches = lossless_mismatches(results, baseline)
    return {
        "per_task": {
            task: {
                "speedup": finite(speedups[task]),
                "paired_speedup": finite(paired.get(task)),
                "tokens_per_s": finite(s.tokens_per_s),
                "acceptance": finite(s.acceptance),
                "mean_accepted_length": finite(s.mean_accepted_length),
                "requests": s.requests,
                "arms": dict(s.arms),
            }
            for task, s in stats.items()
        },
        "mean_speedup": finite(spread.mean),
        "min_speedup": finite(spread.minimum),
        "max_speedup": finite(spread.maximum),
        "max_over_min": finite(spread.max_over_min),
        "cv": finite(spread.cv),
        "jain": finite(spread.jain),
        "tokens_per_s": finite(aggregate(results).tokens_per_s),
        "lossless": not mismatches,
        "lossless_mismatches": mismatches,
        "greedy_requests": sum(r.greedy for r in results),
        "speedup_by_length": {
            k: finite(v) for k, v in speedup_by_length(results, baseline).items()
        },
    }


def hindsight_oracle(
    runs: Mapping[str, PolicyRun], baseline: Sequence[RequestResult]
) -> PolicyRun | None:
    """Per task, the replayed fixed-arm policy (none, generic, static, oracle) that was fastest.

    Its requests are that policy's own results on the task: the best fixed arm per task in
    hindsight among the arms actually replayed, on the same requests. Selected on the data
    it is scored on, so it is an optimistic (hard to beat) reference.
    """
    fixed = {label: run for label, run in runs.items() if not run.setting.learns}
    if len(fixed) < 2:
        return None
    speedups = {label: per_task_speedup(run.results, baseline) for label, run in fixed.items()}
    tasks = {r.task for r in baseline}
    chosen = {t: max(fixed, key=lambda label: speedups[label].get(t, 0.0)) for t in sorted(tasks)}
    by_id = {label: {r.request_id: r for r in run.results} for label, run in fixed.items()}
    results = [
        by_id[chosen[r.task]][r.request_id]
        for r in baseline
        if r.request_id in by_id[chosen[r.task]]
    ]
    setting = PolicySetting(HINDSIGHT_POLICY, "", {"per_task": chosen})
    return PolicyRun(setting, results, sum(r.wall_time_s for r in results))


def oracle_reference(
    runs: Mapping[str, PolicyRun],
    policies: Mapping[str, Mapping[str, Any]],
    hindsight: PolicyRun | None,
) -> tuple[str, list[RequestResult]] | None:
    """The oracle to compare with: the better (mean speed-up) of the replayed calibrated
    ``oracle`` and the hindsight composite."""
    candidates: dict[str, list[RequestResult]] = {}
    if ORACLE_POLICY in runs:
        candidates[ORACLE_POLICY] = runs[ORACLE_POLICY].results
    if hindsight is not None and ORACLE_POLICY in runs:
        candidates[HINDSIGHT_POLICY] = hindsight.results
    if not candidates:
        return None
    label = max(candidates, key=lambda name: policies[name]["mean_speedup"] or 0.0)
    return label, candidates[label]


def build_report(
    trace: Trace,
    runs: Mapping[str, PolicyRun],
    calibration: Calibration | None,
    *,
    address: str = "",
    world: str | None = None,
) -> dict[str, Any]:
    """The report as JSON-ready data (see the module docstring for the keys)."""
    if BASELINE_POLICY not in runs:
        raise ValueError("the 'none' baseline run is required for speed-ups")
    baseline = runs[BASELINE_POLICY].results
    traffic = {task: float(s.requests) for task, s in task_stats(baseline).items()}
    policies = {
        label: {
            "sidecar_policy": run.setting.policy,
            "learns": run.setting.learns,
            "config": dict(run.setting.config),
            "replay_seconds": round(run.seconds, 3),
            **policy_section(run.results, baseline, traffic),
        }
        for label, run in runs.items()
    }
    hindsight = hindsight_oracle(runs, baseline)
    if hindsight is not None:
        policies[HINDSIGHT_POLICY] = {
            "sidecar_policy": "",
            "derived": True,
            "config": dict(hindsight.setting.config),
            **policy_section(hindsight.results, baseline, traffic),
        }
    reference = oracle_reference(runs, policies, hindsight)
    if reference is not None:
        oracle_label, oracle_results = reference
        oracle_mean = policies[oracle_label]["mean_speedup"] or 0.0
        for label in policies:
            own = runs[label].results if label in runs else oracle_results
            section = policies[label]
            mean = section["mean_speedup"] or 0.0
            section["fraction_of_oracle"] = finite(mean / oracle_mean) if oracle_mean else None
            curve = cumulative_regret(own, oracle_results)
            section["regret_s"] = finite(curve[-1] if curve else 0.0)
            section["regret_per_request_windows"] = [
                finite(x) for x in regret_per_window(curve, REGRET_WINDOWS)
            ]
    phase_bounds = phase_boundaries(trace)
    for label, run in runs.items():
        policies[label]["dominant_arms_by_phase"] = dominant_arms(run.results, phase_bounds)
    if hindsight is not None:
        policies[HINDSIGHT_POLICY]["dominant_arms_by_phase"] = dominant_arms(
            hindsight.results, phase_bounds
        )
    return {
        "schema": REPORT_SCHEMA,
        "created_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_description(),
        "address": address,
        "world": world,
        "trace": {
            "name": trace.name,
            "requests": len(trace.requests),
            "digest": trace.digest(),
            "tasks": {task: int(n) for task, n in traffic.items()},
            "events": [e.model_dump(mode="json", exclude_defaults=True) for e in trace.events],
            "event_request_indices": event_request_indices(trace),
        },
        "baseline": BASELINE_POLICY,
        "speedup_definition": (
            "tokens/s (sum generated tokens / sum generation wall time, per task) over the "
            "'none' replay's tokens/s on the same prompts"
        ),
        "oracle_method": calibration.method if calibration else None,
        "oracle_reference": reference[0] if reference is not None else None,
        "oracle_reference_method": ORACLE_REFERENCE_METHOD,
        "calibration": calibration.to_json() if calibration else None,
        "policies": policies,
    }


def write_requests(runs: Mapping[str, PolicyRun], out_dir: Path) -> None:
    """Every request's result, one JSONL file per policy (``requests/<policy>.jsonl``)."""
    folder = out_dir / "requests"
    folder.mkdir(parents=True, exist_ok=True)
    for label, run in runs.items():
        lines = (json.dumps(dataclasses.asdict(r)) for r in run.results)
        (folder / f"{label}.jsonl").write_text("".join(f"{ln}\n" for ln in lines))


def read_requests(path: Path) -> list[RequestResult]:
    """Read back one ``requests/<policy>.jsonl`` file."""
    results = []
    for line in path.read_text().splitlines():
        data = json.loads(line)
        data["accepted_per_position"] = tuple(data["accepted_per_position"])
        data["output_ids"] = tuple(data["output_ids"])
        results.append(RequestResult(**data))
    return results


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def task_table_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-task speed-up table (tasks x policies, then evenness)."""
    policies = report["policies"]
    labels = list(policies)
    tasks = list(report["trace"]["tasks"])
    header = ["task", "requests", *labels]
    rows = [
        [task, str(report["trace"]["tasks"][task])]
        + [_fmt(policies[p]["per_task"].get(task, {}).get("speedup"), 2, "x") for p in labels]
        for task in tasks
    ]
    for key, name in (
        ("mean_speedup", "mean (traffic-weighted)"),
        ("min_speedup", "min"),
        ("max_over_min", "max/min"),
        ("cv", "CV"),
        ("jain", "Jain"),
    ):
        rows.append([name, ""] + [_fmt(policies[p].get(key), 3) for p in labels])
    if any("fraction_of_oracle" in policies[p] for p in labels):
        rows.append(
            ["fraction of oracle", ""]
            + [_fmt(policies[p].get("fraction_of_oracle"), 3) for p in labels]
        )
    rows.append(["lossless", ""] + [_lossless_cell(policies[p]) for p in labels])
    return header, rows


def _lossless_cell(section: Mapping[str, Any]) -> str:
    """``yes``, or ``NO (n of m)``: greedy outputs that differ from the baseline's."""
    if section["lossless"]:
        return "yes"
    return f"NO ({len(section['lossless_mismatches'])} of {section['greedy_requests']})"


#: Under a table with a lossless NO: what a difference means and how to check exactly.
LOSSLESS_NOTE = (
    "lossless: each policy's greedy outputs against the 'none' replay's, token for token. "
    "The tests check equality in float32; a sidecar serving bfloat16 (dtype 'auto' on a CPU or GPU "
    "with bf16) may differ where two tokens nearly tie, because a k-token verify rounds "
    "differently from a one-token step. For an exact check serve with SPECROUTE_DTYPE=float32 "
    "(a replay that starts its own sidecar does)."
)


def lossless_note(report: Mapping[str, Any]) -> str:
    """:data:`LOSSLESS_NOTE` when some policy's outputs differ from the baseline's, else ''."""
    policies = report["policies"]
    return LOSSLESS_NOTE if any(not s["lossless"] for s in policies.values()) else ""


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def phase_markdown(report: Mapping[str, Any]) -> list[str]:
    """Learning over time: regret slope per slice and each phase's dominant arm per cluster."""
    parts = ["## Over time", ""]
    windows = {
        label: section["regret_per_request_windows"]
        for label, section in report["policies"].items()
        if section.get("regret_per_request_windows")
    }
    if windows:
        count = max(len(w) for w in windows.values())
        parts += ["Regret per request against the oracle (s), in consecutive slices:", ""]
        parts += [
            markdown_table(
                ["policy", *(f"slice {i + 1}" for i in range(count))],
                [[label, *(_fmt(x, 4) for x in w)] for label, w in windows.items()],
            ),
            "",
        ]
    bounds = report["trace"].get("event_request_indices") or []
    parts += [
        f"Most chosen drafter:k per cluster in each phase (phases split at requests "
        f"{[b for b in bounds if b > 0] or 'half-way'}):",
        "",
    ]
    rows = [
        [label, cluster, *(phase.get(cluster, "—") for phase in section["dominant_arms_by_phase"])]
        for label, section in report["policies"].items()
        if label != BASELINE_POLICY
        for cluster in sorted({c for p in section["dominant_arms_by_phase"] for c in p})
    ]
    phases = max((len(s["dominant_arms_by_phase"]) for s in report["policies"].values()), default=0)
    parts += [
        markdown_table(["policy", "cluster", *(f"phase {i + 1}" for i in range(phases))], rows),
        "",
    ]
    return parts


def report_markdown(report: Mapping[str, Any], plots: Sequence[Path]) -> str:
    """``report.md``: what ran where, the per-task table, per-task detail and the plots."""
    machine = report["machine"]
    trace = report["trace"]
    parts = [
        f"# Replay of `{trace['name']}`",
        "",
        f"{report['created_utc']} on {machine['cpu']} ({machine['cpu_count']} CPUs), "
        f"{machine['platform']}; {trace['requests']} requests, world `{report['world']}`.",
        "",
        f"Speed-up: {report['speedup_definition']}.",
        "",
        describe_load(report.get("background_load")) + " (during the replay, not the calibration).",
        "",
        "## Per-task speed-up by policy",
        "",
        markdown_table(*task_table_rows(report)),
        "",
    ]
    if note := lossless_note(report):
        parts += [note, ""]
    if report.get("oracle_method"):
        cal = report["calibration"]
        parts += [
            f"Oracle: {report['oracle_method']}.",
            "",
            markdown_table(
                ["task", "oracle drafter", "k", "calibrated speed-up"],
                [
                    [t, c["drafter"], str(c["k"]), _fmt(c["speedup"], 2, "x")]
                    for t, c in cal["oracle"].items()
                ],
            ),
            "",
            f"Generic drafter's fixed k: {cal['generic_k']}.",
            "",
        ]
    parts += ["## Per task and policy", ""]
    detail_rows = [
        [
            label,
            task,
            _fmt(row["tokens_per_s"], 1),
            _fmt(row["speedup"], 2, "x"),
            _fmt(row.get("paired_speedup"), 2, "x"),
            _fmt(row["acceptance"], 3),
            _fmt(row["mean_accepted_length"], 2),
            ", ".join(f"{arm} ({n})" for arm, n in list(row["arms"].items())[:3]),
        ]
        for label, section in report["policies"].items()
        for task, row in section["per_task"].items()
    ]
    parts += [
        markdown_table(
            [
                "policy",
                "task",
                "tokens/s",
                "speed-up",
                "paired speed-up (geo. mean)",
                "acceptance",
                "mean accepted length",
                "chosen (drafter:k, requests)",
            ],
            detail_rows,
        ),
        "",
    ]
    parts += phase_markdown(report)
    parts += learn_markdown(report)
    parts += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(parts) + "\n"


def write_report(
    report: Mapping[str, Any],
    runs: Mapping[str, PolicyRun],
    calibration: Calibration | None,
    out_dir: Path,
    *,
    plots: bool = True,
) -> Path:
    """Write report.json, report.md, requests/*.jsonl and the PNG plots; returns report.json."""
    from benchmarks.replay.plots import replay_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    write_requests(runs, out_dir)
    pngs = replay_plots(report, runs, calibration, out_dir) if plots else []
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out_dir / "report.md").write_text(report_markdown(report, pngs))
    return path


def load_runs(out_dir: Path) -> tuple[dict[str, Any], dict[str, PolicyRun]]:
    """Read a written report back: (report.json data, runs rebuilt from requests/*.jsonl)."""
    report = json.loads((out_dir / "report.json").read_text())
    runs = {
        label: PolicyRun(
            PolicySetting(
                label,
                section["sidecar_policy"],
                section.get("config", {}),
                learns=bool(section.get("learns", False)),
            ),
            read_requests(out_dir / "requests" / f"{label}.jsonl"),
            float(section.get("replay_seconds", 0.0)),
        )
        for label, section in report["policies"].items()
        if not section.get("derived")
    }
    return report, runs


def rebuild_report(out_dir: Path, *, plots: bool = True) -> dict[str, Any]:
    """Recompute report.json / report.md / plots of a finished replay from its request files."""
    from benchmarks.replay.calibration import calibration_from_json
    from benchmarks.replay.trace import TraceEvent, TraceRecord

    old, runs = load_runs(out_dir)
    calibration = calibration_from_json(old["calibration"]) if old.get("calibration") else None
    first = next(iter(runs.values())).results
    events = [TraceEvent.model_validate(e) for e in old["trace"].get("events", [])]
    requests: list[TraceRecord] = [
        TraceRequest(id=r.request_id, task=r.task, prompt="-", max_new_tokens=1) for r in first
    ]
    records = list(requests)
    for index, event in sorted(
        zip(old["trace"].get("event_request_indices", []), events, strict=False),
        key=lambda x: -x[0],
    ):
        records.insert(index, event)
    trace = Trace(old["trace"]["name"], tuple(records))
    report = build_report(
        trace, runs, calibration, address=old.get("address", ""), world=old.get("world")
    )
    report["created_utc"] = old["created_utc"]
    report["machine"] = old["machine"]
    report["out_dir"] = str(out_dir)
    write_report(report, runs, calibration, out_dir, plots=plots)
    return report
