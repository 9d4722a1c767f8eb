"""Opt-in capture of served traffic: each captured request's prompt ids and the target's
verified output ids, per task cluster, for distilling drafters from it (docs/capture.md).

Off by default (``[capture] enabled = false``): nothing is stored unless an operator turns
it on. The sidecar calls :meth:`CaptureStore.record` at the end of each Generate; anything
else that has a verified output (a serving engine that generates elsewhere) calls the
same method. It knows nothing of the engine: a cluster name and two lists of token ids.

Storage is ``<state_dir>/capture.sqlite3``, SQLite in WAL mode (``router.store``'s
connection helper) with ``synchronous=NORMAL``: a capture committed before the process is
killed (SIGKILL included) is there after a restart, without an fsync on the request path.
Each record enforces the caps in the same transaction: samples older than the retention
go, then the oldest of its cluster beyond ``samples_per_cluster``, then the oldest overall
while the stored ids exceed ``max_bytes``.
"""

from __future__ import annotations

import difflib
import logging
import sqlite3
import threading
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from router.store import StateStoreError, open_database

#: The most threads a setting may ask for (torch's intra-op threads, generation workers,
#: the distillation child's cores): torch crashed the process (a segmentation fault) on
#: its first operation at 100,000.
MAX_THREADS = 1024

logger = logging.getLogger(__name__)

DATABASE_NAME = "capture.sqlite3"
SECONDS_PER_DAY = 86_400.0
# Token ids are stored as native 32-bit ints (Qwen2.5's 151,936 ids fit).
ID_TYPECODE = "i"

SCHEMA = """
CREATE TABLE IF NOT EXISTS captured (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL,
    prompt_ids BLOB NOT NULL,
    output_ids BLOB NOT NULL,
    bytes INTEGER NOT NULL,
    created_unix REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS captured_by_cluster ON captured (cluster, id);
CREATE INDEX IF NOT EXISTS captured_by_time ON captured (created_unix);
-- Covers stats() and the byte total: without it both read every row's pages, token-id
-- blobs included (25-45 ms per insert and per scrape at the default 64 MiB).
CREATE INDEX IF NOT EXISTS captured_sizes ON captured (cluster, created_unix, bytes);
-- Per cluster, the newest sample when its last automatic distillation began (so that a
-- restart does not distil the same samples again).
CREATE TABLE IF NOT EXISTS auto_distill_marks (
    cluster TEXT PRIMARY KEY,
    newest_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS distillation_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    seconds REAL NOT NULL,
    created_unix REAL NOT NULL
);
"""

# The layout SCHEMA writes, stamped in the file (``router.store.open_database``).
SCHEMA_VERSION = 1

# What became of a distillation run (specroute_distillation_runs_total{outcome}).
DISTILLATION_OUTCOMES = ("registered", "refused", "written", "failed")


class CaptureSettings(BaseModel):
    """``[capture]``: which clusters' traffic to keep for distillation, and how much."""

    model_config = ConfigDict(extra="forbid")

    # Off unless enabled: captured prompts are user data.
    enabled: bool = False
    # Task clusters to capture; empty captures every cluster.
    clusters: list[str] = Field(default_factory=list)
    # Samples kept per cluster (the newest; the oldest are evicted first).
    samples_per_cluster: int = Field(default=2000, gt=0)
    # Bytes of stored token ids, all clusters together (4 per id; the oldest evicted first).
    max_bytes: int = Field(default=64 << 20, gt=0)
    # Samples older than this are deleted.
    retention_days: float = Field(default=30.0, gt=0)

    def captures(self, cluster: str) -> bool:
        """Whether a request of ``cluster`` is captured."""
        return self.enabled and (not self.clusters or cluster in self.clusters)


class AutoDistillSettings(BaseModel):
    """``[auto_distill]``: when and how the sidecar distils drafters by itself."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False  # needs [capture] on and an admin_token
    # Captured samples a cluster needs, and new ones needed before it is distilled again.
    min_samples: int = Field(default=200, ge=2)
    interval_s: float = Field(default=60.0, gt=0)  # how often to look for a cluster
    steps: int = Field(default=100, ge=1)
    # CPU cores (and torch threads) of the child.
    cores: int = Field(default=1, ge=1, le=MAX_THREADS)
    nice: int = Field(default=10, ge=0, le=19)
    out_dir: Path | None = None  # None: <state_dir>/distilled; always a model root
    from_drafter: str = ""  # empty: the cluster's current model arm, else generic
    # Automatic drafters kept per cluster: once a run registers one, the cluster's older
    # ones past this many are removed (through the admin API) and their directories, which
    # hold captured prompts, deleted. Without it every run that paid added a drafter for
    # good: memory, each Route's choice, and prompts kept past capture's retention.
    keep_per_cluster: int = Field(default=1, ge=1)


@dataclass(frozen=True)
class CapturedPair:
    """One captured request: its prompt ids and the target's verified output ids."""

    cluster: str
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    created_unix: float


@dataclass(frozen=True)
class ClusterCapture:
    """What is stored for one cluster."""

    cluster: str
    samples: int
    bytes: int
    oldest_unix: float
    newest_unix: float


def _packed(ids: Sequence[int]) -> bytes:
    return array(ID_TYPECODE, ids).tobytes()


def _unpacked(blob: bytes) -> tuple[int, ...]:
    ids = array(ID_TYPECODE)
    ids.frombytes(blob)
    return tuple(ids)


class CaptureStore:
    """The capture database of a state directory; thread-safe (one connection, one lock).

    Opening it creates the file. Readers (``specroute capture stats``, distillation) and
    the serving sidecar may have it open at once (WAL).
    """

    def __init__(self, state_dir: Path, settings: CaptureSettings | None = None) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / DATABASE_NAME
        self.settings = settings or CaptureSettings()
        self._lock = threading.Lock()
        self._db = open_database(self.path, SCHEMA, synchronous="NORMAL", version=SCHEMA_VERSION)
        # Deleted samples are overwritten, not only unlinked: SQLite builds differ in the
        # default, and where it is off a purge left the token ids in the file's free pages.
        self._db.execute("PRAGMA secure_delete=ON")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- capture ----------------------------------------------------------------------
    def record(
        self,
        cluster: str,
        prompt_ids: Sequence[int],
        output_ids: Sequence[int],
        *,
        now: float | None = None,
    ) -> bool:
        """Store one served request if the settings capture ``cluster``; True if stored.

        A request with no output, or larger alone than ``max_bytes``, is not stored.
        """
        settings = self.settings
        if not settings.captures(cluster) or not prompt_ids or not output_ids:
            return False
        prompt, output = _packed(prompt_ids), _packed(output_ids)
        size = len(prompt) + len(output)
        if size > settings.max_bytes:
            return False
        created = time.time() if now is None else now
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT INTO captured (cluster, prompt_ids, output_ids, bytes, created_unix)"
                " VALUES (?, ?, ?, ?, ?)",
                (cluster, prompt, output, size, created),
            )
            self._evict(cluster, created)
        return True

    def expire(self, now: float | None = None) -> int:
        """Delete the samples older than ``retention_days``; how many. The sidecar calls it
        at start (capture on or off) and at every policy snapshot, besides each capture:
        when traffic stopped, or capture was turned off, old samples stayed for good."""
        with self._lock, self._transaction():
            return self._expired(time.time() if now is None else now)

    def _expired(self, now: float) -> int:
        cutoff = now - self.settings.retention_days * SECONDS_PER_DAY
        return int(
            self._db.execute("DELETE FROM captured WHERE created_unix < ?", (cutoff,)).rowcount
        )

    def _evict(self, cluster: str, now: float) -> None:
        """Retention, then the cluster's sample cap, then the byte cap (oldest first)."""
        settings = self.settings
        self._expired(now)
        self._db.execute(
            "DELETE FROM captured WHERE cluster = ? AND id NOT IN (SELECT id FROM captured"
            " WHERE cluster = ? ORDER BY id DESC LIMIT ?)",
            (cluster, cluster, settings.samples_per_cluster),
        )
        # Keep the newest rows whose running total of bytes stays within the cap (the
        # total first, from the covering index: the running total reads every row).
        total = self._db.execute("SELECT SUM(bytes) FROM captured").fetchone()[0] or 0
        if total <= settings.max_bytes:
            return
        self._db.execute(
            "DELETE FROM captured WHERE id IN (SELECT id FROM (SELECT id, SUM(bytes) OVER"
            " (ORDER BY id DESC) AS running FROM captured) WHERE running > ?)",
            (settings.max_bytes,),
        )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    # -- reading ----------------------------------------------------------------------
    def stats(self) -> list[ClusterCapture]:
        """Per cluster: samples, bytes, oldest and newest capture time; by cluster name."""
        with self._lock:
            rows = self._db.execute(
                "SELECT cluster, COUNT(*) AS samples, SUM(bytes) AS bytes,"
                " MIN(created_unix) AS oldest, MAX(created_unix) AS newest"
                " FROM captured GROUP BY cluster ORDER BY cluster"
            ).fetchall()
        return [
            ClusterCapture(
                row["cluster"],
                int(row["samples"]),
                int(row["bytes"]),
                float(row["oldest"]),
                float(row["newest"]),
            )
            for row in rows
        ]

    def samples(self, cluster: str) -> int:
        return self.samples_since(cluster, 0)

    def samples_since(self, cluster: str, after_id: int) -> int:
        """The cluster's samples captured after the one numbered ``after_id`` and still
        kept: unlike a difference of counts, it grows while the kept count stays at
        ``samples_per_cluster``."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM captured WHERE cluster = ? AND id > ?", (cluster, after_id)
            ).fetchone()
        return int(row[0])

    def newest_id(self) -> int:
        """The number of the newest sample captured (0: none); numbers only grow."""
        with self._lock:
            row = self._db.execute("SELECT MAX(id) FROM captured").fetchone()
        return int(row[0] or 0)

    def pairs(self, cluster: str, limit: int | None = None) -> list[CapturedPair]:
        """The cluster's captured pairs, oldest first (the newest ``limit`` when given)."""
        query = (
            "SELECT * FROM (SELECT cluster, prompt_ids, output_ids, created_unix, id FROM"
            " captured WHERE cluster = ? ORDER BY id DESC LIMIT ?) ORDER BY id"
        )
        with self._lock:
            rows = self._db.execute(query, (cluster, -1 if limit is None else limit)).fetchall()
        return [
            CapturedPair(
                row["cluster"],
                _unpacked(row["prompt_ids"]),
                _unpacked(row["output_ids"]),
                float(row["created_unix"]),
            )
            for row in rows
        ]

    def purge(self, cluster: str | None = None) -> int:
        """Delete the captured samples of ``cluster`` (every cluster when None); how many."""
        with self._lock:
            if cluster is None:
                cursor = self._db.execute("DELETE FROM captured")
            else:
                cursor = self._db.execute("DELETE FROM captured WHERE cluster = ?", (cluster,))
            # Give the freed pages back, so purged user data leaves the file too; the
            # vacuumed pages are in the WAL until a checkpoint moves them into the file.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return int(cursor.rowcount)

    # -- distillation runs ------------------------------------------------------------
    def record_distillation(self, cluster: str, outcome: str, seconds: float, detail: str) -> None:
        """Remember one distillation run (``specroute_distillation_runs_total``)."""
        if outcome not in DISTILLATION_OUTCOMES:
            raise ValueError(f"outcome must be one of {DISTILLATION_OUTCOMES}, got {outcome!r}")
        with self._lock:
            self._db.execute(
                "INSERT INTO distillation_runs (cluster, outcome, detail, seconds, created_unix)"
                " VALUES (?, ?, ?, ?, ?)",
                (cluster, outcome, detail, float(seconds), time.time()),
            )

    def mark_auto_run(self, cluster: str, newest_id: int) -> None:
        """Remember that an automatic run of ``cluster`` began at sample ``newest_id``."""
        with self._lock:
            self._db.execute(
                "INSERT INTO auto_distill_marks (cluster, newest_id) VALUES (?, ?)"
                " ON CONFLICT (cluster) DO UPDATE SET newest_id = excluded.newest_id",
                (cluster, int(newest_id)),
            )

    def auto_run_marks(self) -> dict[str, int]:
        """Per cluster, the newest sample when its last automatic run began."""
        with self._lock:
            rows = self._db.execute("SELECT cluster, newest_id FROM auto_distill_marks")
            return {str(cluster): int(newest) for cluster, newest in rows.fetchall()}

    def distillation_counts(self) -> dict[str, int]:
        """Distillation runs by outcome (every outcome, 0 included)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT outcome, COUNT(*) FROM distillation_runs GROUP BY outcome"
            ).fetchall()
        counts = dict.fromkeys(DISTILLATION_OUTCOMES, 0)
        counts.update({str(outcome): int(count) for outcome, count in rows})
        return counts


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        # A write or COMMIT that fails for a full disk (or I/O) may have rolled the
        # transaction back already, or left it open (SQLite's advice: ROLLBACK anyway):
        # the ROLLBACK runs only while one is open, so it neither masks the first error
        # nor leaves a transaction that every later BEGIN would trip over.
        if error is None:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._rollback()
                raise
        else:
            self._rollback()

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")


def open_capture(state_dir: Path, settings: CaptureSettings) -> CaptureStore | None:
    """The sidecar's capture store when capture is enabled; None (no file) otherwise. Either
    way, samples a database there holds past ``retention_days`` are deleted."""
    directory = Path(state_dir).expanduser()
    if not settings.enabled:
        if (directory / DATABASE_NAME).is_file():  # captured before capture was turned off
            try:
                leftover = CaptureStore(directory, settings)
            except StateStoreError as error:  # damaged or read-only: capture is off anyway
                logger.warning("capture off; the database left from before: %s", error)
                return None
            try:
                _log_expired(leftover.expire())
            except sqlite3.Error as error:
                logger.warning("capture off; cannot expire old samples: %s", error)
            finally:
                leftover.close()
        return None
    store = CaptureStore(directory, settings)
    _log_expired(store.expire())
    logger.info(
        "capture on: clusters %s, %d samples per cluster, %d bytes, %g days",
        settings.clusters or "all",
        settings.samples_per_cluster,
        settings.max_bytes,
        settings.retention_days,
    )
    return store


def unknown_capture_clusters(clusters: Sequence[str], labels: Sequence[str]) -> str | None:
    """The warning for ``[capture] clusters`` the classifier does not have (their traffic
    is never captured; a typo, "Chat" for "chat", said nothing), or None."""
    unknown = [cluster for cluster in clusters if cluster not in labels]
    if not unknown:
        return None
    guesses = {c: difflib.get_close_matches(c.lower(), labels, n=1) for c in unknown}
    named = ", ".join(
        f"{c!r} (did you mean {guesses[c][0]!r}?)" if guesses[c] else repr(c) for c in unknown
    )
    return (
        f"capture.clusters names {named}, not a cluster of the classifier, so nothing of it "
        f"is captured; its clusters: {', '.join(labels)}"
    )


def _log_expired(count: int) -> None:
    if count:
        logger.info("capture: deleted %d samples past their retention", count)
