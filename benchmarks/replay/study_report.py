"""The study's answers from its replays: study.json, study.md and plots."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.replay.calibration import GENERIC_DRAFTER, Calibration
from benchmarks.replay.metrics import speedup_by_length, weighted_mean
from benchmarks.replay.plots import grouped_bars
from benchmarks.replay.replay import BASELINE_POLICY, PolicyRun
from benchmarks.replay.report import finite, machine_description, markdown_table
from benchmarks.replay.study_maths import (
    SPREAD_KEYS,
    centroid_similarity,
    correlation,
    length_distribution,
    mix_adjusted_tokens_per_s,
    paired_points,
    spread_table,
)

Replays = Mapping[str, tuple[Mapping[str, Any], Mapping[str, PolicyRun]]]
RQ1_TRACES: tuple[str, ...] = ("rq1-single", "rq1-mixed")
RQ2_POLICIES: tuple[str, ...] = ("generic", "static", "thompson", "ucb", "oracle")
RQ3_POLICIES: tuple[str, ...] = ("generic", "static", "thompson")


def _fixed_speedups(report: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """drafter -> task -> speed-up from the ``fixed-<drafter>`` policies of a report."""
    table: dict[str, dict[str, float]] = {}
    for label, section in report["policies"].items():
        if label.startswith("fixed-"):
            table[label.removeprefix("fixed-")] = {
                task: row["speedup"]
                for task, row in section["per_task"].items()
                if row["speedup"] is not None
            }
    return table


def _relative_to_generic(
    speedups: Mapping[str, Mapping[str, float]],
) -> dict[str, dict[str, float]]:
    """Speed-up over the generic drafter's on the same task (removes the task's own effect)."""
    generic = speedups.get(GENERIC_DRAFTER, {})
    return {
        drafter: {t: s / generic[t] for t, s in row.items() if generic.get(t)}
        for drafter, row in speedups.items()
    }


def rq1(replays: Replays, similarity: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Similarity of fine-tuning data to a task vs the drafter's speed-up on it."""
    answer: dict[str, Any] = {"similarity": similarity, "traces": {}}
    for name in RQ1_TRACES:
        if name not in replays:
            continue
        speedups = _fixed_speedups(replays[name][0])
        points = paired_points(similarity, speedups)
        relative = paired_points(similarity, _relative_to_generic(speedups))
        answer["traces"][name] = {
            "speedup": speedups,
            "points": [
                {"drafter": d, "task": t, "similarity": x, "speedup": y} for d, t, x, y in points
            ],
            "correlation": correlation([p[2] for p in points], [p[3] for p in points]).to_json(),
            "correlation_vs_generic": correlation(
                [p[2] for p in relative], [p[3] for p in relative]
            ).to_json(),
        }
    return answer


def rq2(replays: Replays) -> dict[str, Any]:
    """Spread of per-task speed-up: generic vs task-specific (static) vs adaptive."""
    report = replays["uniform"][0]
    return {
        "trace": "uniform",
        "spread": spread_table(report, RQ2_POLICIES),
        "per_task": {
            label: {t: r["speedup"] for t, r in report["policies"][label]["per_task"].items()}
            for label in RQ2_POLICIES
            if label in report["policies"]
        },
    }


def rq3(replays: Replays) -> dict[str, Any]:
    """Speed-up by output-length bucket, fine-tuned vs generic, and each task's lengths."""
    report, runs = replays["uniform"]
    baseline = runs[BASELINE_POLICY].results
    by_length = {
        label: {b: finite(v) for b, v in speedup_by_length(runs[label].results, baseline).items()}
        for label in RQ3_POLICIES
        if label in runs
    }
    lengths = length_distribution(baseline)
    tasks = list(lengths)
    gain = {
        t: report["policies"]["static"]["per_task"][t]["speedup"]
        / report["policies"]["generic"]["per_task"][t]["speedup"]
        for t in tasks
        if "static" in report["policies"] and "generic" in report["policies"]
    }
    return {
        "trace": "uniform",
        "speedup_by_length": by_length,
        "output_lengths": lengths,
        "static_over_generic": {t: finite(g) for t, g in gain.items()},
        "length_vs_gain": correlation(
            [lengths[t]["mean"] for t in gain], [gain[t] for t in gain]
        ).to_json(),
    }


def rq4(replays: Replays, tasks: Sequence[str]) -> dict[str, Any]:
    """Tokens/s on single-task traces vs the chat-heavy mix, per policy."""
    chat_report, chat_runs = replays["chat-heavy"]
    answer: dict[str, Any] = {"trace": "chat-heavy", "policies": {}}
    for label, run in chat_runs.items():
        single = {
            t: replays[f"single-{t}"][1][label].results
            for t in tasks
            if f"single-{t}" in replays and label in replays[f"single-{t}"][1]
        }
        expected = mix_adjusted_tokens_per_s(single, run.results)
        measured = chat_report["policies"][label]["tokens_per_s"] or 0.0
        single_speedup = {
            t: replays[f"single-{t}"][0]["policies"][label]["per_task"][t]["speedup"]
            for t in single
        }
        answer["policies"][label] = {
            "single_task_tokens_per_s": {
                t: replays[f"single-{t}"][0]["policies"][label]["per_task"][t]["tokens_per_s"]
                for t in single
            },
            "mixed_tokens_per_s": {
                t: r["tokens_per_s"] for t, r in chat_report["policies"][label]["per_task"].items()
            },
            "expected_mixed_tokens_per_s": finite(expected),
            "measured_mixed_tokens_per_s": finite(measured),
            "degradation": finite(1.0 - measured / expected) if expected else None,
            "single_task_speedup": single_speedup,
            "mixed_speedup": {
                t: r["speedup"] for t, r in chat_report["policies"][label]["per_task"].items()
            },
            "mixed_mean_speedup": chat_report["policies"][label]["mean_speedup"],
            # The single-task speed-ups averaged with the mix's traffic: what the mix would
            # get if mixing cost nothing (speed-ups are paired with their own baseline, so
            # they are steadier than raw tokens/s on a shared machine).
            "single_mean_speedup_mix_weighted": finite(
                weighted_mean(
                    {t: v for t, v in single_speedup.items() if v is not None},
                    {t: float(n) for t, n in chat_report["trace"]["tasks"].items()},
                )
            ),
        }
    return answer


def _scatter(answer: Mapping[str, Any], path: Path) -> Path:
    traces = list(answer["traces"])
    fig, axes = plt.subplots(
        1, max(1, len(traces)), figsize=(6 * max(1, len(traces)), 4.5), squeeze=False
    )
    for ax, name in zip(axes[0], traces, strict=False):
        points = answer["traces"][name]["points"]
        for drafter in sorted({p["drafter"] for p in points}):
            mine = [p for p in points if p["drafter"] == drafter]
            ax.scatter([p["similarity"] for p in mine], [p["speedup"] for p in mine], label=drafter)
        c = answer["traces"][name]["correlation"]
        ax.set_title(
            f"{name}: Pearson {c['pearson_r']}, Spearman {c['spearman_rho']}, n={c['n']}",
            fontsize=9,
        )
        ax.set_xlabel("TF-IDF similarity of fine-tuning sample to task")
        ax.set_ylabel("speed-up")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def study_plots(answers: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """RQ1 scatter, RQ2 per-task bars, RQ3 length-bucket bars and lengths, RQ4 tokens/s."""
    paths = [_scatter(answers["rq1"], out_dir / "rq1_similarity_vs_speedup.png")]
    per_task = answers["rq2"]["per_task"]
    tasks = list(next(iter(per_task.values()), {}))
    paths.append(
        grouped_bars(
            tasks,
            {p: [v.get(t) for t in tasks] for p, v in per_task.items()},
            title="RQ2: per-task speed-up (uniform mix)",
            ylabel="speed-up (x)",
            path=out_dir / "rq2_spread.png",
        )
    )
    by_length = answers["rq3"]["speedup_by_length"]
    buckets = list(dict.fromkeys(b for v in by_length.values() for b in v))
    paths.append(
        grouped_bars(
            buckets,
            {p: [v.get(b) for b in buckets] for p, v in by_length.items()},
            title="RQ3: speed-up by output length",
            ylabel="speed-up (x)",
            path=out_dir / "rq3_speedup_by_length.png",
        )
    )
    lengths = answers["rq3"]["output_lengths"]
    paths.append(
        grouped_bars(
            list(lengths),
            {s: [lengths[t][s] for t in lengths] for s in ("mean", "p50", "p90")},
            title="RQ3: output length per task (tokens)",
            ylabel="tokens",
            path=out_dir / "rq3_output_lengths.png",
            reference=None,
        )
    )
    policies = answers["rq4"]["policies"]
    paths.append(
        grouped_bars(
            list(policies),
            {
                "single-task (mix-adjusted)": [
                    p["expected_mixed_tokens_per_s"] for p in policies.values()
                ],
                "chat-heavy mix (measured)": [
                    p["measured_mixed_tokens_per_s"] for p in policies.values()
                ],
            },
            title="RQ4: tokens/s, single-task vs chat-heavy mix",
            ylabel="tokens/s",
            path=out_dir / "rq4_tokens_per_s.png",
            reference=None,
        )
    )
    return paths


def _f(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def study_markdown(answers: Mapping[str, Any], plots: Sequence[Path]) -> str:
    """study.md: one section per question, numbers first."""
    parts = [
        "# specroute study: the four research questions",
        "",
        f"{answers['created_utc']} on {answers['machine']['cpu']}.",
        "",
    ]
    parts += ["## RQ1: similarity of fine-tuning data vs speed-up", ""]
    rows = []
    for name, data in answers["rq1"]["traces"].items():
        for kind in ("correlation", "correlation_vs_generic"):
            c = data[kind]
            rows.append(
                [
                    name,
                    "speed-up" if kind == "correlation" else "speed-up / generic's",
                    str(c["n"]),
                    _f(c["pearson_r"]),
                    _f(c["pearson_p"]),
                    _f(c["spearman_rho"]),
                    _f(c["spearman_p"]),
                ]
            )
    parts += [markdown_table(["trace", "y", "n", "Pearson r", "p", "Spearman rho", "p"], rows), ""]
    parts += ["## RQ2: spread of per-task speed-up (uniform mix)", ""]
    spread = answers["rq2"]["spread"]
    parts += [
        markdown_table(
            ["policy", "mean", "min", "max", "max/min", "CV", "Jain"],
            [
                [
                    p,
                    *(_f(v.get(k)) for k in SPREAD_KEYS),
                ]
                for p, v in spread.items()
            ],
        ),
        "",
    ]
    parts += ["## RQ3: speed-up by output length, fine-tuned vs generic", ""]
    by_length = answers["rq3"]["speedup_by_length"]
    buckets = list(dict.fromkeys(b for v in by_length.values() for b in v))
    parts += [
        markdown_table(
            ["policy", *buckets],
            [[p, *(_f(v.get(b), 2) for b in buckets)] for p, v in by_length.items()],
        ),
        "",
    ]
    lengths = answers["rq3"]["output_lengths"]
    gain = answers["rq3"]["static_over_generic"]
    parts += [
        markdown_table(
            ["task", "mean tokens", "p50", "p90", "static / generic speed-up"],
            [
                [t, _f(v["mean"], 1), _f(v["p50"], 0), _f(v["p90"], 0), _f(gain.get(t))]
                for t, v in lengths.items()
            ],
        ),
        "",
    ]
    c = answers["rq3"]["length_vs_gain"]
    parts += [
        f"Mean output length vs static/generic gain: Pearson {_f(c['pearson_r'])}, "
        f"Spearman {_f(c['spearman_rho'])}, n={c['n']}.",
        "",
    ]
    parts += ["## RQ4: tokens/s, single-task traces vs the chat-heavy mix", ""]
    parts += [
        markdown_table(
            [
                "policy",
                "single-task (mix-adjusted) tok/s",
                "chat-heavy tok/s",
                "degradation",
                "single-task speed-up (mix-weighted)",
                "chat-heavy speed-up",
            ],
            [
                [
                    p,
                    _f(v["expected_mixed_tokens_per_s"], 1),
                    _f(v["measured_mixed_tokens_per_s"], 1),
                    _f(v["degradation"]),
                    _f(v["single_mean_speedup_mix_weighted"]),
                    _f(v["mixed_mean_speedup"]),
                ]
                for p, v in answers["rq4"]["policies"].items()
            ],
        ),
        "",
    ]
    parts += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(parts) + "\n"


def write_study(
    calibration: Calibration,
    replays: Replays,
    samples: Mapping[str, Sequence[str]],
    task_texts: Mapping[str, Sequence[str]],
    tasks: Sequence[str],
    out_dir: Path,
) -> Path:
    """Analyse the replays and write study.json, study.md and the plots; returns study.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    similarity = centroid_similarity(samples, task_texts)
    answers: dict[str, Any] = {
        "created_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_description(),
        "calibration": calibration.to_json(),
        "similarity_method": "cosine of TF-IDF (word 1-2 gram) centroids: drafter fine-tuning "
        "sample vs the task's training prompts and responses",
        "rq1": rq1(replays, similarity),
        "rq2": rq2(replays),
        "rq3": rq3(replays),
        "rq4": rq4(replays, tasks),
    }
    plots = study_plots(answers, out_dir)
    path = out_dir / "study.json"
    path.write_text(json.dumps(answers, indent=2, allow_nan=False) + "\n")
    (out_dir / "study.md").write_text(study_markdown(answers, plots))
    return path
