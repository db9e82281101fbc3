"""The store's reads: runs by ID, prefix or filter, their events (parsed, and as stored for
the verifier), published data, locks, pending signals and children. Each is one read-only
transaction, retried over a lost connection."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from engine import errors
from engine import schema as t
from engine import statements as q
from engine.dbretry import retried
from engine.model import Event, Run
from engine.storebase import StoreBase


class Reads(StoreBase):
    @retried
    def resolve(self, ref: str) -> Run:
        """A run by its full ID or a unique prefix of it."""
        with self._tx(read_only=True) as conn:
            rows = conn.execute(
                sa.select(t.run.c.id).where(t.run.c.id.startswith(ref, autoescape=True)).limit(2)
            ).all()
            if len(rows) == 1:
                return self._get(conn, rows[0][0])
        if not rows:
            raise errors.RunNotFound(f"no run {ref!r}")
        raise errors.RunNotFound(f"{ref!r} matches several runs; give more of the ID")

    @retried
    def runs(
        self,
        *,
        workflow: str | None = None,
        subject_prefix: str | None = None,
        state: str | None = None,
        active_only: bool = False,
        limit: int = 200,
    ) -> list[Run]:
        query = sa.select(t.run).order_by(t.run.c.created_at.desc(), t.run.c.id.desc())
        if workflow:
            query = query.where(t.run.c.workflow == workflow)
        if subject_prefix:
            query = query.where(t.run.c.subject.startswith(subject_prefix, autoescape=True))
        if state:
            query = query.where(t.run.c.state == state)
        if active_only:
            query = query.where(t.run.c.finished_at.is_(None))
        with self._tx(read_only=True) as conn:
            rows = conn.execute(query.limit(limit)).mappings().all()
        return [Run.from_row(r) for r in rows]

    @retried
    def events(self, run_id: str) -> list[Event]:
        with self._tx(read_only=True) as conn:
            rows = conn.execute(
                sa.select(t.run_event)
                .where(t.run_event.c.run_id == run_id)
                .order_by(t.run_event.c.id)
            ).mappings()
            return [Event.from_row(r) for r in rows]

    @retried
    def stored_events(self, run_id: str) -> list[dict[str, Any]]:
        """The run's events as stored, `details` as its raw text, for the verifier: a row
        whose JSON was garbled in SQL must be reported, not stop the check."""
        raw = sa.cast(t.run_event.c.details, sa.Text).label("details")
        columns = [c for c in t.run_event.c if c.name != "details"]
        with self._tx(read_only=True) as conn:
            rows = conn.execute(
                sa.select(*columns, raw)
                .where(t.run_event.c.run_id == run_id)
                .order_by(t.run_event.c.id)
            ).mappings()
            return [dict(r) for r in rows]

    @retried
    def published(self, run_id: str) -> dict[str, Any]:
        with self._tx(read_only=True) as conn:
            return self._published(conn, run_id)

    def _published(self, conn: sa.Connection, run_id: str) -> dict[str, Any]:
        rows = conn.execute(q.published, {"run_id": run_id})
        return {key: value for key, value in rows}

    @retried
    def family_lock_holder(self, run: Run, resource: str) -> str | None:
        """Who holds `resource`, unless it is the run itself or its root (then None)."""
        holder = self.lock_holder(resource)
        return None if holder in (run.id, run.root) else holder

    @retried
    def lock_holder(self, resource: str) -> str | None:
        with self._tx(read_only=True) as conn:
            row = q.lock_holder.first(conn, {"resource": resource})
        return None if row is None else str(row["run_id"])

    @retried
    def locks(self, run_id: str) -> list[str]:
        with self._tx(read_only=True) as conn:
            rows = conn.execute(
                sa.select(t.resource_lock.c.resource).where(t.resource_lock.c.run_id == run_id)
            )
            return [r[0] for r in rows]

    @retried
    def pending_signals(self, run_id: str) -> list[str]:
        with self._tx(read_only=True) as conn:
            return self._pending(conn, run_id)

    @retried
    def child(self, parent_id: str, child_key: str) -> Run | None:
        """The child a parent's step started under `child_key`, if it exists."""
        with self._tx(read_only=True) as conn:
            row = (
                conn.execute(
                    sa.select(t.run).where(
                        t.run.c.parent_run_id == parent_id, t.run.c.child_key == child_key
                    )
                )
                .mappings()
                .first()
            )
        return Run.from_row(row) if row else None

    @retried
    def children(self, parent_id: str) -> list[Run]:
        with self._tx(read_only=True) as conn:
            rows = conn.execute(
                sa.select(t.run)
                .where(t.run.c.parent_run_id == parent_id)
                .order_by(t.run.c.created_at, t.run.c.id)
            ).mappings()
            return [Run.from_row(r) for r in rows]
