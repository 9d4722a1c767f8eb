"""``specroute serve --fleet``: fleet files it cannot serve stop it with one line, status 2;
a fleet whose replicas are all unreachable still starts (routed around, probed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from benchmarks.fleet.vllm_process import free_port
from router.launch import launch_sidecar
from router.pb import router_pb2 as pb
from router.pb import router_pb2_grpc
from tests.router.conftest import ServingWorld


def serve(
    serving_world: ServingWorld, tmp_path: Path, fleet: str
) -> subprocess.CompletedProcess[str]:
    config = serving_world.toml(tmp_path / "sidecar.toml")
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(fleet)
    env = {**os.environ, "SPECROUTE_STATE_DIR": str(tmp_path / "state")}
    command = [sys.executable, "-m", "router.cli", "serve", "--config", str(config)]
    command += ["--fleet", str(fleet_file), "--port", "0", "--http-port", "-1"]
    command += ["--metrics-port", "-1"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    ("replica", "message"),
    [
        (
            'url = "http://127.0.0.1:8000"\nspeculative = "no-such-drafter"\nk = 3',
            "unknown drafter 'no-such-drafter'",
        ),
        ('url = "127.0.0.1:8000"\nspeculative = "ngram"', "replicas.0.url"),
        ('url = "http://127.0.0.1:99999"\nspeculative = "ngram"', "bad port"),
    ],
)
def test_unservable_fleet_files_exit_2_with_one_line(
    serving_world: ServingWorld, tmp_path: Path, replica: str, message: str
) -> None:
    done = serve(serving_world, tmp_path, f'[[replicas]]\nmodel = "target"\n{replica}\n')
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert str(tmp_path / "fleet.toml") in errors[0]


def test_a_fleet_of_unreachable_replicas_starts_and_refuses_generation(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    config = serving_world.toml(tmp_path / "sidecar.toml")
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(
        f'[[replicas]]\nurl = "http://127.0.0.1:{free_port()}"\nmodel = "target"\n'
        'speculative = "ngram"\nk = 3\n'
    )
    with launch_sidecar(
        config_file=config,
        state_dir=tmp_path / "state",
        http=False,
        metrics=False,
        extra_args=["--fleet", str(fleet_file)],
        log_path=tmp_path / "sidecar.log",
    ) as sidecar:
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(sidecar.grpc_address))
        decision = stub.Route(pb.RouteRequest(text="Hello there"), timeout=30)
        assert decision.replica == ""  # nothing to place it on
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(pb.GenerateRequest(text="Hello", max_new_tokens=4), timeout=30))
        assert refused.value.code() == grpc.StatusCode.INTERNAL
        assert "no replica of the fleet is serving" in (refused.value.details() or "")
        assert "GET /health failed" in (refused.value.details() or "")
    assert "not serving yet" in sidecar.log_tail(20_000)
