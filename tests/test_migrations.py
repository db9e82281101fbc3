"""The schema comes only from the migrations, and they agree with the models."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from engine import db, errors, schema
from engine.store import Store


def test_migrations_and_models_agree(engine: sa.Engine) -> None:
    """A database built by the migrations has exactly the tables, columns and indexes of
    engine.schema (alembic finds nothing to autogenerate)."""
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    assert diff == []


def test_database_at_head_is_accepted(engine: sa.Engine) -> None:
    """A migrated database passes the schema check."""
    db.ensure_schema(engine, create_if_empty=False)
    assert db.current_revision(engine) == db.head_revision()


def test_older_schema_asks_for_db_upgrade(engine: sa.Engine) -> None:
    """A schema behind the code is refused with the command that fixes it; the upgrade
    then brings it to head."""
    command.downgrade(db.alembic_config(engine), "0001")
    with pytest.raises(errors.SchemaOutdated, match="run `nodepatch db upgrade`"):
        db.ensure_schema(engine, create_if_empty=False)
    db.upgrade(engine)
    db.ensure_schema(engine, create_if_empty=False)


def test_audit_rows_cannot_be_updated_or_deleted(engine: sa.Engine) -> None:
    """The database itself refuses to rewrite the audit trail."""
    store = Store(engine)
    run = store.create_run(
        workflow="w", workflow_version=1, subject="s", state="A", params={}, actor="t@h:1"
    )
    for statement in ("UPDATE run_event SET actor = 'x'", "DELETE FROM run_event"):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
            conn.exec_driver_sql(statement)
    assert len(store.events(run.id)) == 1


def test_unknown_newer_schema_asks_to_upgrade_nodepatch(engine: sa.Engine) -> None:
    """A revision this code does not know means the database is newer than the code."""
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'ffff9999'")
    with pytest.raises(errors.SchemaTooNew, match="upgrade nodepatch"):
        db.ensure_schema(engine, create_if_empty=False)


def test_empty_database_is_refused_unless_creation_is_allowed(tmp_path: object) -> None:
    """An empty PostgreSQL-style database must be upgraded explicitly; SQLite may be created."""
    eng = db.connect(f"sqlite:///{tmp_path}/empty.db", create=True)
    with pytest.raises(errors.SchemaOutdated, match="nodepatch db upgrade"):
        db.ensure_schema(eng, create_if_empty=False)
    db.ensure_schema(eng, create_if_empty=True)
    assert db.current_revision(eng) == db.head_revision()
    eng.dispose()


def test_unreachable_database_is_one_clear_error() -> None:
    """A database that cannot be reached gives DatabaseError naming it, not a driver trace."""
    eng = db.connect("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(errors.DatabaseError, match="cannot open database"):
        db.ensure_schema(eng, create_if_empty=False)


def test_partial_indexes_carry_the_where_clause_schema_names(engine: sa.Engine) -> None:
    """Each partial unique index that engine.schema names (its WHERE clause in `info`) exists
    in the migrated database, unique, with that WHERE clause."""
    partial = [
        (table.name, index)
        for table in schema.metadata.tables.values()
        for index in table.indexes
        if "where" in index.info
    ]
    assert len(partial) == 2
    with engine.connect() as conn:
        for table, index in partial:
            if engine.dialect.name == "sqlite":
                sql = "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = :name"
            else:
                sql = "SELECT indexdef FROM pg_indexes WHERE indexname = :name"
            ddl = conn.execute(sa.text(sql), {"name": index.name}).scalar_one()
            flat = "".join(c for c in ddl if c not in "()\"' ").lower().replace("::text", "")
            assert flat.startswith("createuniqueindex") and table in flat, ddl
            want = "".join(c for c in index.info["where"] if c not in "()\"' ").lower()
            assert flat.split("where", 1)[1] == want, ddl
