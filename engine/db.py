"""Database connections and schema management (alembic is the only way the schema is created)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event

from engine import errors

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
READ_ONLY = "nodepatch_read_only"


def normalise_url(url: str) -> str:
    """Accept plain postgresql:// URLs and use psycopg 3 for them."""
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def connect(url: str) -> sa.Engine:
    """An Engine for url: SQLite in WAL mode with a busy timeout and IMMEDIATE transactions."""
    url = normalise_url(url)
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise errors.DatabaseConfigError(f"invalid database URL {url!r}") from exc
    if parsed.get_backend_name() == "sqlite":
        return _sqlite(parsed)
    if parsed.get_backend_name() != "postgresql":
        raise errors.DatabaseConfigError(f"unsupported database {parsed.get_backend_name()!r}")
    return sa.create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 5})


def _sqlite(url: sa.URL) -> sa.Engine:
    if url.database and url.database != ":memory:":
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        url = url.set(database=str(Path(url.database).expanduser()))
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
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def alembic_config(engine: sa.Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config(sa.create_engine("sqlite://")))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(engine: sa.Engine) -> str | None:
    with _reachable(engine) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    with _reachable(engine):
        pass
    command.upgrade(alembic_config(engine), revision)


def ensure_schema(engine: sa.Engine, *, create_if_empty: bool) -> None:
    """Refuse to work on a schema this code does not match. An empty database may be created."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if current is None and create_if_empty:
        upgrade(engine)
        return
    if current is None:
        raise errors.SchemaOutdated(
            "the database has no nodepatch schema: run `nodepatch db upgrade`"
        )
    script = ScriptDirectory.from_config(alembic_config(engine))
    known = {rev.revision for rev in script.walk_revisions()}
    if current not in known:
        raise errors.SchemaTooNew(
            f"the database schema ({current}) is newer than this nodepatch ({head}): "
            "upgrade nodepatch"
        )
    raise errors.SchemaOutdated(
        f"the database schema ({current}) is older than this nodepatch ({head}): "
        "run `nodepatch db upgrade`"
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
