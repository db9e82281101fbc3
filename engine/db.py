"""Database connections and schema management (alembic is the only way the schema is created).

Alembic is imported only when the schema must change or a mismatch be explained: a database at
this build's head revision is recognised with one SELECT on `alembic_version` against the head
read from the migration files (`head_revision`), so everyday commands never pay for alembic.
"""

from __future__ import annotations

import functools
import re
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event

from engine import errors

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
READ_ONLY = "nodepatch_read_only"
UPGRADE = "nodepatch db upgrade"
IDLE_PING_S = 5.0  # a pooled PostgreSQL connection idle this long is pinged before use
_IDLE_SINCE = "nodepatch_idle_since"


def normalise_url(url: str) -> str:
    """Accept plain postgresql:// URLs and use psycopg 3 for them."""
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def connect(url: str, *, create: bool = False, upgrade_command: str = UPGRADE) -> sa.Engine:
    """An Engine for url: SQLite in WAL mode with a busy timeout and IMMEDIATE transactions.

    A SQLite file that does not exist is created (with its folder) only when `create`;
    otherwise it is DatabaseMissing, naming `upgrade_command`, the command that creates it.
    """
    url = normalise_url(url)
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise errors.DatabaseConfigError(f"invalid database URL {url!r}") from exc
    if parsed.get_backend_name() == "sqlite":
        return _sqlite(parsed, create=create, upgrade_command=upgrade_command)
    if parsed.get_backend_name() != "postgresql":
        raise errors.DatabaseConfigError(f"unsupported database {parsed.get_backend_name()!r}")
    engine = sa.create_engine(parsed, connect_args={"connect_timeout": 5})
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: sa.Engine) -> None:
    """Test a pooled connection before use only when it has sat idle for IDLE_PING_S: a busy
    worker reuses its connections within milliseconds, and a ping on every checkout (SQLAlchemy's
    pool_pre_ping) was a fifth of its time. A connection that fails the ping is replaced (the
    pool retries the checkout); one that died more recently fails its first statement, which
    invalidates the pool, and the store's callers treat that as a lost connection."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is None or time.monotonic() - since < IDLE_PING_S:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # any failure means: use another connection
            raise sa.exc.DisconnectionError(str(exc)) from exc
        if not alive:
            raise sa.exc.DisconnectionError("the connection failed its ping")


def _sqlite(url: sa.URL, *, create: bool, upgrade_command: str) -> sa.Engine:
    if url.database and url.database != ":memory:":
        path = Path(url.database).expanduser()
        if create:
            _make_folder(path)
        elif not path.exists():
            raise errors.DatabaseMissing(
                f"no database at {path}: create it with `{upgrade_command}`"
            )
        url = url.set(database=str(path))
    engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # Writers take the write lock up front, so a read-then-write transaction can never
        # deadlock on a lock upgrade; read-only transactions don't block writers at all.
        # Sent on the driver's connection: SQLAlchemy's statement machinery (events, result
        # objects) costs more than SQLite spends on a BEGIN.
        begin = "BEGIN" if conn.get_execution_options().get(READ_ONLY, False) else "BEGIN IMMEDIATE"
        try:
            conn.connection.driver_connection.execute(begin)  # type: ignore[union-attr]
        except sqlite3.Error as exc:  # as SQLAlchemy would raise it ("database is locked")
            raise sa.exc.OperationalError(begin, None, exc) from exc

    return engine


def _make_folder(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "a file is in the way" if isinstance(exc, FileExistsError) else exc.strerror
        raise errors.DatabaseConfigError(
            f"database {path}: cannot create folder {path.parent}: {reason}"
        ) from exc


def alembic_config(engine: sa.Engine) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


_REVISION = re.compile(r"^(down_revision|revision)\s*=\s*(?:\"([^\"]*)\"|'([^']*)'|None)\s*$", re.M)


@functools.cache
def head_revision() -> str:
    """This build's newest schema revision: the one migration no other revises, read from the
    migration files (alembic's own answer when they do not make one plain chain)."""
    revised: set[str] = set()
    revisions: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        found = {m[1]: m[2] or m[3] for m in _REVISION.finditer(path.read_text("utf-8"))}
        if "revision" not in found:
            return _alembic_head()
        revisions.add(found["revision"])
        if found.get("down_revision"):
            revised.add(found["down_revision"])
    heads = revisions - revised
    return heads.pop() if len(heads) == 1 else _alembic_head()


def _alembic_head() -> str:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(sa.create_engine("sqlite://")))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(engine: sa.Engine) -> str | None:
    """The database's schema revision (None: no nodepatch schema), read with one SELECT."""
    with _reachable(engine) as raw:
        conn = raw.execution_options(**{READ_ONLY: True})
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        rows = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(rows) > 1:  # several heads: alembic says what is wrong
        from alembic.runtime.migration import MigrationContext

        with _reachable(engine) as conn:
            return MigrationContext.configure(conn).get_current_revision()
    return str(rows[0]) if rows else None


def upgrade(engine: sa.Engine, revision: str = "head") -> str | None:
    """Migrate to revision; returns the revision the database was at (None: no schema)."""
    before = current_revision(engine)
    if before is not None and before not in _known_revisions(engine):
        raise _too_new(before)
    from alembic import command

    command.upgrade(alembic_config(engine), revision)
    return before


def _known_revisions(engine: sa.Engine) -> set[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(engine))
    return {rev.revision for rev in script.walk_revisions()}


def _too_new(current: str) -> errors.SchemaTooNew:
    return errors.SchemaTooNew(
        f"the database schema ({current}) is newer than this nodepatch ({head_revision()}): "
        "upgrade nodepatch"
    )


def ensure_schema(
    engine: sa.Engine, *, create_if_empty: bool, upgrade_command: str = UPGRADE
) -> None:
    """Refuse to work on a schema this code does not match. An empty database may be created.

    `upgrade_command` is the command the messages suggest (it may name the database)."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if current is None and create_if_empty:
        upgrade(engine)
        return
    if current is None:
        raise errors.SchemaOutdated(
            f"the database has no nodepatch schema: run `{upgrade_command}`"
        )
    if current not in _known_revisions(engine):
        raise _too_new(current)
    raise errors.SchemaOutdated(
        f"the database schema ({current}) is older than this nodepatch ({head}): "
        f"run `{upgrade_command}`"
    )


class _reachable:
    """Open a connection, turning driver errors into one clear DatabaseError."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.conn: sa.Connection | None = None

    def __enter__(self) -> sa.Connection:
        try:
            self.conn = self.engine.connect()
        except sa.exc.OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            raise errors.DatabaseConfigError(
                f"cannot open database {self.engine.url.render_as_string()}: {reason}"
            ) from exc
        return self.conn

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.close()
