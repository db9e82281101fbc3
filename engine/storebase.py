"""The ground every part of the store stands on: `StoreBase` holds the engine, the audit-head
hints and one transaction (`_tx`); reading one run (`get`, `load`, its pending signals); and
appending to a run's audit chain (`_fenced`, `_append`, `_event`, `_prev_hash`, `_stale`),
with the event fields, the LeaseLost error and the PostgreSQL wake-up notice those writes
share. The parts (`engine.reads`, `engine.leases`, ...) are mixins over it."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from engine import chain, db, errors
from engine import statements as q
from engine.compiled import Hot
from engine.dbretry import _transient, retried
from engine.model import Lease, Loaded, Run, utcnow

HINTS_MAX = 1024

CHANNEL = "nodepatch_due"
_NOTIFY = Hot(sa.select(sa.func.pg_notify(sa.bindparam("channel"), sa.bindparam("run_id"))))


def _notify(conn: sa.Connection, run_id: str) -> None:
    """On PostgreSQL, tell listening workers (at commit) that a run may have become due."""
    if conn.dialect.name == "postgresql":
        _NOTIFY.first(conn, {"channel": CHANNEL, "run_id": run_id})


def _lease_lost(run: Run) -> errors.LeaseLost:
    """The error of a holder whose lease was taken over, naming who holds the run now."""
    return errors.lease_lost(run.id, run.lease_owner)


def _event_fields(
    run_id: str,
    run_version: int,
    kind: str,
    *,
    actor: str,
    token: int,
    now: dt.datetime,
    trigger: str | None = None,
    from_state: str | None = None,
    to_state: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An event's fields, before it is chained; `details` as they will read back (plain JSON)."""
    return {
        "run_id": run_id,
        "run_version": run_version,
        "kind": kind,
        "trigger": trigger,
        "from_state": from_state,
        "to_state": to_state,
        "actor": actor,
        "lease_token": token,
        "occurred_at": now,
        "details": json.loads(json.dumps(dict(details), default=str)) if details else {},
    }


class StoreBase:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        # The audit head this store last saw of each run: a hint that lets a transition chain
        # its event without reading the run first. The UPDATE checks it; a stale hint costs a
        # read and a second UPDATE, never a wrong chain.
        self._heads: dict[str, str | None] = {}
        self._pin = threading.local()  # .conn: this thread's pinned connection (`pinned`)
        self._pinning = threading.Lock()

    @contextmanager
    def pinned(self) -> Iterator[None]:
        """Run this thread's transactions on one pooled connection until the block ends (a
        drive: its transitions, journal writes and reads), rather than checking one out of
        the pool and back for each: that round trip through the pool cost a sixth of a
        transition's CPU. Nested blocks share the outer one's connection. Pins take at most
        the pool's base size (a worker's many slots, say): past it, a block pins nothing and
        its transactions check connections out as usual, from the pool's overflow."""
        pool = self.engine.pool
        if getattr(self._pin, "conn", None) is not None or not isinstance(pool, sa.pool.QueuePool):
            yield
            return
        with self._pinning:  # the count and the checkout together: pins stop at the size
            conn = self.engine.connect() if pool.checkedout() < pool.size() else None
        if conn is None:
            yield
            return
        self._pin.conn = conn
        try:
            yield
        finally:
            self._pin.conn = None
            conn.close()

    @contextmanager
    def _tx(self, *, read_only: bool = False) -> Iterator[sa.Connection]:
        """One transaction; a lost connection or a lock timeout becomes DatabaseUnavailable.
        It runs on the thread's pinned connection when there is one and it is free (a
        transaction opened inside another gets a connection of its own, as without a pin)."""
        try:
            pin: sa.Connection | None = getattr(self._pin, "conn", None)
            if pin is not None and not pin.in_transaction():
                conn = pin.execution_options(**{db.READ_ONLY: read_only})
                with conn.begin():
                    yield conn
                return
            with self.engine.connect() as raw:
                conn = raw.execution_options(**{db.READ_ONLY: True}) if read_only else raw
                with conn.begin():
                    yield conn
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            reason = str(exc.orig or exc).strip().splitlines()[0]
            if not _transient(exc):
                raise errors.DatabaseError(f"database error: {reason}") from exc
            raise errors.DatabaseUnavailable(f"database unavailable: {reason}") from exc

    # ---- one run -----------------------------------------------------------------------

    @retried
    def get(self, run_id: str) -> Run:
        with self._tx(read_only=True) as conn:
            return self._get(conn, run_id)

    def _get(self, conn: sa.Connection, run_id: str, *, lock: bool = False) -> Run:
        row = (q.run_locked if lock else q.run).first(conn, {"run_id": run_id})
        if row is None:
            raise errors.RunNotFound(f"no run {run_id!r}")
        return self._seen(Run.from_row(row))

    def _seen(self, run: Run) -> Run:
        """Note the run's audit head as the hint for its next transition."""
        if len(self._heads) >= HINTS_MAX:
            self._heads.clear()
        self._heads[run.id] = run.audit_head
        return run

    @retried
    def load(self, run_id: str) -> Loaded:
        """The run, its pending signals and its published data, read together (one
        statement). A transition and a claim return the same, so the runner reads this only
        when a worker hands it a run."""
        with self._tx(read_only=True) as conn:
            row = q.load.first(conn, {"run_id": run_id})
        if row is None:
            raise errors.RunNotFound(f"no run {run_id!r}")
        return self._loaded(row)

    def _loaded(self, row: Mapping[Any, Any]) -> Loaded:
        published = {key: value for key, value in row["published_data"]}
        return Loaded(self._seen(Run.from_row(row)), list(row["pending_signals"]), published)

    def _pending(self, conn: sa.Connection, run_id: str) -> list[str]:
        return list(conn.execute(q.pending_signals, {"run_id": run_id}).scalars())

    # ---- helpers -----------------------------------------------------------------------

    def _fenced(self, conn: sa.Connection, lease: Lease) -> Run:
        """Touch the run row under our lease token (serialising writers) or raise LeaseLost."""
        found = q.fence.first(conn, {"run_id": lease.run_id, "token": lease.token, "now": utcnow()})
        if found is None:
            raise _lease_lost(self._get(conn, lease.run_id))
        return self._seen(Run.from_row(found))

    def _stale(self, run: Run, token: int, state: str, version: int) -> errors.EngineError:
        """Why a transition from (state, version) under lease `token` found the run changed."""
        if run.lease_token != token:
            return _lease_lost(run)
        return errors.StaleRun(
            f"run {run.id} is at {run.state} v{run.version}, not {state} v{version}: "
            "another writer advanced it; nothing was overwritten"
        )

    def _prev_hash(self, conn: sa.Connection, run: Run) -> str:
        """The hash the run's next event follows: its audit head (runs from before the head
        was recorded, migration 0002: the hash of their last event)."""
        if run.audit_head is not None:
            return run.audit_head
        return conn.execute(q.last_hash, {"run_id": run.id}).scalar() or chain.GENESIS

    def _append(
        self,
        conn: sa.Connection,
        run: Run,
        event: Mapping[str, Any],
        update: Hot = q.move_head,
        **values: Any,
    ) -> None:
        """Chain `event` after the audit head of `run` (read in this transaction, under lock
        or after a fenced write): `update` moves the head, guarded by it, with `values`; then
        the event is inserted."""
        linked = chain.linked(event, self._prev_hash(conn, run))
        moved = update.rowcount(
            conn, {**values, "run_id": run.id, "prev_head": run.audit_head, "head": linked["hash"]}
        )
        if moved != 1:
            raise errors.StaleRun(
                f"run {run.id} changed while this process wrote to it; nothing was written"
            )
        q.insert_event.rowcount(conn, linked)
        self._heads[run.id] = linked["hash"]

    def _event(
        self,
        conn: sa.Connection,
        run_id: str,
        run_version: int,
        kind: str,
        *,
        actor: str,
        token: int,
        trigger: str | None = None,
        from_state: str | None = None,
        to_state: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Append an event to a run this transaction has not read: the run is read under lock
        for its head. (Writes that hold the run already use `_append`.)"""
        run = self._get(conn, run_id, lock=True)
        event = _event_fields(
            run_id,
            run_version,
            kind,
            actor=actor,
            token=token,
            now=utcnow(),
            trigger=trigger,
            from_state=from_state,
            to_state=to_state,
            details=details,
        )
        self._append(conn, run, event)
