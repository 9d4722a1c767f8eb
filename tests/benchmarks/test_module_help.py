"""``python -m benchmarks.…`` modules print their docstring as written on ``--help``."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import benchmarks

ROOT = Path(benchmarks.__file__).parent


def parser_modules() -> list[str]:
    """Every benchmark module whose ``main`` builds its parser from its docstring."""
    return sorted(
        ".".join(("benchmarks", *path.relative_to(ROOT).with_suffix("").parts))
        for path in ROOT.rglob("*.py")
        if "module_parser(__doc__)" in path.read_text()
    )


def test_the_modules_are_found() -> None:
    assert len(parser_modules()) >= 14


@pytest.mark.parametrize("name", parser_modules())
def test_help_prints_the_whole_docstring(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as stopped:
        module.main(["--help"])
    assert stopped.value.code == 0
    shown = capsys.readouterr().out
    # The first paragraph, line breaks and all: its first line alone cut sentences short.
    first_paragraph = module.__doc__.strip().split("\n\n")[0]
    assert first_paragraph in shown
