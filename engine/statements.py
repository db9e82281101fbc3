"""The store's statements, built once at import.

Building a SQLAlchemy statement and computing its cache key cost more than running it on
SQLite, so the store's frequent statements are built here once, with named bind parameters,
and executed with a dict of values. The hottest (a transition's, a claim's, a load's, the
journal's) are `Hot`: compiled once per dialect and run on the driver's cursor
(engine/compiled.py); the others go through SQLAlchemy, which computes each one's cache key
once and compiles it once per dialect (the engine's compiled cache). Statements that differ per
database (the one-statement load, the upserts) are held per dialect name and built on first
use, so a process on SQLite never imports SQLAlchemy's PostgreSQL dialect (a CLI start-up cost).

Every statement that appends to a run's audit trail moves `run.audit_head` from the event's
`prev_hash` to its `hash` under the guard `audit_head IS NOT DISTINCT FROM :prev_head`, so two
writers can never chain two events after the same one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa

from engine import schema as t
from engine.compiled import Hot

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql, sqlite

S = TypeVar("S")


class _PerDialect(dict[str, S]):
    """Statements by dialect name, each built by its builder when first asked for."""

    def __init__(self, **builders: Callable[[], S]) -> None:
        super().__init__()
        self._builders = builders

    def __missing__(self, dialect: str) -> S:
        self[dialect] = statement = self._builders[dialect]()
        return statement


def _p(name: str) -> sa.BindParameter[Any]:
    return sa.bindparam(name)


_RUN = t.run.c
_THIS_RUN = _RUN.id == _p("run_id")
_HEAD_IS_PREV = _RUN.audit_head.is_not_distinct_from(_p("prev_head"))

# ---- reads ----------------------------------------------------------------------------

_run = sa.select(t.run).where(_THIS_RUN)
run = Hot(_run)
run_locked = Hot(_run.with_for_update())
last_hash = (
    sa.select(t.run_event.c.hash)
    .where(t.run_event.c.run_id == _p("run_id"))
    .order_by(t.run_event.c.id.desc())
    .limit(1)
)
pending_signals = (
    sa.select(t.run_signal.c.name)
    .where(t.run_signal.c.run_id == _p("run_id"), t.run_signal.c.consumed_at.is_(None))
    .order_by(t.run_signal.c.id)
)
signal_pending = (
    sa.select(t.run_signal.c.id)
    .where(
        t.run_signal.c.run_id == _p("run_id"),
        t.run_signal.c.name == _p("name"),
        t.run_signal.c.consumed_at.is_(None),
    )
    .limit(1)
)
published = (
    sa.select(t.published_data.c.key, t.published_data.c.value)
    .where(t.published_data.c.run_id == _p("run_id"))
    .order_by(t.published_data.c.run_version, t.published_data.c.key)
)
lock_holder = Hot(
    sa.select(t.resource_lock.c.run_id).where(t.resource_lock.c.resource == _p("resource"))
)
_journal = t.step_journal.c
journal_entries = Hot(
    sa.select(t.step_journal)
    .where(_journal.run_id == _p("run_id"))
    .order_by(_journal.created_at, _journal.step_key)
)
journal_newest = Hot(
    sa.select(t.step_journal)
    .where(_journal.run_id == _p("run_id"), _journal.step_key == _p("step_key"))
    .order_by(_journal.attempt.desc())
    .limit(1)
)


def _loaded(pending: sa.ColumnElement[Any], data: sa.ColumnElement[Any]) -> list[Any]:
    """The run's columns with its pending signals (names, oldest first) and its published
    data (`[key, value]` pairs in publishing order), as two JSON arrays."""
    return [
        *t.run.c,
        sa.type_coerce(pending, sa.JSON).label("pending_signals"),
        sa.type_coerce(data, sa.JSON).label("published_data"),
    ]


_signals = t.run_signal.c
_data = t.published_data.c
_SIGNALS_PENDING = (_signals.run_id == _p("run_id"), _signals.consumed_at.is_(None))
_sqlite_signals = sa.select(_signals.name).where(*_SIGNALS_PENDING).order_by(_signals.id).subquery()
_sqlite_data = (
    sa.select(_data.key, _data.value)
    .where(_data.run_id == _p("run_id"))
    .order_by(_data.run_version, _data.key)
    .subquery()
)
# SQLite aggregates rows in the order of an ordered subquery (which it never flattens into an
# aggregate); PostgreSQL is given the order inside the aggregate.


def _sqlite_loaded() -> list[Any]:
    return _loaded(
        sa.select(sa.func.json_group_array(_sqlite_signals.c.name)).scalar_subquery(),
        sa.select(
            sa.func.json_group_array(
                sa.func.json_array(_sqlite_data.c.key, sa.func.json(_sqlite_data.c.value))
            )
        ).scalar_subquery(),
    )


def _postgresql_loaded() -> list[Any]:
    from sqlalchemy.dialects import postgresql

    return _loaded(
        sa.select(
            sa.func.coalesce(
                sa.func.json_agg(postgresql.aggregate_order_by(_signals.name, _signals.id)),
                sa.literal_column("'[]'::json"),
            )
        )
        .where(*_SIGNALS_PENDING)
        .scalar_subquery(),
        sa.select(
            sa.func.coalesce(
                sa.func.json_agg(
                    postgresql.aggregate_order_by(
                        sa.func.json_build_array(_data.key, _data.value),
                        _data.run_version,
                        _data.key,
                    )
                ),
                sa.literal_column("'[]'::json"),
            )
        )
        .where(_data.run_id == _p("run_id"))
        .scalar_subquery(),
    )


_LOADED: _PerDialect[list[Any]] = _PerDialect(sqlite=_sqlite_loaded, postgresql=_postgresql_loaded)


def _per_dialect(build: Callable[[list[Any]], S]) -> _PerDialect[S]:
    """A statement per dialect built from that dialect's loaded columns, on first use."""
    return _PerDialect(
        **{name: (lambda n=name: build(_LOADED[n])) for name in ("sqlite", "postgresql")}
    )


load = Hot(_per_dialect(lambda columns: sa.select(*columns).where(_THIS_RUN)))

# ---- the run row --------------------------------------------------------------------------

create_run = Hot(sa.insert(t.run).returning(*t.run.c), keys=t.run.c.keys())
RUN_UNSET: dict[str, Any] = dict.fromkeys(t.run.c.keys())  # a new run's columns, all NULL


def _advance(*, final: bool) -> sa.Update:
    """The compare-and-set of a transition: (state, version, lease token) and the audit head."""
    values: dict[str, Any] = {
        "state": _p("to_state"),
        "version": _p("to_version"),
        "updated_at": _p("now"),
        "waiting_for": None,
        "error": _p("new_error"),
        "failed_from": _p("new_failed_from"),
        "audit_head": _p("head"),
    }
    if final:  # (before, finished_at is NULL: left out of the SET, its indexes are not touched)
        values |= {
            "finished_at": _p("now"),
            "wake_at": None,  # a finished run has no timer (status shows null)
            "lease_owner": None,
            "lease_expires_at": None,
            "heartbeat_at": None,
        }
    return (
        sa.update(t.run)
        .where(
            _THIS_RUN,
            _RUN.state == _p("from_state"),
            _RUN.version == _p("from_version"),
            _RUN.lease_token == _p("token"),
            _HEAD_IS_PREV,
        )
        .values(values)
    )


# A transition and a claim return the run as the runner's next load would read it (the
# subqueries see the rows this transaction wrote before the UPDATE), so that no load follows.
advance = Hot(_per_dialect(lambda columns: _advance(final=False).returning(*columns)))
advance_final = Hot(_per_dialect(lambda columns: _advance(final=True).returning(*columns)))
claim = (
    sa.update(t.run)
    .where(_THIS_RUN, _RUN.lease_token == _p("old_token"), _HEAD_IS_PREV)
    .values(
        lease_owner=_p("owner"),
        lease_token=_p("new_token"),
        lease_expires_at=_p("expires_at"),
        heartbeat_at=_p("now"),
        audit_head=_p("head"),
    )
)
claim_loaded = Hot(_per_dialect(lambda columns: claim.returning(*columns)))
renew = Hot(
    sa.update(t.run)
    .where(_THIS_RUN, _RUN.lease_token == _p("token"))
    .values(lease_expires_at=_p("expires_at"), heartbeat_at=_p("now"))
)
release = Hot(
    sa.update(t.run)
    .where(_THIS_RUN, _RUN.lease_token == _p("token"))
    .values(lease_owner=None, lease_expires_at=None, heartbeat_at=None)
)
fence = Hot(
    sa.update(t.run)
    .where(_THIS_RUN, _RUN.lease_token == _p("token"))
    .values(updated_at=_p("now"))
    .returning(*t.run.c)
)
touch = (
    sa.update(t.run).where(_THIS_RUN, _RUN.lease_token == _p("token")).values(updated_at=_p("now"))
)
wait = Hot(
    sa.update(t.run)
    .where(_THIS_RUN, _RUN.lease_token == _p("token"), _HEAD_IS_PREV)
    .values(waiting_for=_p("signal"), audit_head=_p("head"))
)
move_head = Hot(sa.update(t.run).where(_THIS_RUN, _HEAD_IS_PREV).values(audit_head=_p("head")))

# ---- the rows a write adds or changes -----------------------------------------------------

insert_event = Hot(sa.insert(t.run_event).inline(), keys=t.run_event.c.keys()[1:])  # not the id
insert_signal = sa.insert(t.run_signal).inline()


def _sqlite_insert_lock() -> sa.Insert:
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(t.resource_lock).on_conflict_do_nothing()


def _postgresql_insert_lock() -> sa.Insert:
    from sqlalchemy.dialects import postgresql

    return postgresql.insert(t.resource_lock).on_conflict_do_nothing()


# A lock taken unless it is held (no row changed: held), without a savepoint around it.
insert_lock = Hot(
    _PerDialect(sqlite=_sqlite_insert_lock, postgresql=_postgresql_insert_lock),
    keys=("resource", "run_id", "acquired_at"),
)
_pending = t.run_signal.alias("pending")
release_locks = sa.delete(t.resource_lock).where(
    t.resource_lock.c.run_id == _p("run_id"),
    t.resource_lock.c.resource.in_(sa.bindparam("resources", expanding=True)),
)
consume_signal = Hot(
    sa.update(t.run_signal)
    .where(
        t.run_signal.c.id
        == sa.select(sa.func.min(_pending.c.id))
        .where(
            _pending.c.run_id == _p("signal_run"),  # not "run_id": a column of run_signal
            _pending.c.name == _p("signal_name"),
            _pending.c.consumed_at.is_(None),
        )
        .scalar_subquery()
    )
    .values(consumed_at=_p("now"), consumed_run_version=_p("version"))
)


def _publish(insert: sqlite.Insert | postgresql.Insert) -> sa.Insert:
    """Insert or replace one published value (the key is unique per run)."""
    return insert.on_conflict_do_update(
        index_elements=[t.published_data.c.run_id, t.published_data.c.key],
        set_={
            "step": insert.excluded.step,
            "value": insert.excluded.value,
            "run_version": insert.excluded.run_version,
            "published_at": insert.excluded.published_at,
        },
    )


def _sqlite_publish() -> sa.Insert:
    from sqlalchemy.dialects import sqlite

    return _publish(sqlite.insert(t.published_data))


def _postgresql_publish() -> sa.Insert:
    from sqlalchemy.dialects import postgresql

    return _publish(postgresql.insert(t.published_data))


publish = Hot(_PerDialect(sqlite=_sqlite_publish, postgresql=_postgresql_publish))


_JOURNAL_COLUMNS = (
    "run_id", "step_key", "attempt", "state", "status", "external_ref", "result", "lease_token",
    "created_at", "updated_at",
)  # fmt: skip


def _journal_values(run_id: sa.ColumnElement[Any]) -> list[sa.ColumnElement[Any]]:
    """The values of one journal attempt, in _JOURNAL_COLUMNS order. A NULL reference or
    result (as the parameter says none) is SQL NULL, not JSON null, so that an update keeps
    what the row holds."""
    journal = t.step_journal.c
    return [
        run_id,
        sa.bindparam("step_key", type_=journal.step_key.type),
        sa.bindparam("attempt", type_=journal.attempt.type),
        # not "state": an UPDATE given a parameter named as a column of its table sets it
        sa.bindparam("journal_state", type_=journal.state.type),
        sa.bindparam("status", type_=journal.status.type),
        sa.bindparam("external_ref", type_=journal.external_ref.type),
        sa.bindparam("result", type_=sa.JSON(none_as_null=True)),
        sa.bindparam("token", type_=journal.lease_token.type),
        sa.bindparam("now", type_=journal.created_at.type),
        sa.bindparam("now", type_=journal.updated_at.type),
    ]


def _upsert(insert: sqlite.Insert | postgresql.Insert) -> sa.Insert:
    """Insert one journal attempt, or update it: its status always, its external reference and
    result when given (NULL keeps what the row holds)."""
    journal = t.step_journal.c
    return insert.on_conflict_do_update(
        index_elements=[journal.run_id, journal.step_key, journal.attempt],
        set_={
            "status": insert.excluded.status,
            "lease_token": insert.excluded.lease_token,
            "updated_at": insert.excluded.updated_at,
            "external_ref": sa.func.coalesce(insert.excluded.external_ref, journal.external_ref),
            "result": sa.func.coalesce(insert.excluded.result, journal.result),
        },
    )


def _sqlite_journal() -> tuple[Hot, ...]:
    """SQLite: touch the run under the lease token (taking the write lock), then the upsert."""
    from sqlalchemy.dialects import sqlite

    values = dict(zip(_JOURNAL_COLUMNS, _journal_values(_p("run_id")), strict=True))
    upsert = _upsert(sqlite.insert(t.step_journal).values(values))
    return Hot(touch), Hot(upsert)


def _postgresql_journal() -> tuple[Hot, ...]:
    """PostgreSQL: one statement: the fencing UPDATE as a CTE, whose row (none when the lease
    is lost) the upsert inserts from."""
    from sqlalchemy.dialects import postgresql

    fenced = touch.returning(_RUN.id).cte("fenced")
    rows = sa.select(*_journal_values(fenced.c.id)).select_from(fenced)
    upsert = _upsert(postgresql.insert(t.step_journal).from_select(_JOURNAL_COLUMNS, rows))
    return (Hot(upsert),)


# A journal write: statements run in order, each of which must change a row (none: the lease
# was lost). Parameters: run_id, token, now, step_key, attempt, journal_state, status,
# external_ref, result.
journal = _PerDialect(sqlite=_sqlite_journal, postgresql=_postgresql_journal)


# ---- due runs (a worker's claim) ----------------------------------------------------------


def _due() -> list[sa.ColumnElement[bool]]:
    """A run a worker may claim at `now`: detached, unfinished, not failed (unless an abort is
    pending), not waiting for a signal that has not come, its timer passed, its lease free or
    expired."""
    pending = sa.select(t.run_signal.c.id).where(
        t.run_signal.c.run_id == _RUN.id, t.run_signal.c.consumed_at.is_(None)
    )
    abort = pending.where(t.run_signal.c.name == "abort").exists()
    awaited = pending.where(t.run_signal.c.name == _RUN.waiting_for).exists()
    now = _p("now")
    return [
        _RUN.detached.is_(True),
        _RUN.finished_at.is_(None),
        sa.or_(_RUN.failed_from.is_(None), abort),
        sa.or_(_RUN.waiting_for.is_(None), awaited, abort),
        sa.or_(_RUN.wake_at.is_(None), _RUN.wake_at <= now, abort),
        sa.or_(_RUN.lease_expires_at.is_(None), _RUN.lease_expires_at <= now),
    ]


_DUE = _due()
count_due = sa.select(sa.func.count()).select_from(t.run).where(*_DUE)
_pick_due = sa.select(t.run).where(*_DUE).order_by(_RUN.wake_at, _RUN.created_at).limit(1)
# PostgreSQL skips the rows other workers are claiming; SQLite's writers are serialised.
pick_due = Hot(
    _PerDialect(
        sqlite=lambda: _pick_due,
        postgresql=lambda: _pick_due.with_for_update(skip_locked=True, of=t.run),
    )
)
