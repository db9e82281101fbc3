"""Hot statements (engine/compiled.py) against SQLAlchemy's own execution of the same statement,
on a real SQLite file and PostgreSQL: the same rows and values (JSON, datetimes, booleans, the
load's aggregated signals and published data), SQLAlchemy's error classes, a lost PostgreSQL
connection invalidated, and statement listeners told of every hot statement."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from engine import db
from engine import statements as q
from engine.compiled import Hot
from engine.model import Lease
from engine.store import Store
from tests.conftest import postgres_database

TTL = dt.timedelta(seconds=30)


def _busy_run(store: Store) -> tuple[Lease, str]:
    """A run with a lease, a consumed and a pending signal, published data and an error."""
    run = store.create_run(
        workflow="w",
        workflow_version=1,
        subject="cluster1/hv01",
        state="A",
        params={"nested": {"list": [1, 2.5, "x", None, True]}, "ünï": "cödé"},
        actor="tester",
    )
    lease = store.claim(run.id, "tester", TTL)
    store.send_signal(run.id, "go", {"n": 1}, "tester")
    store.send_signal(run.id, "later", {}, "tester")
    store.transition(
        lease,
        from_state="A",
        version=1,
        trigger="t",
        to_state="B",
        publish={"vms": [{"id": "vm-1", "host": "hv01"}], "count": 3},
        consume=("go",),
        error={"reason": "a detail"},
        acquire=("cluster:c1",),
    )
    store.journal_write(
        lease, step_key="B@2:move", attempt=1, state="B", status="succeeded", result={"to": "hv2"}
    )
    return lease, run.id


def _by_sqlalchemy(conn: sa.Connection, hot: Hot, values: dict[str, Any]) -> dict[str, Any]:
    statement = hot.statement
    if isinstance(statement, dict):
        statement = statement[conn.dialect.name]
    row = conn.execute(statement, values).mappings().first()  # type: ignore[arg-type]
    assert row is not None
    return dict(row)


def test_hot_reads_return_what_sqlalchemy_returns(engine: sa.Engine) -> None:
    store = Store(engine)
    _lease, run_id = _busy_run(store)
    with engine.connect() as conn, conn.begin():
        for hot in (q.run, q.load):
            mine = hot.first(conn, {"run_id": run_id})
            assert mine == _by_sqlalchemy(conn, hot, {"run_id": run_id})
    with engine.connect() as conn, conn.begin():
        journal = q.journal_entries.all(conn, {"run_id": run_id})
        statement = q.journal_entries.statement
        assert isinstance(statement, sa.Select)
        assert journal == [dict(r) for r in conn.execute(statement, {"run_id": run_id}).mappings()]
        assert q.lock_holder.first(conn, {"resource": "cluster:c1"}) == {"run_id": run_id}
    assert [(j["step_key"], j["result"]) for j in journal] == [("B@2:move", {"to": "hv2"})]
    assert mine is not None
    assert mine["pending_signals"] == ["later"]
    assert mine["published_data"] == [["count", 3], ["vms", [{"id": "vm-1", "host": "hv01"}]]]
    assert mine["params"] == {"nested": {"list": [1, 2.5, "x", None, True]}, "ünï": "cödé"}
    assert mine["error"] == {"reason": "a detail"}
    assert isinstance(mine["created_at"], dt.datetime)
    assert mine["detached"] is False


def test_hot_writes_store_what_sqlalchemy_reads_back(engine: sa.Engine) -> None:
    """A write through the hot path reads back through SQLAlchemy with every value intact."""
    store = Store(engine)
    lease, run_id = _busy_run(store)
    expires = dt.datetime(2031, 2, 3, 4, 5, 6, 789012, tzinfo=dt.UTC)
    with engine.begin() as conn:
        changed = q.renew.rowcount(
            conn, {"run_id": run_id, "token": lease.token, "expires_at": expires, "now": expires}
        )
        stale = q.renew.rowcount(
            conn,
            {"run_id": run_id, "token": lease.token + 1, "expires_at": expires, "now": expires},
        )
    assert (changed, stale) == (1, 0)
    run = store.get(run_id)
    assert run.lease_expires_at == expires
    assert run.heartbeat_at == expires


def test_hot_errors_are_sqlalchemys(engine: sa.Engine) -> None:
    """A constraint violation on the hot path raises SQLAlchemy's IntegrityError, and the
    transaction it broke is rolled back as usual."""
    store = Store(engine)
    _lease, run_id = _busy_run(store)
    event = {
        "run_id": run_id, "run_version": 2, "kind": "transition", "trigger": "again",
        "from_state": "A", "to_state": "B", "actor": "tester", "lease_token": 1,
        "occurred_at": dt.datetime.now(dt.UTC), "details": {}, "prev_hash": "0", "hash": "1",
    }  # fmt: skip
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        q.insert_event.rowcount(conn, event)  # a second transition event of version 2
    assert [e.trigger for e in store.events(run_id) if e.kind == "transition"] == ["t"]


def test_statement_listeners_see_hot_statements(engine: sa.Engine) -> None:
    store = Store(engine)
    _lease, run_id = _busy_run(store)
    seen: list[str] = []

    def listener(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        store.load(run_id)
    finally:
        sa.event.remove(engine, "before_cursor_execute", listener)
    assert any("published_data" in s and "run_signal" in s for s in seen), seen


@pytest.fixture
def pg_engine() -> Iterator[sa.Engine]:
    """PostgreSQL only: a SQLite connection is never lost under a statement."""
    for url in postgres_database():
        engine = db.connect(url)
        yield engine
        engine.dispose()


@pytest.mark.postgres
def test_a_lost_connection_is_invalidated(pg_engine: sa.Engine) -> None:
    """A PostgreSQL connection killed under a hot statement raises SQLAlchemy's
    OperationalError marked as a lost connection; the pool hands out a live one next."""
    engine = pg_engine
    store = Store(engine)
    _lease, run_id = _busy_run(store)
    with engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        conn.commit()
        with engine.connect() as other:
            other.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid or 0)})")
        with pytest.raises(sa.exc.OperationalError) as raised:
            q.run.first(conn, {"run_id": run_id})
        assert raised.value.connection_invalidated
        assert conn.invalidated
    assert store.get(run_id).id == run_id
