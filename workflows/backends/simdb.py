"""The simulated cluster's file: an SQLite database that several processes share.

Tables: one `world` row (a format marker, the schema version, speed, the simulated clock and how
many finished jobs each cluster keeps), `clusters` (each with a version, bumped with every change
to its rows: see `simrows`), `hosts` (with the reboot job of each host's current maintenance
window, and its own patch and reboot times when it has them), `vms`, `jobs` (open ones whole;
finished ones compact: status, progress, message, details), `faults` (in firing order) and
`counts` (per cluster and key).

A call is one transaction. `Handle.transaction()` takes an exclusive `flock` on `<file>.lock`
(a descriptor each process keeps open), so that waiting processes sleep in the kernel rather
than in SQLite's busy loop, then `BEGIN IMMEDIATE`. `simrows.Rows` loads what the call needs,
one cluster at a time, and `flush()` writes back only the rows that changed: a call about one
cluster reads and writes that cluster's rows (plus the clock, the counts it adds and, when they
change, the faults), never the others'.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sqlite3
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine import errors
from workflows.backends import simfaults, simkept, simrows

JSON = dict[str, Any]

FORMAT = "nodepatch-simulated-cluster"
SCHEMA_VERSION = 3  # 2: hosts.patch_s and hosts.reboot_s; 3: clusters.version
JOB_HISTORY = 1000  # finished jobs kept per cluster (besides each host's maintenance reboot)
_BUSY_TIMEOUT_S = 60.0
_HEADER = b"SQLite format 3\x00"
_TABLES = frozenset({"world", "clusters", "hosts", "vms", "jobs", "faults", "counts"})

SCHEMA = """
CREATE TABLE world (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    format TEXT NOT NULL,
    schema INTEGER NOT NULL,
    speed REAL NOT NULL,
    sim_time REAL NOT NULL,
    real_time REAL NOT NULL,
    job_history INTEGER NOT NULL
);
CREATE TABLE clusters (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE hosts (
    seq INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    cluster INTEGER NOT NULL,
    name TEXT NOT NULL,
    memory_mb INTEGER NOT NULL,
    maintenance INTEGER NOT NULL,
    state TEXT NOT NULL,
    window_reboot TEXT,
    patch_s REAL,
    reboot_s REAL
);
CREATE INDEX hosts_by_cluster ON hosts (cluster, seq);
CREATE TABLE vms (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    cluster INTEGER NOT NULL,
    name TEXT NOT NULL,
    host TEXT NOT NULL,
    ha INTEGER NOT NULL,
    state TEXT NOT NULL,
    memory_mb INTEGER NOT NULL
);
CREATE INDEX vms_by_cluster ON vms (cluster, seq);
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    cluster INTEGER NOT NULL,
    target TEXT NOT NULL,
    open INTEGER NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX jobs_by_cluster ON jobs (cluster, open, seq);
CREATE INDEX open_jobs ON jobs (target, cluster) WHERE open = 1;
CREATE TABLE faults (seq INTEGER PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE counts (
    key TEXT NOT NULL,
    cluster INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (key, cluster)
) WITHOUT ROWID;
"""


# -- checking a file ----------------------------------------------------------------------------


def check(path: Path) -> None:
    """The file is a simulated cluster, or UsageError naming it and what is wrong."""
    try:
        with path.open("rb") as f:
            header = f.read(len(_HEADER))
    except FileNotFoundError:
        raise errors.UsageError(
            f"no simulated cluster at {path}; create one with `nodepatch sim init --file {path}`"
        ) from None
    except OSError as exc:
        raise errors.UsageError(
            f"cannot read simulated cluster file {path}: {exc.strerror}"
        ) from None
    if header != _HEADER:
        _check_json(path)
    try:
        problem = _database_problem(path)
    except sqlite3.OperationalError as exc:
        raise errors.UsageError(f"cannot open simulated cluster file {path}: {exc}") from None
    except sqlite3.Error as exc:
        raise errors.UsageError(f"simulated cluster file {path} is corrupt: {exc}") from None
    if problem:
        raise errors.UsageError(f"simulated cluster file {path} {problem}")


def _check_json(path: Path) -> None:
    """Not a database: say what is wrong with the file as JSON (an earlier nodepatch wrote the
    cluster as one JSON document), always raising UsageError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise errors.UsageError(f"cannot read simulated cluster file {path}: {reason}") from None
    try:
        simfaults.check_state(json.loads(text))
    except json.JSONDecodeError as exc:
        raise errors.UsageError(
            f"simulated cluster file {path} is not a simulator database (and is not valid "
            f"JSON: {exc})"
        ) from None
    except errors.UsageError as exc:
        raise errors.UsageError(f"simulated cluster file {path}: {exc}") from None
    raise errors.UsageError(
        f"simulated cluster file {path} is in the JSON format of an earlier nodepatch; "
        f"make it again with `nodepatch sim init --file {path} --force`"
    )


def _database_problem(path: Path) -> str | None:
    """What keeps an SQLite file from being a simulated cluster, or None."""
    conn = _connect(path)
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if not tables >= _TABLES:
            return "is an SQLite database but not a simulated cluster"
        row = conn.execute("SELECT format, schema FROM world").fetchone()
    finally:
        conn.close()
    if row is None or row[0] != FORMAT:
        return "is an SQLite database but not a simulated cluster"
    if row[1] != SCHEMA_VERSION:
        return (
            f"has simulator schema {row[1]}, this nodepatch reads {SCHEMA_VERSION}; "
            f"make it again with `nodepatch sim init --file {path} --force`"
        )
    return None


def unusable(path: Path, exc: sqlite3.Error) -> errors.BackendError:
    """The error a call reports when the database itself fails it."""
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return errors.BackendError(f"simulated cluster file {path} is busy: {exc}")
    return errors.BackendError(f"corrupt simulated cluster file {path}: {exc}")


# -- connections and transactions ---------------------------------------------------------------


def _connect(path: Path, *, create: bool = False) -> sqlite3.Connection:
    mode = "rwc" if create else "rw"
    conn = sqlite3.connect(
        f"{path.absolute().as_uri()}?mode={mode}",
        uri=True,
        timeout=_BUSY_TIMEOUT_S,
        isolation_level=None,
        check_same_thread=False,
    )
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class Handle:
    """This process's connection to one file, and its descriptor of the lock file: opened at
    the first call, opened again when the file was replaced (another inode) or in a forked
    child, closed by `close()` or with their owner."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")
        self._conn: sqlite3.Connection | None = None
        self.kept: dict[int, simkept.Cached] = {}  # rows of clusters read on this connection
        self._lock_fd = -1
        self._identity: tuple[int, int, int] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def connection(self) -> sqlite3.Connection:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self.close()
            raise errors.BackendError(
                f"no simulated cluster at {self.path}; run `nodepatch sim init`"
            ) from None
        identity = (os.getpid(), stat.st_dev, stat.st_ino)
        if self._conn is None or identity != self._identity:
            if self._identity is not None and self._identity[0] != os.getpid():
                self._forget()  # a forked child never touches its parent's connection or lock
            self.close()
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._conn = _connect(self.path)
            except BaseException:
                os.close(fd)
                raise
            self._lock_fd, self._identity = fd, identity
            self._finalizer = weakref.finalize(self, _close, self._conn, fd)
        return self._conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction under the exclusive lock: the descriptor stays open between calls,
        and the lock is given back explicitly (a forked child's copy of the descriptor would
        keep a lock held that is only released by closing it)."""
        conn = self.connection()
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            with _immediate(conn):
                yield conn
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._forget()

    def _forget(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self._conn, self._lock_fd, self._identity, self._finalizer = None, -1, None, None
        self.kept = {}


def _close(conn: sqlite3.Connection, lock_fd: int) -> None:
    conn.close()
    os.close(lock_fd)


# -- creating a file ----------------------------------------------------------------------------


def create(path: Path, state: JSON, *, now: float, job_history: int = JOB_HISTORY) -> None:
    """Write a fresh world (a `simfaults.build_state` document) to path. A simulated cluster
    already there is rewritten in place, in one transaction, so that processes using it see the
    old world or the new one; anything else is replaced by a file made aside."""
    if job_history < 1:
        raise errors.UsageError(f"job_history must be at least 1, got {job_history}")
    try:
        with _flock(path):
            if _is_current(path):
                conn = _connect(path)
                try:
                    with _immediate(conn):
                        _fill(conn, state, now, job_history, fresh=False)
                finally:
                    conn.close()
            else:
                _replace(path, state, now, job_history)
    except sqlite3.Error as exc:
        raise OSError(errno.EIO, str(exc)) from exc


def _is_current(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            if f.read(len(_HEADER)) != _HEADER:
                return False
        return _database_problem(path) is None
    except (OSError, sqlite3.Error):
        return False


def _replace(path: Path, state: JSON, now: float, job_history: int) -> None:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        conn = _connect(tmp, create=True)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            with _immediate(conn):
                _fill(conn, state, now, job_history, fresh=True)
        finally:
            conn.close()
        for suffix in ("-wal", "-shm"):  # a stale log must never be replayed into the new file
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fill(
    conn: sqlite3.Connection, state: JSON, now: float, job_history: int, *, fresh: bool
) -> None:
    version = 0
    if fresh:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
    else:  # past every version a process may keep rows of
        version = conn.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM clusters").fetchone()[0]
        for table in ("world", "clusters", "hosts", "vms", "jobs", "faults", "counts"):
            conn.execute(f"DELETE FROM {table}")  # noqa: S608 - constant table names
    conn.execute(
        "INSERT INTO world VALUES (1, ?, ?, ?, 0.0, ?, ?)",
        (FORMAT, SCHEMA_VERSION, float(state["speed"]), now, job_history),
    )
    host_cluster: dict[str, int] = {}
    for cid, cluster in enumerate(state["clusters"], start=1):
        conn.execute(
            "INSERT INTO clusters (id, key, name, version) VALUES (?, ?, ?, ?)",
            (cid, cluster["name"].lower(), cluster["name"], version),
        )
        for h in cluster["hosts"]:
            host_cluster[h["name"]] = cid
            conn.execute(
                "INSERT INTO hosts (key, cluster, name, memory_mb, maintenance, state, "
                "patch_s, reboot_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    h["name"].lower(),
                    cid,
                    h["name"],
                    h["memory_mb"],
                    h["maintenance"],
                    h["state"],
                    h.get("patch_seconds"),
                    h.get("reboot_seconds"),
                ),
            )
    conn.executemany(
        "INSERT INTO vms (id, cluster, name, host, ha, state, memory_mb) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (
                v["id"],
                host_cluster[v["host"]],
                v["name"],
                v["host"],
                v["ha"],
                v["state"],
                v["memory_mb"],
            )
            for v in state["vms"]
        ],
    )
    conn.executemany(
        "INSERT INTO faults (doc) VALUES (?)", [(simrows.dump(f),) for f in state["faults"]]
    )
