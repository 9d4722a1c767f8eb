"""The capture store alone: off unless enabled, caps (oldest evicted first), retention, purge."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from router.capture import CaptureSettings, CaptureStore, open_capture

PROMPT = (1, 2, 3, 4)
OUTPUT = (5, 6, 7)
PAIR_BYTES = 4 * (len(PROMPT) + len(OUTPUT))


def _store(tmp_path: Path, **settings: object) -> CaptureStore:
    return CaptureStore(tmp_path, CaptureSettings(enabled=True, **settings))  # type: ignore[arg-type]


def test_nothing_is_captured_unless_enabled(tmp_path: Path) -> None:
    assert open_capture(tmp_path, CaptureSettings()) is None
    assert not (tmp_path / "capture.sqlite3").exists()
    store = CaptureStore(tmp_path, CaptureSettings())  # a reader's handle, capture off
    assert not store.record("math", PROMPT, OUTPUT)
    assert store.stats() == []


def test_only_the_configured_clusters_and_non_empty_outputs(tmp_path: Path) -> None:
    store = _store(tmp_path, clusters=["math"])
    assert store.record("math", PROMPT, OUTPUT)
    assert not store.record("chat", PROMPT, OUTPUT)
    assert not store.record("math", PROMPT, ())
    (pair,) = store.pairs("math")
    assert (pair.prompt_ids, pair.output_ids) == (PROMPT, OUTPUT)
    assert [(s.cluster, s.samples, s.bytes) for s in store.stats()] == [("math", 1, PAIR_BYTES)]


def test_samples_per_cluster_keeps_the_newest(tmp_path: Path) -> None:
    store = _store(tmp_path, samples_per_cluster=3)
    for i in range(5):
        store.record("math", (*PROMPT, i), OUTPUT)
        store.record("code", PROMPT, (*OUTPUT, i))
    assert [p.prompt_ids[-1] for p in store.pairs("math")] == [2, 3, 4]
    assert [p.output_ids[-1] for p in store.pairs("code")] == [2, 3, 4]


def test_byte_cap_evicts_the_oldest_of_any_cluster(tmp_path: Path) -> None:
    store = _store(tmp_path, max_bytes=3 * PAIR_BYTES)
    store.record("math", PROMPT, OUTPUT, now=1e9)
    store.record("code", PROMPT, OUTPUT, now=1e9 + 1)
    store.record("math", PROMPT, OUTPUT, now=1e9 + 2)
    store.record("chat", PROMPT, OUTPUT, now=1e9 + 3)
    assert sum(s.bytes for s in store.stats()) == 3 * PAIR_BYTES
    assert {s.cluster: s.samples for s in store.stats()} == {"code": 1, "math": 1, "chat": 1}
    assert store.pairs("math")[0].created_unix == 1e9 + 2
    too_big = tuple(range(3 * PAIR_BYTES))
    assert not store.record("math", too_big, OUTPUT)


def test_per_cluster_figures_and_the_byte_total_never_read_the_token_ids(
    tmp_path: Path,
) -> None:
    """``stats()`` (each Prometheus scrape, each auto-distill check) and the byte cap
    (each capture) read every row's pages, blobs of token ids included: 25-45 ms each at
    the default 64 MiB, the byte cap's before a Generate's last message. A covering
    index keeps both off the rows."""
    store = _store(tmp_path)
    store.record("math", PROMPT, OUTPUT)
    for query in (
        "SELECT SUM(bytes) FROM captured",
        "SELECT cluster, COUNT(*), SUM(bytes), MIN(created_unix), MAX(created_unix)"
        " FROM captured GROUP BY cluster ORDER BY cluster",
    ):
        plan = " ".join(str(row[-1]) for row in store._db.execute("EXPLAIN QUERY PLAN " + query))
        assert "COVERING INDEX" in plan, plan


def test_retention_deletes_old_samples(tmp_path: Path) -> None:
    store = _store(tmp_path, retention_days=1.0)
    store.record("math", PROMPT, OUTPUT, now=1_000_000.0)
    store.record("math", PROMPT, OUTPUT, now=1_000_000.0 + 86_400.0 + 1)
    assert store.samples("math") == 1


def test_purge_per_cluster_and_all(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for cluster in ("math", "math", "code", "chat"):
        store.record(cluster, PROMPT, OUTPUT)
    assert store.purge("math") == 2
    assert {s.cluster for s in store.stats()} == {"code", "chat"}
    assert store.purge() == 2
    assert store.stats() == []
    store.close()
    reopened = CaptureStore(tmp_path)
    assert reopened.stats() == []


def test_purged_token_ids_leave_the_files_whatever_sqlites_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where SQLite is built with secure_delete off (Debian builds it on), a purge left
    the token ids in the file's free pages, and the vacuumed pages sat in the WAL, with
    another connection (the sidecar's) open, until a later checkpoint."""
    import router.capture as capture_module

    opened = capture_module.open_database

    def default_off(*args: Any, **kwargs: Any) -> Any:
        db = opened(*args, **kwargs)
        db.execute("PRAGMA secure_delete=OFF")  # as such a build opens it
        return db

    monkeypatch.setattr(capture_module, "open_database", default_off)
    marker = tuple([123_456_789] * 512)
    store = _store(tmp_path)
    sidecar = CaptureStore(tmp_path, CaptureSettings(enabled=True))  # another connection
    for _ in range(8):
        store.record("math", marker, OUTPUT)
    assert store.purge() == 8
    needle = (123_456_789).to_bytes(4, "little") * 16
    for path in tmp_path.glob("capture.sqlite3*"):  # the sidecar's connection still open
        assert needle not in path.read_bytes(), path
    sidecar.close()
    store.close()


def test_distillation_runs_are_counted_by_outcome(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.record_distillation("math", "refused", 1.5, "did not beat ngram")
    store.record_distillation("math", "registered", 2.0, "math-distilled")
    counts = store.distillation_counts()
    assert counts == {"registered": 1, "refused": 1, "written": 0, "failed": 0}


def test_retention_holds_without_traffic_and_with_capture_turned_off(tmp_path: Path) -> None:
    """Retention ran only inside a new capture, for its cluster: when traffic stopped, or
    capture was turned off (nothing opened the database again), old samples stayed on disk
    for good. The sidecar expires them at start, capture on or off, and at each snapshot."""
    import time

    from router.capture import DATABASE_NAME

    week_ago = time.time() - 7 * 86_400.0
    store = _store(tmp_path, retention_days=1.0)
    store.record("math", PROMPT, OUTPUT)
    store.record("math", PROMPT, OUTPUT, now=week_ago)  # the last capture: kept until...
    assert store.samples("math") == 2
    assert store.expire() == 1 and store.samples("math") == 1
    store.record("code", PROMPT, OUTPUT, now=week_ago)
    store.close()

    assert open_capture(tmp_path, CaptureSettings(enabled=False, retention_days=1.0)) is None
    assert (tmp_path / DATABASE_NAME).is_file()
    reader = CaptureStore(tmp_path)  # a reader's handle: default settings, expires nothing
    assert [(s.cluster, s.samples) for s in reader.stats()] == [("math", 1)]
    reader.close()


def test_retention_holds_when_the_policy_snapshot_fails(tmp_path: Path) -> None:
    """The periodic snapshot expired old samples only after the policy was saved: on a
    full disk every save failed, and captured prompts stayed past retention_days."""
    import time
    from types import SimpleNamespace

    from router.metrics import create_metrics
    from router.service import RouterService

    store = _store(tmp_path, retention_days=1.0)
    store.record("math", PROMPT, OUTPUT, now=time.time() - 7 * 86_400.0)

    def full_disk() -> None:
        raise OSError(28, "No space left on device")

    service = RouterService.__new__(RouterService)
    service.policy = SimpleNamespace(snapshot=full_disk)  # type: ignore[assignment]
    service.metrics = create_metrics()
    service.capture = store
    try:
        with pytest.raises(OSError):
            service.snapshot()
        assert store.samples("math") == 0
    finally:
        store.close()


def test_a_damaged_leftover_database_does_not_stop_a_sidecar_with_capture_off(
    tmp_path: Path,
) -> None:
    from router.capture import DATABASE_NAME

    (tmp_path / DATABASE_NAME).write_bytes(b"not a database" * 100)
    assert open_capture(tmp_path, CaptureSettings(enabled=False)) is None


def test_a_target_too_large_to_run_here_gives_hard_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Distillation ran the target in fp32 on the CPU for its soft labels whatever its
    size: a Qwen2.5-7B target took ~28 GB and never finished. Past the bound it is left
    out (hard labels), said on stderr."""
    import router.capture_cli as capture_cli
    from router.settings import Settings

    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"\0" * 4096)
    settings = Settings(target_dir=target)
    assert capture_cli._local_target(settings) == target
    monkeypatch.setattr(capture_cli, "SOFT_LABEL_TARGET_MAX_BYTES", 1024)
    assert capture_cli._local_target(settings) is None
    assert "too large to run here in fp32: distilling on hard labels" in capsys.readouterr().err


class _FailingWrites:
    """The store's connection where a write fails as on a full disk: ``auto_rollback``,
    SQLite has rolled the transaction back by itself (as it may for SQLITE_FULL);
    otherwise the COMMIT fails and the transaction stays open (as for SQLITE_BUSY)."""

    def __init__(self, db: sqlite3.Connection, auto_rollback: bool) -> None:
        self.db, self.auto_rollback = db, auto_rollback

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction

    def execute(self, sql: str, *parameters: Any) -> sqlite3.Cursor:
        statement = sql.lstrip().upper()
        if self.auto_rollback and statement.startswith("INSERT"):
            self.db.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        if not self.auto_rollback and statement == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *parameters)

    def close(self) -> None:
        self.db.close()


@pytest.mark.parametrize("auto_rollback", [True, False], ids=["rolled-back", "left-open"])
def test_a_write_that_fails_leaves_no_transaction_and_says_why(
    tmp_path: Path, auto_rollback: bool
) -> None:
    """A capture whose write failed either raised "no transaction is active" from its own
    ROLLBACK, hiding the full disk, or left the transaction open, so that every later
    capture failed ("within a transaction") after the disk had room again."""
    store = _store(tmp_path)
    real = store._db
    store._db = _FailingWrites(real, auto_rollback)  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        store.record("math", PROMPT, OUTPUT)
    assert not real.in_transaction
    store._db = real  # room again
    assert store.record("math", PROMPT, OUTPUT)
    assert [s.samples for s in store.stats()] == [1]


def test_the_capture_database_is_stamped_and_a_newer_one_refused(tmp_path: Path) -> None:
    """As the state database (test_durability.py): a capture database a later specroute
    wrote is refused (capture on) rather than half-read."""
    from router.capture import DATABASE_NAME, SCHEMA_VERSION
    from router.store import StateStoreError

    _store(tmp_path).close()
    with sqlite3.connect(tmp_path / DATABASE_NAME) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StateStoreError, match="written by a newer specroute"):
        _store(tmp_path)
