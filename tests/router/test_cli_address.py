"""Every client command talks to the local sidecar unless told otherwise: ``--address``
defaults to ``$SPECROUTE_ADDRESS``, else 127.0.0.1:50051, and is never required."""

from __future__ import annotations

from typing import Any

import pytest
import typer

from router.cli import build_app
from router.serve_cli import DEFAULT_ADDRESS

CLIENT_COMMANDS = (
    ("route",),
    ("generate",),
    ("drafters", "list"),
    ("drafters", "register"),
    ("drafters", "remove"),
    ("policy", "show"),
    ("policy", "set"),
    ("classifier", "reload"),
)


def _command(path: tuple[str, ...]) -> Any:
    """The click command at ``path`` (typer carries its own click, so duck-typed)."""
    command: Any = typer.main.get_command(build_app())
    for name in path:
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", CLIENT_COMMANDS, ids=" ".join)
def test_address_defaults_to_the_local_sidecar(path: tuple[str, ...]) -> None:
    (address,) = [param for param in _command(path).params if param.name == "address"]
    assert not address.required
    assert address.default == DEFAULT_ADDRESS
    assert address.envvar == "SPECROUTE_ADDRESS"
