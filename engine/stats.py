"""Figures about runs read from the database, for monitoring (workflows/metrics.py exposes
them to Prometheus). Read-only; every figure is computed from the tables at the time asked, so
any process (a worker, or `nodepatch metrics` with no worker running) reports the same."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from engine import db
from engine import schema as t
from engine.model import as_utc
from engine.store import Store

NOT_OPERATIONS = ("timer", "child")  # journal entries that are no cluster operation


@dataclass(frozen=True)
class Figures:
    runs: dict[tuple[str, str], int]  # (workflow, state) -> runs in it now
    transitions: dict[tuple[str, str], int]  # (workflow, to_state) -> transitions ever
    step_failures: dict[tuple[str, str], int]  # (workflow, state failed in) -> failures ever
    stays: dict[tuple[str, str], list[float]]  # (workflow, state) -> seconds of ended stays
    operations: dict[tuple[str, str, str], int]  # (workflow, kind, outcome) -> journal entries
    oldest: dict[tuple[str, str], dt.datetime]  # (workflow, state) -> oldest entry, unfinished
    takeovers: int


def read(store: Store) -> Figures:
    ev, run = t.run_event, t.run
    with store.engine.connect() as raw:
        conn = raw.execution_options(**{db.READ_ONLY: True})
        conn.begin()
        runs = _counts(conn, sa.select(run.c.workflow, run.c.state, sa.func.count()))
        transitions = _counts(
            conn,
            sa.select(run.c.workflow, ev.c.to_state, sa.func.count())
            .join(run, run.c.id == ev.c.run_id)
            .where(ev.c.kind == "transition"),
        )
        failures = _counts(
            conn,
            sa.select(run.c.workflow, ev.c.from_state, sa.func.count())
            .join(run, run.c.id == ev.c.run_id)
            .where(ev.c.kind == "transition", ev.c.trigger == "fail"),
        )
        takeovers = conn.execute(
            sa.select(sa.func.count()).where(
                ev.c.kind == "lease",
                sa.cast(ev.c.details, sa.Text).like('%"taken_over_from"%'),
            )
        ).scalar_one()
        return Figures(
            runs,
            transitions,
            failures,
            _stays(conn),
            _operations(conn),
            _oldest(conn),
            int(takeovers),
        )


def _counts(conn: sa.Connection, query: sa.Select[Any]) -> dict[Any, int]:
    columns = list(query.selected_columns)[:-1]
    rows = conn.execute(query.group_by(*columns)).all()
    return {tuple(r[:-1]): int(r[-1]) for r in rows}


def _stays(conn: sa.Connection) -> dict[tuple[str, str], list[float]]:
    """How long each ended stay in a state lasted: from the event entering it to the next."""
    ev = t.run_event
    left = sa.func.lead(ev.c.occurred_at).over(partition_by=ev.c.run_id, order_by=ev.c.id)
    entries = (
        sa.select(
            ev.c.run_id,
            ev.c.to_state.label("state"),
            ev.c.occurred_at.label("entered"),
            sa.type_coerce(left, t.TS).label("left"),
        )
        .where(ev.c.to_state.is_not(None))
        .subquery()
    )
    rows = conn.execute(
        sa.select(t.run.c.workflow, entries.c.state, entries.c.entered, entries.c.left)
        .join(t.run, t.run.c.id == entries.c.run_id)
        .where(entries.c.left.is_not(None))
    ).all()
    stays: dict[tuple[str, str], list[float]] = {}
    for workflow, state, entered, gone in rows:
        start, end = as_utc(entered), as_utc(gone)
        if start is not None and end is not None:
            stays.setdefault((workflow, state), []).append((end - start).total_seconds())
    return stays


def _operations(conn: sa.Connection) -> dict[tuple[str, str, str], int]:
    """Journaled side effects by kind (`move_vm`, `enter_maintenance`, ...) and outcome
    (succeeded, failed, or still submitted / intent)."""
    j = t.step_journal
    rows = conn.execute(
        sa.select(t.run.c.workflow, j.c.step_key, j.c.status).join(t.run, t.run.c.id == j.c.run_id)
    ).all()
    found: Counter[tuple[str, str, str]] = Counter()
    for workflow, key, status in rows:
        kind = key.split(":", 2)[1] if key.count(":") >= 1 else key
        if kind not in NOT_OPERATIONS:
            found[(workflow, kind, status)] += 1
    return dict(found)


def _oldest(conn: sa.Connection) -> dict[tuple[str, str], dt.datetime]:
    """Per unfinished state, when the run that has been in it longest entered it."""
    ev, run = t.run_event, t.run
    last = (
        sa.select(ev.c.run_id, sa.func.max(ev.c.id).label("id"))
        .where(ev.c.to_state.is_not(None))
        .group_by(ev.c.run_id)
        .subquery()
    )
    rows = conn.execute(
        sa.select(run.c.workflow, run.c.state, sa.func.min(ev.c.occurred_at))
        .join(last, last.c.run_id == run.c.id)
        .join(ev, ev.c.id == last.c.id)
        .where(run.c.finished_at.is_(None))
        .group_by(run.c.workflow, run.c.state)
    ).all()
    return {(w, s): as_utc(at) for w, s, at in rows if at is not None}  # type: ignore[misc]
