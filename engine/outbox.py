"""An outbox over the append-only audit trail: a consumer reads `run_event` after its cursor,
routes each event to zero or more targets (one delivery row each), and later marks each
delivery delivered, retried at a later time, or parked. Generic: what a target is and how an
event reaches it is the consumer's business (workflows/webhooks.py posts HTTP).

Nothing is lost: deliveries are rows, written before the cursor moves past their events, and
unique per (consumer, target, event), so reading an event twice creates nothing twice. Event
IDs on PostgreSQL come from a sequence and may commit out of order, so the cursor only moves
past a gap in the IDs once the event after it is older than `GAP_HORIZON` (a transaction still
in flight may yet fill it; one rolled back never will); SQLite commits in ID order.

A delivery is claimed by moving its `next_attempt_at` forward (compare-and-set), so two
processes never send it at once; a sender that dies leaves it due again when that claim ends:
at least once, never silently dropped."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from engine import db, errors
from engine import schema as t
from engine.model import as_utc, utcnow
from engine.store import retried

GAP_HORIZON = dt.timedelta(minutes=5)
PENDING, DELIVERED, PARKED = "pending", "delivered", "parked"


@dataclass(frozen=True)
class OutboxEvent:
    """An audit event with what a consumer needs to describe it: the run's workflow and
    subject, and `state`, the run's state right after the event."""

    id: int
    run_id: str
    workflow: str
    subject: str
    kind: str
    trigger: str | None
    from_state: str | None
    to_state: str | None
    state: str | None
    actor: str
    occurred_at: dt.datetime
    details: Mapping[str, Any]


@dataclass(frozen=True)
class Delivery:
    id: int
    target: str
    name: str
    status: str
    attempts: int
    next_attempt_at: dt.datetime
    last_error: str | None
    event: OutboxEvent


Route = Callable[[OutboxEvent], Sequence[tuple[str, str]]]
"""The (target, name) pairs an event goes to; `name` is how the consumer calls the event."""


class Outbox:
    def __init__(self, engine: sa.Engine, consumer: str) -> None:
        self.engine, self.consumer = engine, consumer

    @contextmanager
    def _tx(self, *, read_only: bool = False) -> Iterator[sa.Connection]:
        try:
            with self.engine.connect() as raw:
                conn = raw.execution_options(**{db.READ_ONLY: True}) if read_only else raw
                with conn.begin():
                    yield conn
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            reason = str(exc.orig or exc).strip().splitlines()[0]
            raise errors.DatabaseUnavailable(f"database unavailable: {reason}") from exc

    # ---- reading the log -------------------------------------------------------------------

    @retried
    def scan(self, route: Route, *, now: dt.datetime | None = None, batch: int = 500) -> int:
        """Route every event after the cursor; the number of deliveries created."""
        now = now or utcnow()
        created = 0
        while True:
            with self._tx() as conn:
                position = self._position(conn, now)
                events = self._after(conn, position, batch)
                for event in events:
                    for target, name in route(event):
                        created += self._deliver_later(conn, target, name, event.id, now)
                moved = _contiguous(position, events, now - GAP_HORIZON)
                if moved > position:
                    conn.execute(
                        t.outbox_cursor.update()
                        .where(
                            t.outbox_cursor.c.consumer == self.consumer,
                            t.outbox_cursor.c.position < moved,
                        )
                        .values(position=moved, updated_at=now)
                    )
            if len(events) < batch or moved == position:
                return created

    def _position(self, conn: sa.Connection, now: dt.datetime) -> int:
        found = conn.execute(
            sa.select(t.outbox_cursor.c.position).where(t.outbox_cursor.c.consumer == self.consumer)
        ).scalar()
        if found is not None:
            return int(found)
        newest = conn.execute(sa.select(sa.func.coalesce(sa.func.max(t.run_event.c.id), 0)))
        position = int(newest.scalar_one())
        conn.execute(
            _insert(conn).values(consumer=self.consumer, position=position, updated_at=now)
        )
        return position

    def _after(self, conn: sa.Connection, position: int, batch: int) -> list[OutboxEvent]:
        query = _event_query().where(t.run_event.c.id > position)
        rows = conn.execute(query.order_by(t.run_event.c.id).limit(batch)).mappings()
        return [_event(r) for r in rows]

    def _deliver_later(
        self, conn: sa.Connection, target: str, name: str, event_id: int, now: dt.datetime
    ) -> int:
        values = {
            "consumer": self.consumer,
            "target": target,
            "event_id": event_id,
            "name": name,
            "status": PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        insert = _delivery_insert(conn).values(**values)
        return conn.execute(insert.on_conflict_do_nothing()).rowcount

    # ---- sending ---------------------------------------------------------------------------

    @retried
    def due(self, now: dt.datetime, *, limit: int = 200) -> list[Delivery]:
        """Pending deliveries whose time has come, oldest event first."""
        return self._deliveries(
            [
                t.outbox_delivery.c.status == PENDING,
                t.outbox_delivery.c.next_attempt_at <= now,
            ],
            limit,
        )

    @retried
    def parked(self, *, limit: int = 1000) -> list[Delivery]:
        return self._deliveries([t.outbox_delivery.c.status == PARKED], limit)

    def _deliveries(self, where: list[sa.ColumnElement[bool]], limit: int) -> list[Delivery]:
        d = t.outbox_delivery
        with self._tx(read_only=True) as conn:
            rows = conn.execute(
                sa.select(
                    d.c.id.label("delivery_id"),
                    d.c.target,
                    d.c.name,
                    d.c.status,
                    d.c.attempts,
                    d.c.next_attempt_at,
                    d.c.last_error,
                    d.c.event_id,
                )
                .where(d.c.consumer == self.consumer, *where)
                .order_by(d.c.event_id, d.c.id)
                .limit(limit)
            ).mappings()
            found = list(rows)
            if not found:
                return []
            events = {e.id: e for e in self._events(conn, [r["event_id"] for r in found])}
        return [
            Delivery(
                r["delivery_id"],
                r["target"],
                r["name"],
                r["status"],
                r["attempts"],
                as_utc(r["next_attempt_at"]) or utcnow(),
                r["last_error"],
                events[r["event_id"]],
            )
            for r in found
        ]

    def _events(self, conn: sa.Connection, ids: list[int]) -> list[OutboxEvent]:
        rows = conn.execute(_event_query().where(t.run_event.c.id.in_(ids))).mappings()
        return [_event(r) for r in rows]

    @retried
    def claim(self, delivery: Delivery, now: dt.datetime, until: dt.datetime) -> bool:
        """Take a due delivery for sending until `until`; False if another process took it
        (its next attempt is then in the future) or it is no longer pending."""
        d = t.outbox_delivery
        with self._tx() as conn:
            return (
                conn.execute(
                    d.update()
                    .where(
                        d.c.id == delivery.id,
                        d.c.status == PENDING,
                        d.c.next_attempt_at <= now,
                    )
                    .values(next_attempt_at=until)
                ).rowcount
                == 1
            )

    @retried
    def delivered(self, delivery: Delivery, now: dt.datetime) -> None:
        self._update(delivery, status=DELIVERED, attempts=delivery.attempts + 1, delivered_at=now)

    @retried
    def failed(self, delivery: Delivery, error: str, retry_at: dt.datetime | None) -> None:
        """One failed attempt: due again at `retry_at`, or parked when that is None."""
        values: dict[str, Any] = {"attempts": delivery.attempts + 1, "last_error": error[:2000]}
        if retry_at is None:
            values["status"] = PARKED
        else:
            values["next_attempt_at"] = retry_at
        self._update(delivery, **values)

    def _update(self, delivery: Delivery, **values: Any) -> None:
        with self._tx() as conn:
            conn.execute(
                t.outbox_delivery.update()
                .where(t.outbox_delivery.c.id == delivery.id)
                .values(**values)
            )

    @retried
    def unpark(
        self, now: dt.datetime, *, target: str | None = None, event_id: int | None = None
    ) -> int:
        """Make parked deliveries due now, with a fresh count of attempts."""
        d = t.outbox_delivery
        query = d.update().where(d.c.consumer == self.consumer, d.c.status == PARKED)
        if target is not None:
            query = query.where(d.c.target == target)
        if event_id is not None:
            query = query.where(d.c.event_id == event_id)
        with self._tx() as conn:
            return conn.execute(
                query.values(status=PENDING, attempts=0, next_attempt_at=now)
            ).rowcount

    # ---- reporting -------------------------------------------------------------------------

    @retried
    def summary(self) -> dict[str, Any]:
        """The cursor, the newest event, and per target: deliveries by status and failed
        attempts (a delivered event's attempts but its last)."""
        d = t.outbox_delivery
        failures = sa.func.sum(
            sa.case((d.c.status == DELIVERED, d.c.attempts - 1), else_=d.c.attempts)
        )
        with self._tx(read_only=True) as conn:
            cursor = conn.execute(
                sa.select(t.outbox_cursor.c.position).where(
                    t.outbox_cursor.c.consumer == self.consumer
                )
            ).scalar()
            newest = conn.execute(sa.select(sa.func.max(t.run_event.c.id))).scalar()
            rows = conn.execute(
                sa.select(d.c.target, d.c.status, sa.func.count(), failures)
                .where(d.c.consumer == self.consumer)
                .group_by(d.c.target, d.c.status)
            ).all()
        targets: dict[str, dict[str, int]] = {}
        for target, status, count, failed in rows:
            entry = targets.setdefault(
                target, {PENDING: 0, DELIVERED: 0, PARKED: 0, "failed_attempts": 0}
            )
            entry[status] = int(count)
            entry["failed_attempts"] += int(failed or 0)
        return {"cursor": cursor, "newest_event": newest, "targets": targets}


def _contiguous(position: int, events: Sequence[OutboxEvent], old: dt.datetime) -> int:
    """How far the cursor may move: past every event read, but not past a gap in the IDs
    whose next event is younger than `old` (a transaction in flight may still fill it)."""
    for event in events:
        if event.id != position + 1 and event.occurred_at > old:
            return position
        position = event.id
    return position


def _event_query() -> sa.Select[Any]:
    """Events with their run's workflow and subject, the run's state after each, and the
    details as raw text (a row garbled in SQL must not stop the outbox)."""
    ev = t.run_event
    earlier = ev.alias("earlier")
    state = (
        sa.select(earlier.c.to_state)
        .where(
            earlier.c.run_id == ev.c.run_id,
            earlier.c.id <= ev.c.id,
            earlier.c.to_state.is_not(None),
        )
        .order_by(earlier.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    columns = [c for c in ev.c if c.name != "details"]
    return sa.select(
        *columns,
        sa.cast(ev.c.details, sa.Text).label("details"),
        t.run.c.workflow,
        t.run.c.subject,
        state.label("state"),
    ).join(t.run, t.run.c.id == ev.c.run_id)


def _event(row: Mapping[Any, Any]) -> OutboxEvent:
    try:
        details = json.loads(row["details"])
    except (TypeError, json.JSONDecodeError):
        details = {}
    return OutboxEvent(
        id=row["id"],
        run_id=row["run_id"],
        workflow=row["workflow"],
        subject=row["subject"],
        kind=row["kind"],
        trigger=row["trigger"],
        from_state=row["from_state"],
        to_state=row["to_state"],
        state=row["state"],
        actor=row["actor"],
        occurred_at=as_utc(row["occurred_at"]) or utcnow(),
        details=details if isinstance(details, Mapping) else {},
    )


def _insert(conn: sa.Connection) -> Any:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(t.outbox_cursor)


def _delivery_insert(conn: sa.Connection) -> Any:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(t.outbox_delivery)
