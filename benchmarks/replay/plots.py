"""PNG plots of a replay (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from benchmarks.replay.calibration import Calibration
from benchmarks.replay.metrics import RequestResult, cumulative_regret
from benchmarks.replay.replay import BASELINE_POLICY, PolicyRun

LEARNING_POLICIES: tuple[str, ...] = ("thompson", "ucb")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grouped_bars(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str,
    ylabel: str,
    path: Path,
    reference: float | None = 1.0,
) -> Path:
    """Bars per group, one colour per series (missing values drawn as 0)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 2), 4.0))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, [v or 0.0 for v in values], width, label=name)
    if reference is not None:
        ax.axhline(reference, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(x, list(groups), rotation=20)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def speedup_bars(report: Mapping[str, Any], out_dir: Path) -> Path:
    """Per-task speed-up by policy."""
    tasks = list(report["trace"]["tasks"])
    series = {
        label: [section["per_task"].get(t, {}).get("speedup") for t in tasks]
        for label, section in report["policies"].items()
        if label != BASELINE_POLICY
    }
    return grouped_bars(
        tasks,
        series,
        title=f"Speed-up over plain decoding ({report['trace']['name']})",
        ylabel="speed-up (x)",
        path=out_dir / "speedup_by_task.png",
    )


def acceptance_heatmap(
    acceptance: Mapping[str, Mapping[str, float]], tasks: Sequence[str], path: Path, title: str
) -> Path:
    """Drafter x task per-token acceptance."""
    drafters = list(acceptance)
    grid = np.array([[acceptance[d].get(t, np.nan) for t in tasks] for d in drafters])
    fig, ax = plt.subplots(figsize=(1.0 * len(tasks) + 3, 0.5 * len(drafters) + 2))
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(tasks)), list(tasks), rotation=30)
    ax.set_yticks(range(len(drafters)), drafters)
    for i in range(len(drafters)):
        for j in range(len(tasks)):
            if np.isfinite(grid[i, j]):
                ax.text(
                    j,
                    i,
                    f"{grid[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if grid[i, j] < 0.5 else "black",
                )
    ax.set_xlabel("task")
    ax.set_ylabel("drafter")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="per-token acceptance")
    return _save(fig, path)


def regret_curves(
    runs: Mapping[str, PolicyRun],
    oracle: Sequence[RequestResult],
    path: Path,
    events: Sequence[int] = (),
    reference: str = "oracle",
) -> Path:
    """Cumulative regret (seconds lost against the oracle) over requests, per policy."""
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for label, run in runs.items():
        ax.plot(cumulative_regret(run.results, oracle), label=label)
    for index in events:
        ax.axvline(index, color="grey", linestyle=":", linewidth=1)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("request")
    ax.set_ylabel(f"cumulative regret vs {reference} (s)")
    ax.set_title(f"Cumulative regret against the oracle ({reference})")
    ax.legend(fontsize=8)
    return _save(fig, path)


def length_bars(report: Mapping[str, Any], out_dir: Path) -> Path:
    """Speed-up by output-length bucket, per policy."""
    sections = {k: v for k, v in report["policies"].items() if k != BASELINE_POLICY}
    buckets = list(dict.fromkeys(b for s in sections.values() for b in s["speedup_by_length"]))
    series = {
        label: [s["speedup_by_length"].get(b) for b in buckets] for label, s in sections.items()
    }
    return grouped_bars(
        buckets,
        series,
        title="Speed-up by output length (tokens)",
        ylabel="speed-up (x)",
        path=out_dir / "speedup_by_length.png",
    )


def arms_over_time(run: PolicyRun, path: Path, events: Sequence[int] = ()) -> Path:
    """The chosen drafter (rows) and k (colour) per cluster over one policy's requests."""
    by_cluster: dict[str, list[tuple[int, str, int]]] = {}
    for result in run.results:
        point = (result.index, result.drafter, result.draft_length)
        by_cluster.setdefault(result.cluster, []).append(point)
    drafters = sorted({d for points in by_cluster.values() for _, d, _ in points})
    row = {d: i for i, d in enumerate(drafters)}
    k_max = max([k for points in by_cluster.values() for _, _, k in points] + [1])
    clusters = sorted(by_cluster)
    fig, axes = plt.subplots(
        len(clusters),
        1,
        sharex=True,
        squeeze=False,
        figsize=(8.0, (0.16 * len(drafters) + 0.45) * len(clusters) + 1.0),
    )
    image = None
    for ax, cluster in zip(axes[:, 0], clusters, strict=True):
        points = by_cluster[cluster]
        image = ax.scatter(
            [i for i, _, _ in points],
            [row[d] for _, d, _ in points],
            c=[k for _, _, k in points],
            cmap="viridis",
            vmin=0,
            vmax=k_max,
            s=10,
        )
        ax.set_yticks(range(len(drafters)), drafters, fontsize=6)
        ax.set_ylim(-0.5, len(drafters) - 0.5)
        ax.set_title(f"cluster {cluster}", fontsize=8, loc="left")
        for index in events:
            ax.axvline(index, color="grey", linestyle=":", linewidth=1)
    axes[-1, 0].set_xlabel("request")
    if image is not None:
        fig.colorbar(image, ax=list(axes[:, 0]), label="draft length k", shrink=0.6)
    fig.suptitle(f"Chosen drafter (row) and k (colour) per cluster ({run.setting.label})")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def event_indices(report: Mapping[str, Any]) -> list[int]:
    """Request indices where the trace's events happened (for vertical markers)."""
    return list(report["trace"].get("event_request_indices", []))


def replay_plots(
    report: Mapping[str, Any],
    runs: Mapping[str, PolicyRun],
    calibration: Calibration | None,
    out_dir: Path,
) -> list[Path]:
    """All plots of a replay report; returns their paths."""
    events = event_indices(report)
    paths = [speedup_bars(report, out_dir), length_bars(report, out_dir)]
    if calibration is not None and calibration.acceptance:
        paths.append(
            acceptance_heatmap(
                calibration.acceptance,
                list(report["trace"]["tasks"]),
                out_dir / "acceptance_heatmap.png",
                f"Per-token acceptance at k={calibration.probe_k} (calibration)",
            )
        )
    else:
        observed = {
            label: {t: s.get("acceptance") or 0.0 for t, s in section["per_task"].items()}
            for label, section in report["policies"].items()
            if label != BASELINE_POLICY
        }
        if observed:
            paths.append(
                acceptance_heatmap(
                    observed,
                    list(report["trace"]["tasks"]),
                    out_dir / "acceptance_heatmap.png",
                    "Per-token acceptance by policy (replay)",
                )
            )
    reference = str(report.get("oracle_reference") or "")
    if reference in runs:
        oracle = runs[reference].results
        paths.append(regret_curves(runs, oracle, out_dir / "regret.png", events, reference))
    elif reference and "oracle" in runs:
        from benchmarks.replay.report import hindsight_oracle

        composite = hindsight_oracle(runs, runs[BASELINE_POLICY].results)
        if composite is not None:
            paths.append(
                regret_curves(runs, composite.results, out_dir / "regret.png", events, reference)
            )
    for label in LEARNING_POLICIES:
        if label in runs:
            paths.append(arms_over_time(runs[label], out_dir / f"arms_{label}.png", events))
    if not any(label in runs for label in LEARNING_POLICIES):
        others = [label for label in runs if label != BASELINE_POLICY]
        if others:
            paths.append(arms_over_time(runs[others[0]], out_dir / f"arms_{others[0]}.png", events))
    return paths
