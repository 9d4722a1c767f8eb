"""Durable sidecar state: registered drafters and policy snapshots, SQLite in WAL mode.

Every write commits before it returns (``synchronous=FULL``), so a drafter registered
just before the process is killed is present after a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from router.errors import (
    AlreadyExistsError,
    NotFoundError,
    StorageFailedError,
    StorageFullError,
    StorageLockedError,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS drafters (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    path TEXT NOT NULL DEFAULT '',
    tasks TEXT NOT NULL DEFAULT '[]',
    finetune_sample TEXT NOT NULL DEFAULT '[]',
    options TEXT NOT NULL DEFAULT '{}',
    parameter_count INTEGER NOT NULL DEFAULT 0,
    weights_digest TEXT NOT NULL DEFAULT '',
    created_unix REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS policy_snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    policy TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_unix REAL NOT NULL
);
"""

DATABASE_NAME = "sidecar.sqlite3"
# The layout SCHEMA writes, stamped in the file (PRAGMA user_version): a file stamped with a
# later one was written by a newer specroute and is refused, not half-read; raise it (and
# upgrade older files in ``open_database``) whenever the layout changes.
SCHEMA_VERSION = 1
LOCK_NAME = "sidecar.lock"
SNAPSHOTS_KEPT = 20


@dataclass(frozen=True)
class DrafterRecord:
    """One registered drafter, as stored."""

    name: str
    kind: str
    path: str = ""
    tasks: tuple[str, ...] = ()
    finetune_sample: tuple[str, ...] = ()
    options: Mapping[str, str] = field(default_factory=dict)
    parameter_count: int = 0
    weights_digest: str = ""
    created_unix: float = 0.0
    builtin: bool = False

    @property
    def identity(self) -> str:
        """What makes two registrations of one name the same drafter, as a short hash:
        its kind, weights and options (not its path, tasks or time). Pooled outcomes
        carry it, so that what was learnt of a drafter never lands on another one
        registered later under its name."""
        identity = {"kind": self.kind, "weights": self.weights_digest, "options": self.options}
        blob = json.dumps(identity, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class PolicySnapshot:
    """A saved policy state."""

    policy: str
    version: int
    state: dict[str, Any]
    created_unix: float


def _record_from_row(row: sqlite3.Row) -> DrafterRecord:
    return DrafterRecord(
        name=row["name"],
        kind=row["kind"],
        path=row["path"],
        tasks=tuple(json.loads(row["tasks"])),
        finetune_sample=tuple(json.loads(row["finetune_sample"])),
        options=dict(json.loads(row["options"])),
        parameter_count=int(row["parameter_count"]),
        weights_digest=row["weights_digest"],
        created_unix=float(row["created_unix"]),
    )


class StateStoreError(RuntimeError):
    """The state directory or one of its databases cannot be used (not a directory, not
    writable, a file that is not a SQLite database): the sidecar does not start, and
    nothing in the directory is changed."""


def open_database(
    path: Path,
    schema: str,
    synchronous: Literal["FULL", "NORMAL"] = "FULL",
    version: int = SCHEMA_VERSION,
) -> sqlite3.Connection:
    """A connection to the SQLite file at ``path`` in WAL mode, autocommit (each statement
    outside an explicit transaction commits at once), usable from any thread under the
    caller's lock, with ``schema`` applied and its ``version`` stamped. In WAL mode a
    committed transaction survives the process being killed with either ``synchronous``
    level; FULL also survives a power loss, at one fsync per commit. ``StateStoreError``
    when the file cannot be opened as a database, its pages are damaged (``PRAGMA
    quick_check``), or it was written by a newer specroute (a later version stamped); it
    is left as it is."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    except (OSError, sqlite3.Error) as error:
        raise StateStoreError(f"cannot open the state database {path}: {error}") from None
    try:
        db.row_factory = sqlite3.Row
        found = int(db.execute("PRAGMA user_version").fetchone()[0])
        if found > version:
            db.close()
            raise StateStoreError(
                f"the state database {path} was written by a newer specroute (its schema "
                f"version is {found}; this one reads {version} and older): run that version, "
                "or move the file aside to start afresh; it is left as it is"
            )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.executescript(schema)
        if found < version:  # new, or written before versions were stamped
            db.execute(f"PRAGMA user_version={int(version)}")
        damage = [str(row[0]) for row in db.execute("PRAGMA quick_check")]
    except sqlite3.Error as error:
        db.close()
        free = _free_bytes(path.parent)
        if free is not None and free < FULL_DISK_BYTES:  # not damage: no room for the WAL
            raise StateStoreError(
                f"cannot use the state database {path}: {error}: the disk holding it has "
                f"{free} bytes free; free some space and start again (the database is "
                "left as it is)"
            ) from None
        message = f"cannot use the state database {path}: {error}{LEFT_AS_IS}"
        raise StateStoreError(message) from None
    if damage != ["ok"]:
        # Pages past the schema are read only by the first query that needs them: a
        # damaged file would start, then fail the first Register, Report or snapshot.
        db.close()
        raise StateStoreError(
            f"the state database {path} is damaged ({_one_line(damage)}){LEFT_AS_IS}"
        )
    return db


def registered_names(state_dir: Path) -> list[str]:
    """The names of the drafters registered in ``state_dir``'s database, read without
    taking the directory's lock or writing anything (a running sidecar may hold it):
    what a fleet file may name besides the drafters of the settings. Empty when there is
    no database yet; ``StateStoreError`` when it cannot be read."""
    path = state_dir / DATABASE_NAME
    if not path.is_file():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            return [str(row[0]) for row in db.execute("SELECT name FROM drafters")]
    except sqlite3.Error as error:
        raise StateStoreError(f"cannot read the state database {path}: {error}") from None


def _one_line(damage: list[str]) -> str:
    """``PRAGMA quick_check``'s first problems on one line, without its headings."""
    lines = [line.strip() for row in damage for line in row.splitlines()]
    return "; ".join([line for line in lines if line and not line.startswith("***")][:3])


# SQLite's error names (extended ones start with them) for a store that cannot be written.
UNWRITABLE = ("SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN")

# Opening a database in WAL mode writes its shared-memory index (32 KiB) and log: with
# less free space than this, a failure to open it is the disk's, not the file's.
FULL_DISK_BYTES = 1 << 20


def _free_bytes(directory: Path) -> int | None:
    """Bytes free to this process on ``directory``'s filesystem (None: unknown)."""
    try:
        stats = os.statvfs(directory)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


LEFT_AS_IS = (
    "; it is left as it is (move it aside, or restore it from a backup, to start; "
    "sqlite3's .recover may save its rows)"
)


def lock_state_dir(state_dir: Path) -> int:
    """Take ``state_dir`` for this process: an exclusive ``flock`` on its ``sidecar.lock``,
    held until the returned descriptor is closed or the process ends (a SIGKILL included:
    the kernel lets it go, so a crash leaves no stale lock). ``StateStoreError`` naming the
    holder's pid when another sidecar has it: two sidecars on one directory would each
    overwrite the other's policy snapshots, and the learning of one would be lost."""
    path = state_dir / LOCK_NAME
    if state_dir.exists() and not state_dir.is_dir():  # said as "[Errno 17] File exists"
        raise StateStoreError(f"the state directory {state_dir} is a file, not a directory")
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise StateStoreError(f"cannot lock the state directory {state_dir}: {error}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(descriptor)
        raise StateStoreError(
            f"the state directory {state_dir} is in use by another sidecar (pid {holder}): "
            "give each sidecar its own state_dir (replicas pool what they learn through "
            "Redis, not through a shared directory)"
        ) from None
    except OSError as error:  # a file system without locks (some network mounts)
        os.close(descriptor)
        raise StateStoreError(f"cannot lock the state directory {state_dir}: {error}") from None
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError as error:
        os.close(descriptor)
        raise StateStoreError(f"cannot write {path}: {error}") from None
    return descriptor


class SidecarStore:
    """The state directory's SQLite database; thread-safe (one connection, one lock).
    ``exclusive``: the serving sidecar's store, which holds the directory's lock
    (:func:`lock_state_dir`) until it is closed; readers (tools, tests) take none."""

    def __init__(self, state_dir: Path, *, exclusive: bool = False) -> None:
        self.path = state_dir / DATABASE_NAME
        self._lock = threading.Lock()
        self._held = lock_state_dir(state_dir) if exclusive else None
        try:
            self._db = open_database(self.path, SCHEMA)
        except StateStoreError:
            self._release()
            raise
        # A removed drafter's fine-tuning sample (prompts, a distilled drafter's captured
        # ones) is overwritten, not only unlinked (SQLite builds differ in the default).
        self._db.execute("PRAGMA secure_delete=ON")

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._release()

    def _release(self) -> None:
        if self._held is not None:
            os.close(self._held)  # closing the descriptor lets the flock go
            self._held = None

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[sqlite3.Connection]:
        """The connection under the lock, for one write that commits or changes nothing;
        a full disk is ``StorageFullError``, the database locked by another process past
        SQLite's wait ``StorageLockedError``, one that cannot be written at all
        ``StorageFailedError``."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.OperationalError as error:
                code = getattr(error, "sqlite_errorname", "")
                if code == "SQLITE_FULL":
                    raise StorageFullError(
                        f"the state store {self.path} is full ({error}): {what} was not saved"
                    ) from error
                if code in ("SQLITE_BUSY", "SQLITE_LOCKED"):
                    raise StorageLockedError(
                        f"the state store {self.path} is locked by another process ({error}):"
                        f" {what} was not saved; retry once it is free"
                    ) from error
                if code.startswith(UNWRITABLE):
                    raise StorageFailedError(
                        f"the state store {self.path} cannot be written ({error}): {what} "
                        "was not saved; its disk or permissions need an operator"
                    ) from error
                raise

    # -- drafters ---------------------------------------------------------------------
    def add_drafter(self, record: DrafterRecord) -> DrafterRecord:
        """Insert ``record``; ALREADY_EXISTS when the name is taken."""
        stored = record if record.created_unix else _with_time(record)
        try:
            with self._writing(f"drafter {record.name!r}") as db:
                db.execute(
                    "INSERT INTO drafters (name, kind, path, tasks, finetune_sample, options,"
                    " parameter_count, weights_digest, created_unix)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        stored.name,
                        stored.kind,
                        stored.path,
                        json.dumps(list(stored.tasks)),
                        json.dumps(list(stored.finetune_sample)),
                        json.dumps(dict(stored.options)),
                        stored.parameter_count,
                        stored.weights_digest,
                        stored.created_unix,
                    ),
                )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExistsError(f"a drafter named {record.name!r} already exists") from exc
        return stored

    def remove_drafter(self, name: str) -> DrafterRecord:
        """Delete and return the named drafter; NOT_FOUND when absent."""
        with self._writing(f"the removal of drafter {name!r}") as db:
            row = db.execute("SELECT * FROM drafters WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFoundError(f"no registered drafter named {name!r}")
            db.execute("DELETE FROM drafters WHERE name = ?", (name,))
            # The log keeps earlier copies of the row's pages until a checkpoint empties it.
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return _record_from_row(row)

    def drafters(self) -> list[DrafterRecord]:
        """Registered drafters, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM drafters ORDER BY created_unix, name").fetchall()
        return [_record_from_row(row) for row in rows]

    # -- policy snapshots -------------------------------------------------------------
    def save_policy(
        self,
        policy: str,
        version: int,
        state: Mapping[str, Any],
        read_unix: float | None = None,
    ) -> PolicySnapshot:
        """Store a policy snapshot (JSON) and prune old ones; ``read_unix``: when the state
        was read (its ``created_unix``; default now)."""
        created = time.time() if read_unix is None else read_unix
        snapshot = PolicySnapshot(policy, int(version), dict(state), created)
        text = json.dumps(snapshot.state, sort_keys=True)
        with self._writing(f"a snapshot of policy {policy!r}") as db:
            db.execute(
                "INSERT INTO policy_snapshots (policy, version, state, created_unix)"
                " VALUES (?, ?, ?, ?)",
                (policy, snapshot.version, text, snapshot.created_unix),
            )
            db.execute(
                "DELETE FROM policy_snapshots WHERE policy = ? AND id NOT IN (SELECT id FROM"
                " policy_snapshots WHERE policy = ? ORDER BY id DESC LIMIT ?)",
                (policy, policy, SNAPSHOTS_KEPT),
            )
        return snapshot

    def latest_policy(self, policy: str) -> PolicySnapshot | None:
        """The most recent snapshot of ``policy``, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM policy_snapshots WHERE policy = ? ORDER BY id DESC LIMIT 1",
                (policy,),
            ).fetchone()
        if row is None:
            return None
        return PolicySnapshot(
            policy=row["policy"],
            version=int(row["version"]),
            state=json.loads(row["state"]),
            created_unix=float(row["created_unix"]),
        )


def _with_time(record: DrafterRecord) -> DrafterRecord:
    from dataclasses import replace

    return replace(record, created_unix=time.time())


def names(records: Sequence[DrafterRecord]) -> list[str]:
    """The names of ``records``, in order."""
    return [record.name for record in records]
