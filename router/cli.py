"""The ``specroute`` command line: one Typer app, with commands contributed by each package.

Each package owns a CLI module with ``register(app, bench)``; this file only mounts
them, so adding a command never means editing another package's code.
"""

from __future__ import annotations

import importlib
import logging
import os

import typer

# Nothing may reach a model hub at run time; set before anything imports huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Modules that contribute commands, in the order they appear in --help.
CLI_MODULES: tuple[str, ...] = (
    "benchmarks.world.cli",
    "benchmarks.engine.cli",
    "classifiers.cli",
    "benchmarks.classifier.cli",
    "benchmarks.policy_sim.cli",
    "router.serve_cli",
    "benchmarks.replay.cli",
    "benchmarks.load.cli",
    "benchmarks.demo",
)


def build_app() -> typer.Typer:
    """Assemble the root app and the ``bench`` group from every package's CLI module."""
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
    ) -> None:
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )

    for module_name in CLI_MODULES:
        importlib.import_module(module_name).register(app, bench)
    return app


def main() -> None:
    build_app()()


if __name__ == "__main__":
    main()
