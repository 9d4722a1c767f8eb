"""The root CLI mounts the sidecar's commands and every declared ``specroute.cli`` plug-in."""

from __future__ import annotations

import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
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
    classifier = [g.typer_instance for g in app.registered_groups if g.name == "classifier"]
    assert len(classifier) == 1 and classifier[0] is not None  # one group, both packages'
    assert _command_names(classifier[0]) == {"train", "eval", "reload"}
    bench = next(g.typer_instance for g in app.registered_groups if g.name == "bench")
    assert bench is not None
    assert {"engine", "classifier", "policy", "load", "load-compare"} <= _command_names(bench)
    shown = CliRunner().invoke(app, ["bench", "--help"])
    assert shown.exit_code == 0 and "load-compare" in shown.output


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        # A classifier directory that cannot be loaded, a prompt file that is not prompts.
        (["classifier", "eval", "--model", "{empty}", "--data", "{ok}"], 2, "classifier.json"),
        (["classifier", "train", "--data", "{bad}", "--out", "{out}"], 2, "bad.jsonl:1: 'text'"),
        # A bench command's call to a sidecar that is not there.
        (["bench", "load", "--address", "127.0.0.1:1", "-n", "1", "-c", "1"], 1, "UNAVAILABLE"),
    ],
)
def test_a_command_that_fails_on_its_input_or_its_sidecar_says_so_in_one_line(
    tmp_path: Path, args: list[str], status: int, says: str
) -> None:
    """Each printed a traceback (ClassifierLoadError, ValueError, grpc's RpcError)."""
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    (tmp_path / "ok.jsonl").write_text('{"text": "hello", "task": "a"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": 5}\n')
    paths = {name: str(tmp_path / name) for name in ("empty", "out")}
    paths.update(ok=str(tmp_path / "ok.jsonl"), bad=str(tmp_path / "bad.jsonl"))
    command = [arg.format(**paths) for arg in args]
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", *command], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == status, done.stderr
    assert done.stderr.startswith("error: ") and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
