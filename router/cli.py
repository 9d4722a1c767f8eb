"""The ``specroute`` command line: one Typer app, with commands contributed by each package.

The sidecar's own commands (:mod:`router.serve_cli`) come first; every other package adds
its commands through a ``register(app, bench)`` function declared in the ``specroute.cli``
entry-point group (pyproject.toml), mounted in the order of the entry points' names. So
adding a command never means editing this file, and the runtime never names the benchmarks.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Annotated

import typer

from router.logs import LOG_FORMAT_ENV, LogFormat, configure_logging

# Nothing may reach a model hub at run time; set before anything imports huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CLI_ENTRY_POINTS = "specroute.cli"

Registrar = Callable[[typer.Typer, typer.Typer], None]


def plugin_registrars() -> list[Registrar]:
    """The installed ``specroute.cli`` entry points' ``register`` functions, by entry name.

    None when specroute is imported from a source tree that was never installed: then only
    the sidecar's own commands are there (``pip install -e .`` adds the rest).
    """
    found = sorted(entry_points(group=CLI_ENTRY_POINTS), key=lambda entry: entry.name)
    return [entry.load() for entry in found]


def build_app() -> typer.Typer:
    """Assemble the root app and the ``bench`` group: the sidecar's commands, then the
    plug-ins'."""
    app = typer.Typer(
        name="specroute",
        help="Adaptive router for speculative decoding in multitask LLM serving.",
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,
    )
    bench = typer.Typer(help="Benchmarks: each prints its figure beside its reference.")
    app.add_typer(bench, name="bench")

    @app.callback()
    def _configure(
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
        log_format: Annotated[
            LogFormat,
            typer.Option(
                "--log-format",
                envvar=LOG_FORMAT_ENV,
                help="text, or json: one JSON object a line, for a log collector.",
            ),
        ] = "text",
    ) -> None:
        configure_logging(logging.DEBUG if verbose else logging.INFO, log_format)

    from router import serve_cli

    for register in [serve_cli.register, *plugin_registrars()]:
        register(app, bench)
    unwrap_command_help(app)
    return app


def unwrap_command_help(app: typer.Typer) -> None:
    """Every command's help (its docstring) with each paragraph's source line breaks
    joined: Typer's rich help printed them as they were, so the command lists broke
    sentences mid-line ("HTTP fronts, Prometheus" / "metrics; with --fleet")."""
    for info in app.registered_commands:
        text = info.help or inspect.getdoc(info.callback)
        if text:
            info.help = unwrapped(text)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            unwrap_command_help(group.typer_instance)


def unwrapped(text: str) -> str:
    """``text`` with the lines of each paragraph joined; a paragraph with an indented line
    (a usage example) is kept as it is."""
    paragraphs = text.split("\n\n")
    return "\n\n".join(
        p if any(line.startswith(" ") for line in p.splitlines()) else " ".join(p.split())
        for p in paragraphs
    )


def main() -> None:
    """Run the app; whichever command needed it, a missing model bundle, a state
    directory that cannot be used, a port that cannot be listened on, a classifier
    directory or a prompt file that cannot be read is one line and exit status 2, and a
    sidecar that refuses a call or cannot be reached one line and exit status 1 (not a
    traceback)."""
    import grpc

    from classifiers import ClassifierLoadError
    from classifiers.text import DataFileError
    from router.bundle import BundleNotFoundError
    from router.errors import ListenError
    from router.store import StateStoreError

    try:
        build_app()()
    except (
        BundleNotFoundError,
        StateStoreError,
        ListenError,
        ClassifierLoadError,
        DataFileError,
    ) as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(2) from None
    except grpc.RpcError as error:  # a client or bench command's call
        typer.echo(f"error: {error.code().name}: {error.details()}", err=True)  # type: ignore[attr-defined]
        raise SystemExit(1) from None
    except grpc.FutureTimeoutError:
        typer.echo("error: the sidecar could not be reached in time (--address?)", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
