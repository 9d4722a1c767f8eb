"""Durability: ``specroute serve`` subprocesses killed with SIGKILL or stopped gracefully."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from benchmarks.load.load_bench import child_pids
from router.launch import LaunchedSidecar, launch_sidecar
from router.pb import router_pb2 as pb
from router.pb import router_pb2_grpc
from router.service import Components
from router.store import (
    DATABASE_NAME,
    SCHEMA_VERSION,
    DrafterRecord,
    SidecarStore,
    StateStoreError,
)
from tests.router.conftest import (
    ADMIN,
    ADMIN_TOKEN,
    COMPLETION_PROMPT,
    FailingWrites,
    ServingWorld,
    SidecarThread,
)

PROMPT = COMPLETION_PROMPT


def _stub(sidecar: LaunchedSidecar) -> router_pb2_grpc.RouterStub:
    return router_pb2_grpc.RouterStub(grpc.insecure_channel(sidecar.grpc_address))


def _launch(world: ServingWorld, state_dir: Path, config: Path) -> object:
    return launch_sidecar(
        state_dir=state_dir, config_file=config, admin_token=ADMIN_TOKEN, http=False
    )


def _latest_snapshot_version(state_dir: Path) -> int:
    store = SidecarStore(state_dir)
    try:
        snapshot = store.latest_policy("thompson")
        return snapshot.version if snapshot is not None else -1
    finally:
        store.close()


def _wait_gone(pids: list[int], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        assert time.monotonic() < deadline, f"processes {pids} outlived the sidecar"
        time.sleep(0.1)


def learned_without(state: pb.PolicyState, drafter: str) -> pb.PolicyState:
    """What ``state`` learned, ``drafter``'s arms left out of every context: each context's
    choice is cleared too, since a drafter added since may be the best on its prior alone
    (a new n-gram drafter, priced by the copy model at no cost, often is)."""
    copy = pb.PolicyState()
    copy.CopyFrom(state)
    for context in copy.contexts:
        kept = [arm for arm in context.arms if arm.drafter != drafter]
        del context.arms[:]
        context.arms.extend(kept)
        context.ClearField("chosen_drafter")
        context.ClearField("chosen_k")
    return copy


def test_drafter_and_policy_survive_sigkill_and_sighup(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    config = serving_world.toml(tmp_path / "sidecar.toml", snapshot_interval_s=0.3)

    with _launch(serving_world, state_dir, config) as first:  # type: ignore[attr-defined]
        stub = _stub(first)
        registered = stub.RegisterDrafter(
            pb.RegisterDrafterRequest(
                name="spare", kind="model", path=str(serving_world.spare_dir)
            ),
            metadata=ADMIN,
        )
        for _ in range(3):
            list(stub.Generate(pb.GenerateRequest(text=PROMPT, max_new_tokens=12), timeout=120))
        # Counterfactual updates land after each stream ends: wait until a periodic
        # snapshot has caught up with the live state, then kill.
        deadline = time.monotonic() + 60
        while True:
            state_before_kill = stub.GetPolicyState(pb.GetPolicyStateRequest())
            if _latest_snapshot_version(state_dir) == state_before_kill.version:
                break
            assert time.monotonic() < deadline, "no periodic snapshot of the last update"
            time.sleep(0.1)
        assert state_before_kill.version > 0
        # A registration just before SIGKILL (no cleanup at all) must survive, options too.
        last = pb.RegisterDrafterRequest(
            name="last",
            kind="copy-or-model",
            path=str(serving_world.spare_dir),
            options={"model_k": "2"},
        )
        stub.RegisterDrafter(last, metadata=ADMIN)
        children = child_pids(first.pid)  # the route process
        assert children
        first.kill()
        _wait_gone(children)  # it sees its stdin close and exits: no orphan

    with _launch(serving_world, state_dir, config) as second:  # type: ignore[attr-defined]
        stub = _stub(second)
        drafters = {d.name: d for d in stub.ListDrafters(pb.ListDraftersRequest()).drafters}
        assert {"spare", "last"} <= set(drafters)
        assert drafters["last"].kind == "copy-or-model"
        assert dict(drafters["last"].options) == {"model_k": "2"}
        assert drafters["spare"].weights_digest == registered.weights_digest
        assert drafters["spare"].created_unix == registered.created_unix
        # The restored policy equals the last snapshot taken before the kill.
        # ("last" came after that snapshot: it joins with its prior arms only.)
        restored = stub.GetPolicyState(pb.GetPolicyStateRequest())
        assert learned_without(restored, "last") == learned_without(state_before_kill, "last")
        chunks = list(
            stub.Generate(
                pb.GenerateRequest(
                    text=PROMPT,
                    max_new_tokens=6,
                    force_drafter="spare",
                    force_draft_length=2,
                    no_update=True,  # keeps the state below stable (no late updates)
                ),
                timeout=120,
            )
        )
        assert chunks[-1].stats.generated_tokens == 6
        report = stub.Route(pb.RouteRequest(text=PROMPT))
        stub.Report(
            pb.RouteOutcome(
                request_id=report.request_id,
                drafted_per_step=[2, 2],
                accepted_per_step=[1, 2],
                verify_time_s=0.01,
            )
        )
        state_before_stop = stub.GetPolicyState(pb.GetPolicyStateRequest())
        # The process bootstrap took its start-up heap out of the collector's reach.
        assert "froze" in second.log_tail(200_000)
        # SIGHUP, what a closing terminal sends: graceful, final snapshot, like SIGTERM
        # (whose final snapshot tests/router/test_pooling.py checks).
        assert second.stop(signum=signal.SIGHUP) == 0
    # The final snapshot at SIGHUP holds the last update (restoring a snapshot is
    # covered by the restart above).
    assert _latest_snapshot_version(state_dir) == state_before_stop.version


SERVERS_OFF = ("--http-port", "-1", "--metrics-port", "-1")


# ``specroute serve`` that says on stdout, as it exits, which of the engine's imports it made:
# a start refused for what needs no model stops before them (within a second, where their
# import alone took about five on two cores).
SERVE_TELLING_IMPORTS = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('engine imports:', sorted({'torch', 'transformers'}"
    " & set(sys.modules))))\n"
    "from router.cli import main\n"
    "sys.argv = ['specroute', 'serve', *sys.argv[1:]]\n"
    "main()\n"
)
NO_ENGINE_IMPORTS = "engine imports: []"


def _serve(state_dir: Path, world: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """``specroute serve`` on ``state_dir`` and the world at ``world``, for a start that must
    stop (its stdout ends with the engine's imports it made)."""
    return subprocess.run(
        [sys.executable, "-c", SERVE_TELLING_IMPORTS, *(flags or ("--port", "0", *SERVERS_OFF))],
        capture_output=True,
        text=True,
        env={
            "PATH": "/usr/bin:/bin",
            "HF_HUB_OFFLINE": "1",
            "SPECROUTE_STATE_DIR": str(state_dir),
            "SPECROUTE_WORLD_DIR": str(world),
        },
        timeout=120,
    )


def _serve_without_a_world(
    state_dir: Path, tmp_path: Path, *flags: str
) -> subprocess.CompletedProcess[str]:
    """``specroute serve`` on ``state_dir`` with no world, for a start that must stop in
    one line before anything loads."""
    return _serve(state_dir, tmp_path / "no-world", *flags)


def _damaged_pages(state_dir: Path) -> Path:
    """A state database with snapshots over many pages, its third page overwritten: its
    header and schema read fine, its rows do not."""
    store = SidecarStore(state_dir)
    for version in range(3):
        store.save_policy("thompson", version, {"arms": ["x" * 100] * 200})
    store.close()
    path = state_dir / DATABASE_NAME
    with path.open("r+b") as database:
        database.seek(2 * 4096)
        database.write(b"\xde\xad" * 2048)
    return path


def _from_a_newer_specroute(state_dir: Path) -> Path:
    """A state database as a later specroute would leave it: a later schema version."""
    store = SidecarStore(state_dir)
    store.save_policy("thompson", 1, {"learnt": True})
    store.close()
    path = state_dir / DATABASE_NAME
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    return path


@pytest.mark.parametrize(
    "damage", ["not a directory", "not a database", "damaged pages", "a newer schema"]
)
def test_a_state_directory_that_cannot_be_used_stops_the_start_and_is_left_as_is(
    tmp_path: Path, damage: str
) -> None:
    """A traceback before, and only after the models had loaded; now one line and exit
    status 2 before anything is loaded (no world is needed to see it), the file unchanged.
    A database whose pages past the schema are damaged started, then failed the first
    call that read them (a traceback at start once the drafters were read)."""
    state_dir = tmp_path / "state"
    if damage == "not a directory":
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        state_dir, kept = blocker / "state", blocker
    elif damage == "not a database":
        state_dir.mkdir()
        kept = state_dir / DATABASE_NAME
        kept.write_bytes(bytes(range(256)) * 20)  # not SQLite's header
    elif damage == "a newer schema":
        kept = _from_a_newer_specroute(state_dir)
    else:
        kept = _damaged_pages(state_dir)
    before = kept.read_bytes()
    done = _serve_without_a_world(state_dir, tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert str(state_dir) in done.stderr
    assert kept.read_bytes() == before
    assert done.stdout.rstrip().endswith(NO_ENGINE_IMPORTS), done.stdout


def test_the_state_database_is_stamped_with_its_schema_version(tmp_path: Path) -> None:
    """A new database, and one written before versions were stamped (user_version 0),
    are stamped, their rows kept; one stamped by a newer specroute is refused, untouched,
    naming both versions (it would be half-read: a later layout's columns unknown here)."""
    state_dir = tmp_path / "state"
    store = SidecarStore(state_dir)
    store.save_policy("thompson", 3, {"learnt": True})
    store.close()
    path = state_dir / DATABASE_NAME
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.execute("PRAGMA user_version=0")
    store = SidecarStore(state_dir)
    assert store.latest_policy("thompson").state == {"learnt": True}
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    newer = _from_a_newer_specroute(tmp_path / "newer")
    before = newer.read_bytes()
    expected = (
        f"written by a newer specroute (its schema version is {SCHEMA_VERSION + 1}; this "
        f"one reads {SCHEMA_VERSION} and older)"
    )
    with pytest.raises(StateStoreError, match=re.escape(expected)):
        SidecarStore(tmp_path / "newer")
    assert newer.read_bytes() == before


class _NoRoomForTheLog:
    """A new SQLite connection on a full disk: switching to WAL mode, which writes the
    shared-memory index, fails as SQLite reports it there ("disk I/O error")."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.row_factory: Any = None

    def execute(self, sql: str, *parameters: Any) -> sqlite3.Cursor:
        if sql.startswith("PRAGMA journal_mode"):
            raise sqlite3.OperationalError("disk I/O error")
        return self.db.execute(sql, *parameters)

    def close(self) -> None:
        self.db.close()


def test_a_removed_drafters_sample_leaves_the_state_database(tmp_path: Path) -> None:
    """`drafters remove` deletes the fine-tuning sample a registration keeps (a distilled
    drafter's are captured prompts): its text is in neither the database file nor its log
    afterwards, where a plain DELETE left it in the log and in the file's free pages."""
    from router.store import DrafterRecord, SidecarStore

    marker = "a captured prompt: my account number is 8675309"

    def on_disk() -> bytes:
        return b"".join(path.read_bytes() for path in tmp_path.glob("sidecar.sqlite3*"))

    store = SidecarStore(tmp_path)
    try:
        store.add_drafter(DrafterRecord(name="d", kind="ngram", finetune_sample=(marker,)))
        assert marker.encode() in on_disk()
        store.remove_drafter("d")
        assert marker.encode() not in on_disk()
    finally:
        store.close()
    assert marker.encode() not in on_disk()


def test_a_full_disk_at_start_is_named_and_not_called_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start on a full disk could not open the state database (no room for its WAL) and
    said to move the database aside or restore it from a backup, though nothing was wrong
    with it: following that advice loses every registration and what the policy learnt.
    Now it names the full disk and leaves the file as it is."""
    state_dir = tmp_path / "state"
    store = SidecarStore(state_dir)
    store.save_policy("thompson", 7, {"learnt": True})
    store.close()
    before = (state_dir / DATABASE_NAME).read_bytes()
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: _NoRoomForTheLog(connect(*a, **k)))
    monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((4096,) * 2 + (0,) * 8))
    with pytest.raises(StateStoreError) as refused:
        SidecarStore(state_dir)
    message = str(refused.value)
    assert "disk I/O error: the disk holding it has 0 bytes free; free some space" in message
    assert "move it aside" not in message and "backup" not in message
    monkeypatch.undo()  # room again: the state is all there
    assert (state_dir / DATABASE_NAME).read_bytes() == before
    store = SidecarStore(state_dir)
    assert store.latest_policy("thompson").state == {"learnt": True}
    store.close()


def test_serve_without_a_world_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """Exit status 1 before, where every other command that needs the bundle exits 2."""
    done = _serve_without_a_world(tmp_path / "state", tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: no world at ") and done.stderr.count("\n") == 1
    assert done.stdout.rstrip().endswith(NO_ENGINE_IMPORTS), done.stdout


def test_a_state_directory_in_use_by_another_sidecar_stops_the_start(tmp_path: Path) -> None:
    """Two sidecars on one state directory both started, and each snapshot overwrote what
    the other had learnt. Now the second stops in one line naming the first's pid, before
    anything loads; the directory is free again once the first closes its store."""
    state_dir = tmp_path / "state"
    serving = SidecarStore(state_dir, exclusive=True)
    try:
        with pytest.raises(
            StateStoreError, match=rf"in use by another sidecar \(pid {os.getpid()}\)"
        ):
            SidecarStore(state_dir, exclusive=True)
        done = _serve_without_a_world(state_dir, tmp_path)
        assert done.returncode == 2, done.stderr
        assert (
            done.stderr.startswith("error: the state directory ") and done.stderr.count("\n") == 1
        )
        assert f"in use by another sidecar (pid {os.getpid()})" in done.stderr, done.stderr
        assert done.stdout.rstrip().endswith(NO_ENGINE_IMPORTS), done.stdout
        SidecarStore(state_dir).close()  # a reader (a tool, a backup) takes no lock
    finally:
        serving.close()
    SidecarStore(state_dir, exclusive=True).close()


def _listening_socket() -> socket.socket:
    """A socket listening on a free port of 127.0.0.1, as another server would hold it."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


@pytest.mark.parametrize("flag", ["--port", "--http-port", "--metrics-port"])
def test_a_port_held_by_another_process_stops_the_start_in_one_line(
    tmp_path: Path, flag: str
) -> None:
    """A sidecar already running on the port: a traceback after the models had loaded
    before (grpc's RuntimeError, or aiohttp's OSError and "Event loop is closed"); now one
    line naming the port, exit status 2, before anything loads (no world is needed)."""
    with _listening_socket() as held:
        port = held.getsockname()[1]
        ports = {"--port": "0", "--http-port": "0", "--metrics-port": "0", flag: str(port)}
        flags = itertools.chain(*ports.items())
        done = _serve_without_a_world(tmp_path / "state", tmp_path, *flags)
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.startswith("error: cannot listen on 127.0.0.1:")
        and done.stderr.count("\n") == 1
    ), done.stderr
    assert f":{port} for " in done.stderr and "Traceback" not in done.stderr
    assert done.stdout.rstrip().endswith(NO_ENGINE_IMPORTS), done.stdout


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_a_sidecar_listens_on_an_ipv6_address(
    serving_world: ServingWorld, components: Components, tmp_path: Path
) -> None:
    """host "::1" loaded every model and then failed to bind gRPC ("address lookup failed
    for ::1:50148: Misformatted domain name"); "[::1]" failed the port check. Both serve,
    and the address clients are given is bracketed."""
    from router.settings import Settings

    assert Settings(host="[::1]").host == "::1"
    with pytest.raises(ValueError, match="host"):
        Settings(host=" ")
    settings = serving_world.settings(tmp_path / "state", host="[::1]", metrics_port=None)
    running = SidecarThread(settings, components)
    try:
        assert running.running.address.startswith("[::1]:")
        assert running.stub.Route(pb.RouteRequest(text="2 + 2 =")).task_cluster
        health = f"http://[::1]:{running.running.http_port}/health"
        with urllib.request.urlopen(health, timeout=30) as answer:
            assert answer.status == 200
    finally:
        running.stop()


def test_a_port_taken_during_the_start_stops_what_started(
    serving_world: ServingWorld,
    components: Components,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The HTTP port taken between the check and the listen: ``ListenError``, and the gRPC
    server already listening is stopped (its port free again), the state store closed."""
    import asyncio

    from router import server as server_module
    from router.errors import ListenError

    monkeypatch.setattr(server_module, "check_ports_free", lambda settings: None)
    with _listening_socket() as held, _listening_socket() as grpc_port_finder:
        grpc_port = grpc_port_finder.getsockname()[1]
        grpc_port_finder.close()
        settings = serving_world.settings(tmp_path / "state").model_copy(
            update={"port": grpc_port, "http_port": held.getsockname()[1], "metrics_port": None}
        )
        with pytest.raises(ListenError, match="for HTTP: "):
            asyncio.run(server_module.start_sidecar(settings, components))
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", grpc_port))  # the gRPC server let it go
    assert _latest_snapshot_version(tmp_path / "state") >= 0  # the stop saved the policy


def test_a_start_that_fails_midway_frees_the_state_directory(
    serving_world: ServingWorld,
    components: Components,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A start that failed after the service was built (here: pooling) kept the state
    directory's lock, so a second start in the same process (an embedder's retry) was
    refused as 'in use by another sidecar' naming its own pid."""
    import asyncio

    from router import server as server_module

    async def failing_pooling(*args: Any) -> None:
        raise RuntimeError("pooling failed to start")

    monkeypatch.setattr(server_module, "start_pooling", failing_pooling)
    # The route process's child, forked by a background start, holds a copy of the lock's
    # descriptor until its exec: stretch that window (it was seen failing this test under
    # load), and the directory must still be free once the start has failed.
    popen = subprocess.Popen

    def slow_exec(*args: Any, **kwargs: Any) -> Any:
        return popen(*args, **kwargs, preexec_fn=lambda: time.sleep(1.0))

    monkeypatch.setattr(subprocess, "Popen", slow_exec)
    settings = serving_world.settings(tmp_path / "state").model_copy(
        update={"http_port": None, "metrics_port": None}
    )
    with pytest.raises(RuntimeError, match="pooling failed"):
        asyncio.run(server_module.start_sidecar(settings, components))
    SidecarStore(tmp_path / "state", exclusive=True).close()  # free again


def test_a_world_drafter_that_does_not_load_stops_the_start_in_one_line(
    serving_world: ServingWorld, tmp_path: Path
) -> None:
    """A world drafter whose weights file is cut short: the start stopped with its line,
    after a logged traceback (the failed start's cleanup saved a policy that had not
    started). Now the line alone, and the saved policy is left as it was."""
    import shutil

    world = tmp_path / "world"
    shutil.copytree(serving_world.world.root, world)
    weights = world / "drafters" / "code" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    state_dir = tmp_path / "state"
    store = SidecarStore(state_dir)
    store.save_policy("thompson", 7, {"arms": []})
    store.close()
    done = _serve(state_dir, world)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and " ERROR " not in done.stderr, done.stderr
    last = done.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error: cannot load model weights") and "drafters/code" in last
    assert _latest_snapshot_version(state_dir) == 7


def test_a_file_system_without_locks_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flock failing otherwise than 'held' (ENOLCK on some network mounts) was a traceback."""
    import errno
    import fcntl

    def no_locks(descriptor: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(StateStoreError, match=r"cannot lock the state directory .*No locks"):
        SidecarStore(tmp_path / "state", exclusive=True)


@pytest.mark.parametrize(
    ("errorname", "message", "code", "said"),
    [
        ("SQLITE_FULL", "database or disk is full", "RESOURCE_EXHAUSTED", "is full"),
        # A disk remounted read-only after I/O errors (ext4's errors=remount-ro):
        ("SQLITE_READONLY", "attempt to write a readonly database", "FAILED_PRECONDITION", ""),
        ("SQLITE_IOERR_WRITE", "disk I/O error", "FAILED_PRECONDITION", ""),
    ],
    ids=["full", "read-only", "io-error"],
)
def test_a_state_store_that_cannot_be_written_refuses_admin_changes_and_changes_nothing(
    serving_world: ServingWorld,
    components: Components,
    tmp_path: Path,
    errorname: str,
    message: str,
    code: str,
    said: str,
) -> None:
    """With the state store's disk full (every write SQLITE_FULL), a registration or a
    policy switch was an INTERNAL error, and the switch had already happened: the sidecar
    served a policy whose predecessor it could not save. Now RESOURCE_EXHAUSTED, nothing
    changed, and the sidecar keeps serving. A store that cannot be written at all (read
    only, I/O errors) was INTERNAL with a traceback: now FAILED_PRECONDITION naming it."""
    said = said or "cannot be written"
    running = SidecarThread(serving_world.settings(tmp_path / "state"), components)
    try:
        stub, store = running.stub, running.service.store
        before = stub.GetPolicyState(pb.GetPolicyStateRequest(), metadata=ADMIN).policy
        store._db = FailingWrites(store._db, errorname, message)
        calls = {
            "RegisterDrafter": lambda: stub.RegisterDrafter(
                pb.RegisterDrafterRequest(name="lookup", kind="ngram"), metadata=ADMIN
            ),
            "SetPolicy": lambda: stub.SetPolicy(pb.SetPolicyRequest(policy="ucb"), metadata=ADMIN),
        }
        for call in calls.values():
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode[code]
            assert said in (refused.value.details() or "")
            assert message in (refused.value.details() or "")
        drafters = stub.ListDrafters(pb.ListDraftersRequest())
        assert "lookup" not in {d.name for d in drafters.drafters}
        assert stub.GetPolicyState(pb.GetPolicyStateRequest(), metadata=ADMIN).policy == before
        assert stub.Route(pb.RouteRequest(text=PROMPT)).request_id  # still serving

        store._db = store._db.db  # room again
        for call in calls.values():
            call()
        # Failing again at shutdown: the final snapshot is not taken, and the sidecar
        # stops cleanly all the same (it raised out of the stop before).
        store._db = FailingWrites(store._db, errorname, message)
    finally:
        running.stop()


def _switching_waits_for_the_store_and_serving_does_not(running: SidecarThread) -> None:
    """SetPolicy saved the outgoing policy under the lock Route and Report take on the
    event loop: while SQLite waited its 5 s for the lock, no call was served. Now Routes
    are answered meanwhile, and the switch fails with the previous policy serving."""
    import threading

    before = running.stub.GetPolicyState(pb.GetPolicyStateRequest(), metadata=ADMIN).policy
    errors: list[grpc.RpcError] = []

    def switch() -> None:
        try:
            running.stub.SetPolicy(pb.SetPolicyRequest(policy="ucb"), metadata=ADMIN, timeout=60)
        except grpc.RpcError as error:
            errors.append(error)

    switching = threading.Thread(target=switch)
    switching.start()
    served_meanwhile = 0
    while switching.is_alive():
        with contextlib.suppress(grpc.RpcError):  # a Route held past 1 s counts as none
            running.stub.Route(pb.RouteRequest(text=PROMPT), timeout=1)
            served_meanwhile += switching.is_alive()
    switching.join()
    assert served_meanwhile >= 20, served_meanwhile
    assert [e.code() for e in errors] == [grpc.StatusCode.UNAVAILABLE]
    assert "is locked by another process" in (errors[0].details() or "")
    after = running.stub.GetPolicyState(pb.GetPolicyStateRequest(), metadata=ADMIN)
    assert after.policy == before
    assert running.stub.Route(pb.RouteRequest(text=PROMPT)).request_id


def _concurrent_switches_each_answer_their_own(running: SidecarThread) -> None:
    """SetPolicy calls were not one after another: of two at once, the first often
    answered with the other's policy (its name, version and contexts), when the event
    loop resumed it after the other's switch. A switch slowed down after it is made opens
    that window every time."""
    from concurrent.futures import ThreadPoolExecutor

    holder = running.service.policy
    made = holder.start

    def slow_start(*args: Any, **kwargs: Any) -> Any:
        started = made(*args, **kwargs)
        time.sleep(0.2)
        return started

    def switch(policy: str) -> str:
        request = pb.SetPolicyRequest(policy=policy)
        return running.stub.SetPolicy(request, metadata=ADMIN, timeout=60).policy

    holder.start = slow_start
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            for _ in range(3):
                asked = ["ucb", "none", "thompson"]
                assert list(pool.map(switch, asked)) == asked
    finally:
        del holder.start  # the class's again


def test_a_state_store_locked_by_another_process_is_unavailable_and_changes_nothing(
    serving_world: ServingWorld,
    components: Components,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another process holding the state database's write lock (an operator's sqlite3
    shell, a backup) made a registration INTERNAL ("OperationalError, the sidecar's log has
    the traceback") and each periodic snapshot a traceback. Now the registration is
    UNAVAILABLE (which clients retry) saying the store is locked, nothing changes, a
    snapshot's failure is one line, and both work once the lock is gone."""
    settings = serving_world.settings(tmp_path / "state", snapshot_interval_s=0.5)
    running = SidecarThread(settings, components)
    holder = sqlite3.connect(tmp_path / "state" / DATABASE_NAME, isolation_level=None)
    register = pb.RegisterDrafterRequest(name="lookup", kind="ngram")
    with caplog.at_level(logging.INFO, logger="router"):
        try:
            holder.execute("BEGIN IMMEDIATE")
            with pytest.raises(grpc.RpcError) as refused:
                running.stub.RegisterDrafter(register, metadata=ADMIN, timeout=60)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "is locked by another process" in (refused.value.details() or "")
            listed = running.stub.ListDrafters(pb.ListDraftersRequest()).drafters
            assert "lookup" not in {d.name for d in listed}
            deadline = time.monotonic() + 30  # a snapshot waits SQLite's 5 s, then fails
            while "policy snapshot failed" not in caplog.text:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            _switching_waits_for_the_store_and_serving_does_not(running)
            holder.execute("ROLLBACK")
            running.stub.RegisterDrafter(register, metadata=ADMIN, timeout=60)
            _concurrent_switches_each_answer_their_own(running)
        finally:
            holder.close()
            running.stop()
    failed = [r for r in caplog.records if r.getMessage().startswith("policy snapshot failed")]
    assert failed and all(r.exc_info is None for r in failed)
    assert "locked by another process" in failed[0].getMessage()


def test_snapshots_on_a_full_disk_are_one_line_each_counted_and_resume(
    serving_world: ServingWorld,
    components: Components,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Periodic snapshots on a full disk logged a whole traceback at every interval, and a
    stop whose final snapshot failed still said "policy state saved". Now each failure is
    one line naming the cause, counted in ``specroute_policy_snapshot_failures_total``;
    the first save with room again says so; a stop on a full disk says nothing was saved."""
    settings = serving_world.settings(tmp_path / "state", snapshot_interval_s=0.1)
    running = SidecarThread(settings, components)
    store = running.service.store
    with caplog.at_level(logging.INFO, logger="router"):
        try:
            store._db = FailingWrites(store._db)
            deadline = time.monotonic() + 30
            while _snapshot_failures(running.metrics_url) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _snapshot_failures(running.metrics_url) >= 2
            store._db = store._db.db  # room again
            while "policy snapshot saved again" not in caplog.text:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            store._db = FailingWrites(store._db)  # and full at the stop
        finally:
            running.stop()
    failed = [r for r in caplog.records if r.getMessage().startswith("policy snapshot failed")]
    assert len(failed) >= 2
    assert all(r.exc_info is None for r in failed)  # one line each, no traceback
    assert "is full" in failed[0].getMessage() and "(1 in a row)" in failed[0].getMessage()
    assert "final policy snapshot not saved" in caplog.text
    assert "policy state NOT saved" in caplog.text
    assert "sidecar stopped; policy state saved" not in caplog.text


def _snapshot_failures(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^specroute_policy_snapshot_failures_total (\S+)$", text, re.MULTILINE)
    assert match, "the metric is exported"
    return float(match.group(1))


def test_removing_a_stored_drafter_a_built_in_shadows_keeps_the_built_ins_arms(
    serving_world: ServingWorld, components: Components, tmp_path: Path
) -> None:
    """A registration stored under a name a built-in took since is listed as unavailable
    and removable; removing it deletes the stored record only, and the built-in of that
    name keeps serving and its arms in the policy."""
    state = tmp_path / "state"
    store = SidecarStore(state)
    store.add_drafter(DrafterRecord(name="ngram", kind="ngram", options={"max_n": "4"}))
    store.close()
    running = SidecarThread(serving_world.settings(state), components)
    try:
        stub = running.stub
        listed = stub.ListDrafters(pb.ListDraftersRequest())
        assert [d.name for d in listed.unavailable] == ["ngram"]
        stub.RemoveDrafter(pb.RemoveDrafterRequest(name="ngram"), metadata=ADMIN)
        listed = stub.ListDrafters(pb.ListDraftersRequest())
        assert not listed.unavailable and "ngram" in {d.name for d in listed.drafters}
        assert "ngram" in running.service.policy._policy.drafters_
    finally:
        running.stop()
