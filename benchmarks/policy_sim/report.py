"""Run every scenario and lay the results out as JSON and as a text table."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path
from typing import Any

from benchmarks.policy_sim.ground_truth import default_ground_truth
from benchmarks.policy_sim.scenarios import build_scenarios, policy_specs
from benchmarks.policy_sim.simulate import run_scenario


def machine() -> str:
    """A one-line description of this machine (CPU model and core count)."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def run_all(
    world_dir: Path | None,
    requests: int = 5000,
    seed: int = 0,
    only: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Simulate every policy on every scenario (or those named in ``only``)."""
    truth = default_ground_truth(world_dir)
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "world": truth.source,
        "requests": requests,
        "seed": seed,
        "descriptions": {},
        "scenarios": {},
    }
    for scenario in build_scenarios(truth, requests, seed):
        if only and scenario.name not in only:
            continue
        specs = policy_specs(scenario.truth, scenario.initial_drafters, seed)
        report["descriptions"][scenario.name] = scenario.description
        report["scenarios"][scenario.name] = run_scenario(scenario, specs, seed)
    return report


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(report: dict[str, Any]) -> str:
    """Scenario x policy table; regret is also shown relative to ucb's (the reference)."""
    header = (
        f"{'scenario':<22} {'policy':<12} {'regret s':>9} {'/ucb':>6} {'oracle%':>8} "
        f"{'k0%':>5} {'switch':>6} {'new use':>7} {'p50 us':>7} {'p99 us':>7}"
    )
    lines = [header, "-" * len(header)]
    for name, policies in report["scenarios"].items():
        ucb = policies.get("ucb", {}).get("regret")
        for label, m in policies.items():
            ratio = m["regret"] / ucb if ucb else None
            k0 = m.get("k0_fraction_on_k0_contexts_last_half")
            lines.append(
                f"{name:<22} {label:<12} {m['regret']:>9.2f} {_cell(ratio, '.2f'):>6} "
                f"{100 * m['oracle_fraction_last_half']:>7.1f}% "
                f"{_cell(None if k0 is None else 100 * k0, '.0f'):>5} "
                f"{_cell(m.get('switch_after_drift'), 'd'):>6} "
                f"{_cell(m.get('new_drafter_first_use'), 'd'):>7} "
                f"{m['select_us_p50']:>7.1f} {m['select_us_p99']:>7.1f}"
            )
        lines.append("")
    return "\n".join(lines)
