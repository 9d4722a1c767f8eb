"""The root CLI mounts the sidecar's commands and every declared ``specroute.cli`` plug-in."""

from __future__ import annotations

import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import typer
from typer.testing import CliRunner

from router.cli import CLI_ENTRY_POINTS, build_app

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _command_names(group: typer.Typer) -> set[str]:
    commands = {command.name or "" for command in group.registered_commands}
    return commands | {sub.name or "" for sub in group.registered_groups}


def test_the_installed_plugins_are_the_declared_ones() -> None:
    """Stale metadata (pyproject edited, not reinstalled) would silently drop commands."""
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["entry-points"][CLI_ENTRY_POINTS]
    installed = {entry.name: entry.value for entry in entry_points(group=CLI_ENTRY_POINTS)}
    assert installed == declared


def test_root_and_bench_list_every_command() -> None:
    app = build_app()
    assert {"serve", "route", "generate", "replay", "study", "demo"} <= _command_names(app)
    assert {"bench", "world", "classifier", "drafters", "policy"} <= _command_names(app)
    bench = next(g.typer_instance for g in app.registered_groups if g.name == "bench")
    assert bench is not None
    assert {"engine", "classifier", "policy", "load", "load-compare"} <= _command_names(bench)
    shown = CliRunner().invoke(app, ["bench", "--help"])
    assert shown.exit_code == 0 and "load-compare" in shown.output
