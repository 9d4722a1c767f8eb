"""The commands and settings files the README and ``docs/`` show still fit the code.

Every ``specroute`` command line in a ``sh`` block names an existing command, only options
that command has, and no more arguments than it takes; every ``toml`` block parses as the
file it shows (a fleet file, else sidecar settings). Running them all would need a built
world and a live sidecar; a renamed command, option or setting is the drift this catches.
"""

from __future__ import annotations

import re
import shlex
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.main

from router.cli import build_app
from router.fleet.config import parse_fleet
from router.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)
SHELLS = ("sh", "bash")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
PROGRAM = "specroute"
COMMAND_LINE = re.compile(rf"^\s*(?:[A-Z_][A-Z0-9_]*=\S*\s+)*{PROGRAM}\s")


@dataclass(frozen=True)
class Shown:
    """One command line or settings block as a document shows it."""

    document: str
    text: str

    def __str__(self) -> str:
        return f"{self.document}: {self.text}"


def blocks(*languages: str) -> list[Shown]:
    """The fenced blocks of ``languages`` in the README and docs/ (also those indented
    in a list)."""
    found = []
    for path in DOCUMENTS:
        for match in FENCE.finditer(path.read_text()):
            if match.group(1) in languages:
                text = textwrap.dedent(match.group(2))
                found.append(Shown(path.relative_to(REPO).as_posix(), text))
    return found


def unbracketed(words: list[str]) -> list[str]:
    """A usage synopsis's words as a command line: ``[--json PATH]`` as ``--json PATH``,
    ``...`` dropped."""
    stripped = (word.lstrip("[").rstrip("]") for word in words)
    return [word for word in stripped if word and word != "..."]


def command_lines(block: Shown) -> list[Shown]:
    """The ``specroute`` command lines of a ``sh`` block, continuations joined, comments
    and leading environment assignments dropped."""
    joined = block.text.replace("\\\n", " ")
    lines = []
    for line in joined.splitlines():
        if not COMMAND_LINE.match(line):
            continue
        words = unbracketed(shlex.split(line, comments=True))
        while words and ENV_ASSIGNMENT.match(words[0]):
            words.pop(0)
        if words and words[0] == PROGRAM:
            lines.append(Shown(block.document, shlex.join(words)))
    return lines


def shown_commands() -> list[Shown]:
    return [line for block in blocks(*SHELLS) for line in command_lines(block)]


def resolve(root: Any, words: list[str]) -> tuple[Any, list[str], str]:
    """The command ``words`` name, the words left for it, and its path for messages.
    (Typer's commands are its own copy of click's classes: a group is what has
    ``commands``.)"""
    command, path = root, PROGRAM
    while hasattr(command, "commands") and words and not words[0].startswith("-"):
        name = words.pop(0)
        assert name in command.commands, f"{path} has no command {name!r}"
        command, path = command.commands[name], f"{path} {name}"
    return command, words, path


def check_arguments(command: Any, words: list[str], path: str) -> None:
    """Each option is one ``command`` has, with a value where it takes one; the
    positional arguments are as many as it needs and no more than it takes."""
    options = {
        name: param
        for param in command.params
        if param.param_type_name == "option"
        for name in (*param.opts, *param.secondary_opts)
    }
    takes = sum(
        param.nargs if param.nargs > 0 else 10**6
        for param in command.params
        if param.param_type_name == "argument"
    )
    needs = sum(
        max(param.nargs, 1)
        for param in command.params
        if param.param_type_name == "argument" and param.required
    )
    positional = 0
    remaining = list(words)
    while remaining:
        word = remaining.pop(0)
        if word.startswith("-"):
            name, has_value, _ = word.partition("=")
            assert name in options, f"{path} has no option {name}"
            option = options[name]
            if not (option.is_flag or option.count or has_value):
                assert remaining, f"{path} {name} needs a value"
                remaining.pop(0)
        else:
            positional += 1
    assert positional <= takes, f"{path} takes {takes} arguments, the document gives {positional}"
    assert positional >= needs, f"{path} needs {needs} arguments, the document gives {positional}"


@pytest.fixture(scope="module")
def root_command() -> Any:
    return typer.main.get_command(build_app())


def test_the_documents_show_commands_and_settings() -> None:
    """The checks below have something to check (a broken extraction would pass them)."""
    assert len(shown_commands()) >= 20
    assert len(blocks("toml")) >= 3


def check_line(root: Any, text: str) -> None:
    command, words, path = resolve(root, shlex.split(text)[1:])
    check_arguments(command, words, path)


@pytest.mark.parametrize("line", shown_commands(), ids=str)
def test_a_shown_command_exists_with_its_options(root_command: Any, line: Shown) -> None:
    check_line(root_command, line.text)


def with_existing_files(value: Any, directory: Path) -> Any:
    """``value`` with each certificate path (``*.pem``, which must exist) replaced by an
    empty file in ``directory``."""
    if isinstance(value, dict):
        return {key: with_existing_files(item, directory) for key, item in value.items()}
    if isinstance(value, list):
        return [with_existing_files(item, directory) for item in value]
    if isinstance(value, str) and value.endswith(".pem"):
        stand_in = directory / Path(value).name
        stand_in.touch()
        return str(stand_in)
    return value


@pytest.mark.parametrize("block", blocks("toml"), ids=lambda block: block.document)
def test_a_shown_settings_file_parses(block: Shown, tmp_path: Path) -> None:
    data = with_existing_files(tomllib.loads(block.text), tmp_path)
    if "replicas" in data:
        parse_fleet(data, str(block))
    else:
        Settings.model_validate(data)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("specroute drafters regster x", "no command 'regster'"),
        ("specroute generate hi --draft-len 4", "no option --draft-len"),
        ("specroute route one two", "takes 1 arguments"),
        ("specroute generate hi --k", "needs a value"),
        ("specroute drafters register --kind ngram", "needs 1 arguments"),
    ],
)
def test_the_check_catches_a_renamed_command_option_or_argument(
    root_command: Any, text: str, problem: str
) -> None:
    with pytest.raises(AssertionError, match=problem):
        check_line(root_command, text)


README_LIMIT = 15_000
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)")


def test_the_readme_is_a_short_users_guide() -> None:
    assert len((REPO / "README.md").read_bytes()) <= README_LIMIT


def relative_links(path: Path) -> list[str]:
    """The links of a Markdown file that point into the repository (code and indented
    formulas left out)."""
    prose = INLINE_CODE.sub("", FENCE.sub("", path.read_text()))
    prose = "\n".join(line for line in prose.splitlines() if not line.startswith("    "))
    targets = (match.group(1) for match in LINK.finditer(prose))
    # A path has a dot or a slash; a formula's "E[steps](k)" has neither.
    paths = (target for target in targets if "." in target or "/" in target)
    return [target for target in paths if "://" not in target]


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: path.relative_to(REPO).as_posix())
def test_a_documents_links_point_to_files_in_the_repository(path: Path) -> None:
    missing = [link for link in relative_links(path) if not (path.parent / link).exists()]
    assert not missing, f"{path.relative_to(REPO)} links to {missing}"
