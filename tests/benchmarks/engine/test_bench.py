"""The engine benchmark's formulas: the analytical speed-up and the acceptance it uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.engine.bench import acceptance_from_mean_length, analytical_speedup


def test_analytical_speedup_follows_the_formula() -> None:
    # a = 0.5, k = 3: (1 - 0.5^4) / 0.5 = 1.875 tokens per step at the cost of one token.
    assert analytical_speedup(0.5, 3, t_ar=1.0, t_draft=0.0, t_verify=1.0) == pytest.approx(1.875)
    # Drafting costs 0.1 per position and verification 1.2: 1.875 / 1.5.
    assert analytical_speedup(0.5, 3, 1.0, 0.1, 1.2) == pytest.approx(1.25)
    assert analytical_speedup(1.0, 4, 1.0, 0.0, 1.0) == pytest.approx(5.0)


def test_acceptance_inverts_the_expected_tokens_per_step() -> None:
    for a in (0.1, 0.5, 0.8, 0.95):
        for k in (1, 3, 8):
            mean_length = sum(a**i for i in range(k + 1))
            assert acceptance_from_mean_length(mean_length, k) == pytest.approx(a, abs=1e-9)
    assert acceptance_from_mean_length(1.0, 4) == 0.0
    assert acceptance_from_mean_length(5.0, 4) == 1.0


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["bench", "engine", "--k-max", "0"], "--k-max"),
        (["bench", "engine", "--prompts", "-1"], "--prompts"),  # it was used as a slice
        (["bench", "engine", "--threads", "0"], "--threads"),
        (["bench", "load", "--address", "127.0.0.1:9", "-n", "0"], "--requests"),
        (["bench", "load", "--address", "127.0.0.1:9", "-c", "-3"], "--concurrency"),
        (["bench", "load-compare", "--address", "127.0.0.1:9", "--rounds", "0"], "--rounds"),
        (["world", "eval", "--limit", "0"], "--limit"),
    ],
)
def test_a_count_below_one_is_refused_before_anything_runs(argv: list[str], option: str) -> None:
    """Each ran: tracebacks after the models loaded (k 0, threads 0), a report of NaN that
    is not JSON (0 requests), a run "at concurrency -3", a prompt count used as a slice."""
    from typer.testing import CliRunner

    from router.cli import build_app

    result = CliRunner().invoke(build_app(), argv)
    assert result.exit_code == 2, result.output
    assert option in result.output and "Traceback" not in result.output


def test_a_task_the_world_lacks_is_one_line(tiny_world: object) -> None:
    from typer.testing import CliRunner

    from router.cli import build_app

    root = str(tiny_world.root)  # type: ignore[attr-defined]
    result = CliRunner().invoke(
        build_app(), ["bench", "engine", "--world", root, "--tasks", "bogus"]
    )
    assert result.exit_code == 2, result.output
    assert "bogus: not a task of this world" in " ".join(result.output.split())


@pytest.mark.parametrize(
    "argv",
    [
        ["world", "eval", "--json", "{dir}"],
        ["world", "eval", "--json", "{file}/under-a-file.json"],
        ["bench", "load", "--address", "127.0.0.1:9", "--json", "{dir}"],
        ["bench", "engine", "--json", "{dir}"],
        ["replay", "--trace", "uniform", "--out", "{file}"],
        ["study", "--out", "{file}"],
        ["demo", "--out", "{file}"],
        ["bench", "policy", "--json", "{dir}"],
        ["bench", "select", "--json", "{file}/under-a-file.json"],
        ["bench", "classifier", "--json", "{dir}"],
        ["bench", "fleet", "--json", "{dir}"],
        ["bench", "replicas", "--json", "{dir}"],
    ],
)
def test_an_output_path_that_cannot_be_written_is_refused_before_the_work(
    argv: list[str], tmp_path: Path
) -> None:
    """It was found once the work was done (a replay, an evaluation: minutes to hours), as
    a traceback, and the results were lost."""
    from typer.testing import CliRunner

    from router.cli import build_app

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    args = [a.format(dir=tmp_path, file=a_file) for a in argv]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 2, result.output
    told = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())
    assert "Traceback" not in told
    assert any(why in told for why in ("is a directory", "not a directory", "cannot make")), told
