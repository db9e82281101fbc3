"""Claims, leases and timers: taking a run's lease (by ID, or the next due run for a
worker), renewing and releasing it; which runs are due; durable timers (`set_sleep`,
`wake`, `next_wake`), detaching a run for the workers, and listening for wake-ups
(PostgreSQL LISTEN/NOTIFY)."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from engine import chain, errors
from engine import schema as t
from engine import statements as q
from engine.dbretry import retried
from engine.model import Lease, Loaded, Run, as_utc, utcnow
from engine.storebase import CHANNEL, StoreBase, _event_fields, _notify

log = logging.getLogger("nodepatch.store")


class Leases(StoreBase):
    def claim_next(self, owner: str, ttl: dt.timedelta, now: dt.datetime) -> Lease | None:
        """Claim one run that is due for a worker (see `claim_due`)."""
        claimed = self.claim_due(owner, ttl, now)
        return None if claimed is None else claimed[0]

    @retried
    def claim_due(
        self, owner: str, ttl: dt.timedelta, now: dt.datetime
    ) -> tuple[Lease, Loaded] | None:
        """Claim one run that is due for a worker: detached, unfinished, not failed (unless an
        abort is pending), not waiting for a signal that has not come, its timer passed, its
        lease free or expired; with the run as loaded after the claim. PostgreSQL skips rows
        other workers are claiming (SKIP LOCKED); SQLite's writers are serialised by BEGIN
        IMMEDIATE. Three statements: the pick, the guarded UPDATE (which returns the run) and
        the lease event."""
        with self._tx() as conn:
            found = q.pick_due.first(conn, {"now": now})
            if found is None:
                return None
            run = Run.from_row(found)
            claimed = self._claim(conn, run, owner, ttl, now)
            if claimed is None:  # the row is locked (PostgreSQL) or the writer alone (SQLite)
                raise AssertionError(f"run {run.id} changed under its lock")
        return claimed

    @retried
    def due_count(self, now: dt.datetime) -> int:
        with self._tx(read_only=True) as conn:
            return int(conn.execute(q.count_due, {"now": now}).scalar_one())

    @retried
    def set_sleep(self, lease: Lease, until: dt.datetime, reason: str) -> None:
        """A durable timer: the run is not due again before `until`."""
        with self._tx() as conn:
            run = self._fenced(conn, lease)
            conn.execute(t.run.update().where(t.run.c.id == lease.run_id).values(wake_at=until))
            self._event(
                conn,
                lease.run_id,
                run.version,
                "sleeping",
                actor=lease.owner,
                token=lease.token,
                details={"until": until.isoformat(), "reason": reason},
            )

    @retried
    def wake(self, run_id: str, now: dt.datetime) -> None:
        """Make a sleeping run due now (an operator's `resume --now`, a child that ended)."""
        with self._tx() as conn:
            conn.execute(
                t.run.update()
                .where(t.run.c.id == run_id, t.run.c.wake_at > now)
                .values(wake_at=now)
            )
            _notify(conn, run_id)

    def listen(self, wake: Callable[[], None], stop: threading.Event) -> None:
        """Call `wake` whenever a run may have become due, until `stop` (PostgreSQL LISTEN on
        its own connection; returns at once on SQLite, where workers poll)."""
        if self.engine.dialect.name != "postgresql":
            return
        while not stop.is_set():
            try:
                raw = self.engine.raw_connection()
                try:
                    pg: Any = raw.driver_connection
                    pg.autocommit = True
                    pg.execute(f"LISTEN {CHANNEL}")
                    while not stop.is_set():
                        for _ in pg.notifies(timeout=1.0, stop_after=1):
                            wake()
                finally:
                    raw.invalidate()  # never hand a LISTENing connection back to the pool
            except Exception as exc:  # noqa: BLE001 - a lost connection: poll, then listen again
                log.warning("listening for wake-ups failed: %s", exc)
                stop.wait(1.0)

    @retried
    def next_wake(self, now: dt.datetime) -> dt.datetime | None:
        """When the next detached run's timer falls due, for a worker to sleep until then."""
        with self._tx(read_only=True) as conn:
            found = conn.execute(
                sa.select(sa.func.min(t.run.c.wake_at)).where(
                    t.run.c.detached.is_(True),
                    t.run.c.finished_at.is_(None),
                    t.run.c.wake_at > now,
                )
            ).scalar()
        return as_utc(found)

    @retried
    def set_detached(self, run_id: str, detached: bool) -> None:
        with self._tx() as conn:
            conn.execute(
                t.run.update().where(t.run.c.id == run_id).values(detached=detached, wake_at=None)
            )

    def claim(self, run_id: str, owner: str, ttl: dt.timedelta) -> Lease:
        """Take the run's lease; Busy if another owner holds a live one."""
        lease, _loaded = self.take(run_id, owner, ttl)
        assert lease is not None
        return lease

    @retried
    def take(
        self,
        run_id: str,
        owner: str,
        ttl: dt.timedelta,
        *,
        awake_at: dt.datetime | None = None,
    ) -> tuple[Lease | None, Loaded]:
        """Take the run's lease (Busy if another owner holds a live one) and return it with
        the run as loaded after the claim. With `awake_at`, a run asleep at that time (its
        timer later, no abort pending) is not taken: (None, the run) and nothing written."""
        now = utcnow()
        with self._tx() as conn:
            run = self._get(conn, run_id, lock=True)
            if (
                awake_at is not None
                and run.wake_at is not None
                and run.wake_at > awake_at
                and "abort" not in self._pending(conn, run_id)
            ):
                loaded = q.load.first(conn, {"run_id": run_id})
                assert loaded is not None  # read under lock just now
                return None, self._loaded(loaded)
            if run.lease_live(now) and run.lease_owner != owner:
                until = run.lease_expires_at
                raise errors.Busy(
                    f"run {run_id} is held by {run.lease_owner} (lease until {until:%H:%M:%S} UTC)"
                    if until
                    else f"run {run_id} is held by {run.lease_owner}"
                )
            claimed = self._claim(conn, run, owner, ttl, now)
            if claimed is None:
                raise errors.Busy(f"run {run_id} was claimed by another process just now")
        return claimed

    def _claim(
        self, conn: sa.Connection, run: Run, owner: str, ttl: dt.timedelta, now: dt.datetime
    ) -> tuple[Lease, Loaded] | None:
        """Lease `run` (as read in this transaction) to `owner` with the next token and chain
        its lease event: the lease and the run as loaded after the claim, or None if the run
        changed meanwhile."""
        token = run.lease_token + 1
        previous = run.lease_owner if run.lease_owner and run.lease_owner != owner else None
        leased = _event_fields(
            run.id,
            run.version,
            "lease",
            actor=owner,
            token=token,
            now=now,
            details={"taken_over_from": previous} if previous else {},
        )
        event = chain.linked(leased, self._prev_hash(conn, run))
        row = q.claim_loaded.first(
            conn,
            {
                "run_id": run.id,
                "old_token": run.lease_token,
                "prev_head": run.audit_head,
                "owner": owner,
                "new_token": token,
                "expires_at": now + ttl,
                "now": now,
                "head": event["hash"],
            },
        )
        if row is None:
            return None
        q.insert_event.rowcount(conn, event)
        return Lease(run.id, owner, token), self._loaded(row)

    @retried
    def renew(self, lease: Lease, ttl: dt.timedelta) -> bool:
        now = utcnow()
        with self._tx() as conn:
            values = {
                "run_id": lease.run_id,
                "token": lease.token,
                "expires_at": now + ttl,
                "now": now,
            }
            return q.renew.rowcount(conn, values) == 1

    @retried
    def release(self, lease: Lease) -> None:
        with self._tx() as conn:
            q.release.rowcount(conn, {"run_id": lease.run_id, "token": lease.token})
