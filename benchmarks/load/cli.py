"""``specroute bench load`` and ``bench load-compare``: Route throughput and latency of
running sidecars beside an echo servicer (see :mod:`benchmarks.load.load_bench`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks.outputs import writable_file
from router.serve_cli import DATA_TOKEN_OPTION, address_option

# Options shared by the load commands.
JsonOption = Annotated[
    Path | None, typer.Option("--json", callback=writable_file, help="Write the result here.")
]
# As every other data command: the data token, else the admin token (accepted too).
TokenOption = Annotated[str | None, DATA_TOKEN_OPTION]


def _running_pid(pid: int | None) -> int | None:
    """``--pid`` names a running process (its CPU is read from /proc: a FileNotFoundError
    traceback once the load had run)."""
    if pid is not None and not Path(f"/proc/{pid}").is_dir():
        raise typer.BadParameter(f"no process {pid} is running")
    return pid


def bench_load_command(
    address: Annotated[
        str, typer.Option("--address", callback=address_option, help="Sidecar gRPC host:port.")
    ],
    json_path: JsonOption = None,
    requests: Annotated[int, typer.Option("--requests", "-n", min=1)] = 10_000,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1)] = 64,
    pid: Annotated[
        int | None,
        typer.Option("--pid", callback=_running_pid, help="Sidecar pid (found from the port)."),
    ] = None,
    token: TokenOption = None,
) -> None:
    """Load a running sidecar with Route calls; compare with an echo servicer (the ceiling)."""
    from benchmarks.load.load_bench import format_result, run_load_bench

    result = run_load_bench(
        address, requests=requests, concurrency=concurrency, pid=pid, token=token
    )
    _report(format_result(result), result, json_path)


def _report(text: str, result: dict[str, Any], json_path: Path | None) -> None:
    """Print a benchmark's lines; write its JSON too when asked."""
    typer.echo(text)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")


def bench_load_compare_command(
    address: Annotated[
        list[str], typer.Option("--address", help="Sidecar gRPC host:port (repeat: 1 or more).")
    ],
    rounds: Annotated[int, typer.Option("--rounds", min=1)] = 6,
    requests: Annotated[
        int, typer.Option("--requests", "-n", min=1, help="Calls per round.")
    ] = 3_000,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1)] = 64,
    json_path: JsonOption = None,
    token: TokenOption = None,
    floor: Annotated[
        bool,
        typer.Option(
            "--floor",
            help="Also load a floor servicer: echo plus the tokenizer and classifier work "
            "in a route process, nothing else.",
        ),
    ] = False,
    world: Annotated[
        Path | None,
        typer.Option("--world", help="The floor servicer's world (default: the built-in one)."),
    ] = None,
) -> None:
    """Sidecars side by side (say, two builds): interleaved rounds, each beside an echo round."""
    import grpc

    from benchmarks.load.load_bench import compare_sidecars, format_comparison

    floor_world = _floor_world(world) if floor else None
    try:
        result = compare_sidecars(
            address,
            rounds=rounds,
            requests=requests,
            concurrency=concurrency,
            token=token,
            floor_world=floor_world,
        )
    except grpc.RpcError as error:  # a refused call
        typer.echo(f"error: {error.code().name}: {error.details()}", err=True)
        raise typer.Exit(1) from None
    except RuntimeError as error:  # a servicer that did not start
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    _report(format_comparison(result), result, json_path)


def _floor_world(world: Path | None) -> Path:
    """The floor servicer's world: ``world`` or the built-in one; exit 2 if not built."""
    from router.bundle import BundleNotFoundError, ModelBundle, default_bundle_dir

    chosen = world or default_bundle_dir()
    try:
        ModelBundle.load(chosen)
    except BundleNotFoundError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    return chosen


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add ``bench load`` and ``bench load-compare``."""
    bench.command("load")(bench_load_command)
    bench.command("load-compare")(bench_load_compare_command)
