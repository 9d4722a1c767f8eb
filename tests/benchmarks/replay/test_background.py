"""The replay's background load: processes start, load the machine, are reported, and stop
(at the end, on an error, on Ctrl-C, and when their parent is killed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmarks.replay.background import (
    BackgroundLoadConfig,
    background_load,
    describe_load,
)
from router.cli import build_app
from tests.conftest import process_alive, wait_gone

ROOT = Path(__file__).resolve().parents[3]
SHORT_SPELLS = (0.05, 0.1)


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown background load 'busy'"):
        BackgroundLoadConfig("busy")
    with pytest.raises(ValueError, match="load processes"):
        BackgroundLoadConfig("steady", -1)
    with pytest.raises(ValueError, match="spell lengths"):
        BackgroundLoadConfig("bursty", 1, spell_s=(2.0, 0.2))


def test_no_load_starts_nothing_and_says_so() -> None:
    with background_load(BackgroundLoadConfig("none")) as record:
        assert record.pids == []
    summary = record.summary()
    assert summary["mode"] == "none" and summary["procs"] == 0
    assert describe_load(summary) == "background load: none"
    assert describe_load(None) == "background load: none"


def test_steady_load_runs_its_processes_busy_and_stops_them() -> None:
    with background_load(BackgroundLoadConfig("steady", 2)) as record:
        assert len(record.pids) == 2
        time.sleep(1.0)
        assert all(process_alive(pid) for pid in record.pids)
    assert wait_gone(record.pids, timeout=0.5)  # stopped before the block returned
    summary = record.summary()
    assert summary["mode"] == "steady" and summary["procs"] == 2
    # Busy seconds are spin time counted by each process: all of its life after start-up.
    assert summary["busy_fraction"] > 0.9
    assert summary["seconds"] >= 1.0
    assert describe_load(summary).startswith("background load: steady, 2 processes, seed 0")


def test_bursty_load_alternates_busy_and_idle() -> None:
    config = BackgroundLoadConfig("bursty", 2, seed=3, spell_s=SHORT_SPELLS)
    with background_load(config) as record:
        time.sleep(2.0)
    summary = record.summary()
    assert 0.15 < summary["busy_fraction"] < 0.85
    assert summary["spell_s"] == [0.05, 0.1] and summary["seed"] == 3
    assert "bursty, 2 processes, spells 0.05-0.1 s, seed 3" in describe_load(summary)


def test_an_error_in_the_block_stops_the_processes() -> None:
    config = BackgroundLoadConfig("bursty", 1, spell_s=SHORT_SPELLS)
    with pytest.raises(RuntimeError), background_load(config) as record:
        time.sleep(0.3)
        raise RuntimeError("the replay failed")
    assert record.pids and wait_gone(record.pids, timeout=0.5)


_DRIVER = textwrap.dedent(
    """
    import faulthandler, os, signal, sys, time
    from benchmarks.replay.background import BackgroundLoadConfig, background_load
    faulthandler.register(signal.SIGUSR1)  # the test asks for the stacks if it hangs
    # Ctrl-C raises KeyboardInterrupt even when this test runs under a shell's background
    # job, whose children start with SIGINT ignored (and then Python installs no handler).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with background_load(BackgroundLoadConfig("steady", 2)) as record:
        print(" ".join(map(str, record.pids)), flush=True)
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), 9)
        time.sleep(60)
    """
)


@pytest.mark.parametrize("ending", ["interrupt", "kill"])
def test_ctrl_c_or_a_killed_replay_leaves_no_load_behind(ending: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, ending],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert driver.stdout is not None
        pids = [int(pid) for pid in driver.stdout.readline().split()]
        assert len(pids) == 2 and all(process_alive(pid) for pid in pids)
        if ending == "interrupt":
            driver.send_signal(signal.SIGINT)  # Ctrl-C: KeyboardInterrupt in the block
        try:
            driver.wait(timeout=30)
        except subprocess.TimeoutExpired:  # say where it hangs
            driver.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            driver.kill()
            _, stderr = driver.communicate()
            pytest.fail(f"the driver did not end within 30 s; its stacks:\n{stderr}")
        # Killed, the parent cannot stop them: each notices it is gone within ~0.1 s.
        assert wait_gone(pids)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


def test_the_replay_cli_takes_the_load_options() -> None:
    runner = CliRunner()
    app = build_app()
    help_text = runner.invoke(app, ["replay", "--help"], env={"COLUMNS": "240"}).output
    assert "--background-load" in help_text and "--load-procs" in help_text
    refused = runner.invoke(
        app,
        ["replay", "--trace", "uniform", "--address", "127.0.0.1:9", "--background-load", "busy"],
    )
    assert refused.exit_code == 2
    assert "unknown --background-load 'busy'; known: none, steady, bursty" in refused.output
