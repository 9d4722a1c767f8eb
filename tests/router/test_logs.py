"""``--log-format json`` / ``SPECROUTE_LOG_FORMAT=json``: one JSON object a line, from
the sidecar and its child processes (router/logs.py)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import grpc

from router.launch import launch_sidecar
from router.logs import formatter
from router.pb import router_pb2 as pb
from router.pb import router_pb2_grpc
from router.settings import unknown_env_lines
from tests.router.conftest import ServingWorld

FIELDS = {"time", "level", "logger", "message"}


def test_a_traceback_is_one_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",), None)
        record.exc_info = sys.exc_info()
    line = formatter("json").format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert set(parsed) >= FIELDS and parsed["message"] == "failed here"
    assert parsed["level"] == "ERROR" and "ValueError: boom" in parsed["exc_info"]
    assert parsed["time"].endswith("+00:00")  # ISO 8601, UTC


def test_a_sidecar_started_with_json_logs_writes_only_json_lines(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    """Every line it logs, from the start on, is a JSON object; the variable is not taken
    for a misspelt setting."""
    environment = {"SPECROUTE_LOG_FORMAT": "json"}
    assert unknown_env_lines(environment) == []
    log = tmp_path / "sidecar.log"
    with (
        launch_sidecar(
            config_file=serving_world.toml(tmp_path / "sidecar.toml"),
            state_dir=tmp_path / "state",
            env=environment,
            log_path=log,
        ) as sidecar,
        grpc.insecure_channel(sidecar.grpc_address) as channel,
    ):
        stub = router_pb2_grpc.RouterStub(channel)
        assert stub.Route(pb.RouteRequest(text="Hello"), timeout=30).drafter
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    # The one line for scripts on stdout (the ports), as with text logs.
    lines = [line for line in lines if not line.startswith("specroute serving {")]
    records = [json.loads(line) for line in lines]
    assert records and all(set(record) >= FIELDS for record in records), lines
    loggers = {record["logger"] for record in records}
    assert {"router.server", "router.route_process"} <= loggers, loggers


def test_progress_bars_redraw_seldom_off_a_terminal() -> None:
    """Where stderr is a file (CI, `docker logs`), every redraw of a progress bar stays in
    it: a default world build wrote about 1,400. Off a terminal they come every 30 s at
    most, unless TQDM_MININTERVAL says otherwise."""
    import os
    import subprocess

    script = (
        "import logging; from router.logs import configure_logging; "
        "configure_logging(logging.INFO, 'text'); from tqdm import tqdm; "
        "print(tqdm(total=1).mininterval)"
    )
    environment = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}

    def mininterval(**extra: str) -> float:
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,  # stderr a pipe: not a terminal
            text=True,
            env={**environment, **extra},
            check=True,
        )
        return float(done.stdout.strip())

    assert mininterval() == 30.0
    assert mininterval(TQDM_MININTERVAL="2") == 2.0


def test_json_logs_carry_no_progress_bars() -> None:
    """A sharded checkpoint's "Loading checkpoint shards" bar (transformers') and our own
    bars wrote lines that are not JSON into the stream of JSON objects."""
    import os
    import subprocess

    script = (
        "import logging; from router.logs import configure_logging; "
        "configure_logging(logging.INFO, 'json'); from tqdm import tqdm; "
        "from transformers.utils import logging as hf; "
        "print(tqdm(total=1).disable, hf.is_progress_bar_enabled())"
    )
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")
    }
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment
    )
    assert done.stdout.split() == ["True", "False"], done.stderr
