"""Benchmarks of specroute: each prints its figure beside the reference it is compared
with (docs/benchmarks.md)."""

from __future__ import annotations

import argparse


def module_parser(doc: str | None) -> argparse.ArgumentParser:
    """The parser of a benchmark run as ``python -m benchmarks.…``: its ``--help`` prints
    the module's docstring as written (its first line alone cut sentences short, and
    argparse's reflowing ran the usage lines together)."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
