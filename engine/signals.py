"""Signals: sending one to a run (at most one pending of each name), a run waiting for one,
a parent's cascade to its unfinished children, and a transition consuming the oldest
pending signal of a name."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from engine import errors
from engine import schema as t
from engine import statements as q
from engine.dbretry import retried
from engine.model import Lease, utcnow
from engine.storebase import StoreBase, _event_fields, _notify


class Signals(StoreBase):
    @retried
    def set_waiting(self, lease: Lease, signal: str, reason: str) -> None:
        with self._tx() as conn:
            run = self._fenced(conn, lease)
            if run.waiting_for == signal:
                return
            waiting = _event_fields(
                lease.run_id,
                run.version,
                "waiting",
                actor=lease.owner,
                token=lease.token,
                now=utcnow(),
                details={"signal": signal, "reason": reason},
            )
            self._append(conn, run, waiting, q.wait, token=lease.token, signal=signal)

    def send_signal(self, run_id: str, name: str, payload: Mapping[str, Any], actor: str) -> bool:
        """Record a signal; False (and nothing written) if the same one is already pending."""
        now = utcnow()
        with self._tx() as conn:
            run = self._get(conn, run_id, lock=True)
            if conn.execute(q.signal_pending, {"run_id": run_id, "name": name}).first():
                return False
            conn.execute(
                q.insert_signal,
                {
                    "run_id": run_id,
                    "name": name,
                    "payload": dict(payload),
                    "sent_by": actor,
                    "created_at": now,
                },
            )
            signalled = _event_fields(
                run_id,
                run.version,
                "signal",
                actor=actor,
                token=run.lease_token,
                now=now,
                details={"signal": name, **payload},
            )
            self._append(conn, run, signalled)
            if run.detached:
                _notify(conn, run_id)
        return True

    def _signal_children(
        self, conn: sa.Connection, lease: Lease, name: str, now: dt.datetime
    ) -> None:
        children = conn.execute(
            sa.select(t.run.c.id, t.run.c.version, t.run.c.lease_token).where(
                t.run.c.parent_run_id == lease.run_id, t.run.c.finished_at.is_(None)
            )
        ).all()
        for child in children:
            if name in self._pending(conn, child.id):
                continue
            conn.execute(
                q.insert_signal,
                {
                    "run_id": child.id,
                    "name": name,
                    "payload": {},
                    "sent_by": lease.owner,
                    "created_at": now,
                },
            )
            _notify(conn, child.id)
            self._event(
                conn,
                child.id,
                child.version,
                "signal",
                actor=lease.owner,
                token=child.lease_token,
                details={"signal": name, "from_parent": lease.run_id},
            )

    def _consume(
        self,
        conn: sa.Connection,
        run_id: str,
        names: Sequence[str],
        now: dt.datetime,
        version: int,
    ) -> None:
        """Mark the oldest pending signal of each name consumed by run version `version`."""
        for name in names:
            consumed = q.consume_signal.rowcount(
                conn, {"signal_run": run_id, "signal_name": name, "now": now, "version": version}
            )
            if not consumed:
                raise errors.StaleRun(f"signal {name!r} of run {run_id} was already consumed")
