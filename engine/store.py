"""All the engine's SQL. Every write is one transaction that first updates the run row under a
guard (its lease token, and its state and version for transitions), so a stale writer changes
nothing and gets StaleRun or LeaseLost instead.

Every event is chained after the run's audit head (`engine.chain`): the write that appends it
moves `run.audit_head` from the event's `prev_hash` to its `hash`, guarded by the old head, in
the same UPDATE as the run's own change where there is one. The frequent statements are built
once (`engine.statements`)."""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa

from engine import chain, crashpoints, db, errors
from engine import schema as t
from engine import statements as q
from engine.model import Event, JournalEntry, Lease, Loaded, Run, as_utc, utcnow

log = logging.getLogger("nodepatch.store")
P = ParamSpec("P")
R = TypeVar("R")

DB_RETRIES = 6
DB_BACKOFF_S = 0.1
HINTS_MAX = 1024


def retried(method: Callable[P, R]) -> Callable[P, R]:
    """Retry an idempotent store call over a lost connection or a lock timeout."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        for attempt in range(DB_RETRIES):
            try:
                return method(*args, **kwargs)
            except errors.DatabaseUnavailable:
                if attempt == DB_RETRIES - 1:
                    raise
                time.sleep(DB_BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    return wrapper


def new_run_id(now: dt.datetime) -> str:
    """Sortable and short enough to type: 20261125-100312-3f9a1c."""
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _transient(exc: sa.exc.DBAPIError) -> bool:
    """A lost connection (PostgreSQL) or a lock wait that ran out (SQLite): worth a retry.
    A missing table or a syntax error is not."""
    if exc.connection_invalidated or isinstance(exc, sa.exc.InterfaceError):
        return True
    if exc.orig is not None and type(exc.orig).__module__.startswith("psycopg"):
        return True
    message = str(exc.orig).lower()
    return "locked" in message or "busy" in message


CHANNEL = "nodepatch_due"


def _notify(conn: sa.Connection, run_id: str) -> None:
    """On PostgreSQL, tell listening workers (at commit) that a run may have become due."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_notify(CHANNEL, run_id)))


def _after(loaded: Loaded, consumed: Sequence[str], published: Mapping[str, Any] | None) -> Loaded:
    """The run as a transition leaves it, from the run its UPDATE returned (RETURNING runs
    before the transaction's later writes): the oldest pending signal of each consumed name
    gone, and the values published added in the order a load reads them (by version, then
    key), each as it reads back from its JSON column."""
    signals = list(loaded.signals)
    for name in consumed:
        signals.remove(name)  # _consume has found it pending
    data = dict(loaded.published)
    new = dict(published or {})
    for key in sorted(new):
        data.pop(key, None)
        data[key] = json.loads(json.dumps(new[key]))
    return Loaded(loaded.run, signals, data)


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


class Store:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        # The audit head this store last saw of each run: a hint that lets a transition chain
        # its event without reading the run first. The UPDATE checks it; a stale hint costs a
        # read and a second UPDATE, never a wrong chain.
        self._heads: dict[str, str | None] = {}

    @contextmanager
    def _tx(self, *, read_only: bool = False) -> Iterator[sa.Connection]:
        """One transaction; a lost connection or a lock timeout becomes DatabaseUnavailable."""
        try:
            with self.engine.connect() as raw:
                conn = raw.execution_options(**{db.READ_ONLY: True}) if read_only else raw
                with conn.begin():
                    yield conn
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            reason = str(exc.orig or exc).strip().splitlines()[0]
            if not _transient(exc):
                raise errors.DatabaseError(f"database error: {reason}") from exc
            raise errors.DatabaseUnavailable(f"database unavailable: {reason}") from exc

    # ---- reads -------------------------------------------------------------------------

    @retried
    def get(self, run_id: str) -> Run:
        with self._tx(read_only=True) as conn:
            return self._get(conn, run_id)

    def _get(self, conn: sa.Connection, run_id: str, *, lock: bool = False) -> Run:
        row = conn.execute(q.run_locked if lock else q.run, {"run_id": run_id}).mappings().first()
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
            row = conn.execute(q.load[conn.dialect.name], {"run_id": run_id}).mappings().first()
        if row is None:
            raise errors.RunNotFound(f"no run {run_id!r}")
        return self._loaded(row)

    def _loaded(self, row: Mapping[Any, Any]) -> Loaded:
        published = {key: value for key, value in row["published_data"]}
        return Loaded(self._seen(Run.from_row(row)), list(row["pending_signals"]), published)

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
            return conn.execute(
                sa.select(t.resource_lock.c.run_id).where(t.resource_lock.c.resource == resource)
            ).scalar()

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

    def _pending(self, conn: sa.Connection, run_id: str) -> list[str]:
        return list(conn.execute(q.pending_signals, {"run_id": run_id}).scalars())

    @retried
    def journal(self, run_id: str, step_key: str) -> JournalEntry | None:
        with self._tx(read_only=True) as conn:
            row = (
                conn.execute(
                    sa.select(t.step_journal)
                    .where(t.step_journal.c.run_id == run_id, t.step_journal.c.step_key == step_key)
                    .order_by(t.step_journal.c.attempt.desc())
                    .limit(1)
                )
                .mappings()
                .first()
            )
        return JournalEntry.from_row(row) if row else None

    @retried
    def journal_entries(self, run_id: str) -> list[JournalEntry]:
        with self._tx(read_only=True) as conn:
            rows = conn.execute(
                sa.select(t.step_journal)
                .where(t.step_journal.c.run_id == run_id)
                .order_by(t.step_journal.c.created_at, t.step_journal.c.step_key)
            ).mappings()
            return [JournalEntry.from_row(r) for r in rows]

    # ---- writes ------------------------------------------------------------------------

    def create_run(
        self,
        *,
        workflow: str,
        workflow_version: int,
        subject: str,
        state: str,
        params: Mapping[str, Any],
        actor: str,
        parent: Run | None = None,
        child_key: str | None = None,
        detached: bool = False,
        lease: tuple[str, dt.timedelta] | None = None,
    ) -> Run:
        """A new run. The database allows one unfinished run per subject: a second one is Busy,
        naming the first. A child (`parent`, `child_key`) belongs to its parent's family. With
        `lease` (owner, ttl) the run is created leased to that owner (token 1), in the same
        transaction and with the same events as a create and a claim."""
        now = utcnow()
        run_id = new_run_id(now)
        family: dict[str, Any] = {}
        if parent is not None:
            family = {
                "parent_run_id": parent.id,
                "root_run_id": parent.root,
                "child_key": child_key,
            }
        created = _event_fields(
            run_id,
            1,
            "created",
            actor=actor,
            token=0,
            now=now,
            to_state=state,
            details={"params": dict(params), **family},
        )
        events = [chain.linked(created, chain.GENESIS)]
        leased: dict[str, Any] = {"lease_token": 0}
        if lease is not None:
            owner, ttl = lease
            taken = _event_fields(run_id, 1, "lease", actor=owner, token=1, now=now)
            events.append(chain.linked(taken, events[0]["hash"]))
            leased = {
                "lease_owner": owner,
                "lease_token": 1,
                "lease_expires_at": now + ttl,
                "heartbeat_at": now,
            }
        try:
            with self._tx() as conn:
                row = (
                    conn.execute(
                        q.create_run,
                        {
                            "id": run_id,
                            "workflow": workflow,
                            "workflow_version": workflow_version,
                            "subject": subject,
                            "state": state,
                            "version": 1,
                            "params": dict(params),
                            "created_by": actor,
                            "created_at": now,
                            "updated_at": now,
                            "audit_head": events[-1]["hash"],
                            **leased,
                            "detached": detached,
                            "wake_at": now if detached else None,
                            "parent_run_id": family.get("parent_run_id"),
                            "root_run_id": family.get("root_run_id"),
                            "child_key": family.get("child_key"),
                        },
                    )
                    .mappings()
                    .one()
                )
                for event in events:
                    conn.execute(q.insert_event, event)
                if detached:
                    _notify(conn, run_id)
        except sa.exc.IntegrityError as exc:
            active = self.runs(subject_prefix=subject, active_only=True, limit=20)
            winner = next((r for r in active if r.subject == subject), None)
            if winner is None:
                raise errors.DatabaseError(f"cannot create the run: {exc.orig}") from exc
            holder = f", held by {winner.lease_owner}" if winner.lease_live(now) else ""
            raise errors.Busy(
                f"{subject} already has the unfinished run {winner.id} ({winner.state}{holder})"
            ) from exc
        return self._seen(Run.from_row(row))

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
            query = sa.select(t.run).where(*self._due(now))
            query = query.order_by(t.run.c.wake_at, t.run.c.created_at).limit(1)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True, of=t.run)
            found = conn.execute(query).mappings().first()
            if found is None:
                return None
            run = Run.from_row(found)
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
            row = (
                conn.execute(
                    q.claim_loaded[conn.dialect.name],
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
                .mappings()
                .first()
            )
            if row is None:  # the row is locked (PostgreSQL) or the writer alone (SQLite)
                raise AssertionError(f"run {run.id} changed under its lock")
            conn.execute(q.insert_event, event)
        return Lease(run.id, owner, token), self._loaded(row)

    @retried
    def due_count(self, now: dt.datetime) -> int:
        with self._tx(read_only=True) as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(t.run).where(*self._due(now))
                ).scalar_one()
            )

    @staticmethod
    def _due(now: dt.datetime) -> list[sa.ColumnElement[bool]]:
        pending = sa.select(t.run_signal.c.id).where(
            t.run_signal.c.run_id == t.run.c.id, t.run_signal.c.consumed_at.is_(None)
        )
        abort = pending.where(t.run_signal.c.name == "abort").exists()
        awaited = pending.where(t.run_signal.c.name == t.run.c.waiting_for).exists()
        return [
            t.run.c.detached.is_(True),
            t.run.c.finished_at.is_(None),
            sa.or_(t.run.c.failed_from.is_(None), abort),
            sa.or_(t.run.c.waiting_for.is_(None), awaited, abort),
            sa.or_(t.run.c.wake_at.is_(None), t.run.c.wake_at <= now, abort),
            sa.or_(t.run.c.lease_expires_at.is_(None), t.run.c.lease_expires_at <= now),
        ]

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
                loaded = conn.execute(q.load[conn.dialect.name], {"run_id": run_id}).mappings()
                return None, self._loaded(loaded.one())
            if run.lease_live(now) and run.lease_owner != owner:
                until = run.lease_expires_at
                raise errors.Busy(
                    f"run {run_id} is held by {run.lease_owner} (lease until {until:%H:%M:%S} UTC)"
                    if until
                    else f"run {run_id} is held by {run.lease_owner}"
                )
            token = run.lease_token + 1
            previous = run.lease_owner if run.lease_owner and run.lease_owner != owner else None
            leased = _event_fields(
                run_id,
                run.version,
                "lease",
                actor=owner,
                token=token,
                now=now,
                details={"taken_over_from": previous} if previous else {},
            )
            event = chain.linked(leased, self._prev_hash(conn, run))
            updated = conn.execute(
                q.claim_loaded[conn.dialect.name],
                {
                    "run_id": run_id,
                    "old_token": run.lease_token,
                    "prev_head": run.audit_head,
                    "owner": owner,
                    "new_token": token,
                    "expires_at": now + ttl,
                    "now": now,
                    "head": event["hash"],
                },
            ).mappings()
            row = updated.first()
            if row is None:
                raise errors.Busy(f"run {run_id} was claimed by another process just now")
            conn.execute(q.insert_event, event)
        return Lease(run_id, owner, token), self._loaded(row)

    @retried
    def renew(self, lease: Lease, ttl: dt.timedelta) -> bool:
        now = utcnow()
        with self._tx() as conn:
            return (
                conn.execute(
                    q.renew,
                    {
                        "run_id": lease.run_id,
                        "token": lease.token,
                        "expires_at": now + ttl,
                        "now": now,
                    },
                ).rowcount
                == 1
            )

    @retried
    def release(self, lease: Lease) -> None:
        with self._tx() as conn:
            conn.execute(q.release, {"run_id": lease.run_id, "token": lease.token})

    def transition(
        self,
        lease: Lease,
        *,
        from_state: str,
        version: int,
        trigger: str,
        to_state: str,
        final: bool = False,
        publish: Mapping[str, Any] | None = None,
        acquire: Sequence[str] = (),
        release: Sequence[str] = (),
        consume: Sequence[str] = (),
        details: Mapping[str, Any] | None = None,
        error: Mapping[str, Any] | None = None,
        cascade: Sequence[str] = (),
    ) -> Loaded:
        """Change state (see `_transition`), retrying over a lost connection. If the lost
        connection had in fact committed, the run is already at the target: that is success.
        Returns the run as loaded after the transition."""
        for attempt in range(DB_RETRIES):
            try:
                return self._transition(
                    lease,
                    from_state=from_state,
                    version=version,
                    trigger=trigger,
                    to_state=to_state,
                    final=final,
                    publish=publish,
                    acquire=acquire,
                    release=release,
                    consume=consume,
                    details=details,
                    error=error,
                    cascade=cascade,
                )
            except errors.DatabaseUnavailable:
                if attempt == DB_RETRIES - 1:
                    raise
                time.sleep(DB_BACKOFF_S * 2**attempt)
                with suppress(errors.DatabaseUnavailable):
                    loaded = self.load(lease.run_id)
                    run = loaded.run
                    if (run.state, run.version, run.lease_token) == (
                        to_state,
                        version + 1,
                        lease.token,
                    ):
                        return loaded
        raise AssertionError("unreachable")

    def _transition(
        self,
        lease: Lease,
        *,
        from_state: str,
        version: int,
        trigger: str,
        to_state: str,
        final: bool = False,
        publish: Mapping[str, Any] | None = None,
        acquire: Sequence[str] = (),
        release: Sequence[str] = (),
        consume: Sequence[str] = (),
        details: Mapping[str, Any] | None = None,
        error: Mapping[str, Any] | None = None,
        cascade: Sequence[str] = (),
    ) -> Loaded:
        """Change state, append the audit event, publish data, take/release locks, consume
        signals and send `cascade` signals to every unfinished child, in ONE transaction,
        guarded by compare-and-set on (state, version, lease). A child that finishes makes its
        parent due at once."""
        now = utcnow()
        new_version = version + 1
        event_details = dict(details or {})
        if error:
            event_details["error"] = dict(error)
        event = _event_fields(
            lease.run_id,
            new_version,
            "transition",
            actor=lease.owner,
            token=lease.token,
            now=now,
            trigger=trigger,
            from_state=from_state,
            to_state=to_state,
            details=event_details,
        )
        change = {
            "run_id": lease.run_id,
            "from_state": from_state,
            "from_version": version,
            "token": lease.token,
            "to_state": to_state,
            "to_version": new_version,
            "now": now,
            "new_error": dict(error) if error else None,
            "new_failed_from": from_state if error else None,
        }
        with self._tx() as conn:
            update = (q.advance_final if final else q.advance)[conn.dialect.name]
            row, event = self._advance(conn, update, change, event)
            run = Run.from_row(row)
            if acquire:
                self._take_locks(conn, run, acquire, now)
            if release:
                conn.execute(q.release_locks, {"run_id": lease.run_id, "resources": list(release)})
            self._consume(conn, lease.run_id, consume, now, new_version)
            for key, value in (publish or {}).items():
                self._publish(
                    conn,
                    lease.run_id,
                    step=from_state,
                    key=key,
                    value=value,
                    version=new_version,
                    now=now,
                )
            conn.execute(q.insert_event, event)
            for name in cascade:
                self._signal_children(conn, lease, name, now)
            if final and run.parent_run_id:
                conn.execute(
                    t.run.update()
                    .where(
                        t.run.c.id == run.parent_run_id,
                        sa.or_(t.run.c.wake_at.is_(None), t.run.c.wake_at > now),
                    )
                    .values(wake_at=now)
                )
                _notify(conn, run.parent_run_id)
            crashpoints.hit(f"before_commit:{from_state}->{to_state}")
        crashpoints.hit(f"after_commit:{from_state}->{to_state}")
        return _after(self._loaded(row), consume, publish)

    def _advance(
        self, conn: sa.Connection, update: sa.Update, change: dict[str, Any], event: dict[str, Any]
    ) -> tuple[sa.RowMapping, dict[str, Any]]:
        """The guarded UPDATE of a transition, which also moves the audit head to its event;
        the run as it is now (loaded) and the event, chained. The previous head is the hint
        when there is one; when the UPDATE finds the run changed, the run is read (locked): another
        writer's transition or lease is StaleRun or LeaseLost, another event (a signal sent
        meanwhile) only moved the head, and the UPDATE is repeated after that head."""
        hint = self._heads.get(change["run_id"])
        if hint is not None:
            linked = chain.linked(event, hint)
            row = conn.execute(update, {**change, "prev_head": hint, "head": linked["hash"]})
            found = row.mappings().first()
            if found is not None:
                return found, linked
        run = self._get(conn, change["run_id"], lock=True)
        if (run.state, run.version, run.lease_token) != (
            change["from_state"],
            change["from_version"],
            change["token"],
        ):
            raise self._stale(run, change["token"], change["from_state"], change["from_version"])
        linked = chain.linked(event, self._prev_hash(conn, run))
        row = conn.execute(update, {**change, "prev_head": run.audit_head, "head": linked["hash"]})
        found = row.mappings().first()
        if found is None:  # the run is locked: another writer cannot have changed it
            raise AssertionError(f"run {run.id} changed under its lock")
        return found, linked

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

    @retried
    def journal_write(
        self,
        lease: Lease,
        *,
        step_key: str,
        attempt: int,
        state: str,
        status: str,
        external_ref: str | None = None,
        result: Mapping[str, Any] | None = None,
    ) -> None:
        """Insert or update one journal attempt, fenced by the lease."""
        params = {
            "run_id": lease.run_id,
            "token": lease.token,
            "now": utcnow(),
            "step_key": step_key,
            "attempt": attempt,
            "journal_state": state,
            "status": status,
            "external_ref": external_ref,
            "result": None if result is None else dict(result),
        }
        with self._tx() as conn:
            for statement in q.journal[conn.dialect.name]:
                if not conn.execute(statement, params).rowcount:
                    raise _lease_lost(self._get(conn, lease.run_id))

    # ---- helpers -----------------------------------------------------------------------

    def _fenced(self, conn: sa.Connection, lease: Lease) -> Run:
        """Touch the run row under our lease token (serialising writers) or raise LeaseLost."""
        row = conn.execute(
            q.fence, {"run_id": lease.run_id, "token": lease.token, "now": utcnow()}
        ).mappings()
        found = row.first()
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
        update: sa.Update = q.move_head,
        **values: Any,
    ) -> None:
        """Chain `event` after the audit head of `run` (read in this transaction, under lock
        or after a fenced write): `update` moves the head, guarded by it, with `values`; then
        the event is inserted."""
        linked = chain.linked(event, self._prev_hash(conn, run))
        moved = conn.execute(
            update,
            {**values, "run_id": run.id, "prev_head": run.audit_head, "head": linked["hash"]},
        ).rowcount
        if moved != 1:
            raise errors.StaleRun(
                f"run {run.id} changed while this process wrote to it; nothing was written"
            )
        conn.execute(q.insert_event, linked)
        self._heads[run.id] = linked["hash"]

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

    def _take_locks(
        self, conn: sa.Connection, run: Run, resources: Sequence[str], now: dt.datetime
    ) -> None:
        """Take each lock for the run's family: a lock held by the run's root (or by the run
        itself) is already ours; one held by anyone else is LockHeld."""
        run_id = run.id
        for resource in resources:
            holder = self._lock_holder(conn, resource)
            if holder in (run_id, run.root):
                continue
            if holder is not None:
                raise errors.LockHeld(resource, holder)
            try:
                with conn.begin_nested():
                    conn.execute(
                        q.insert_lock, {"resource": resource, "run_id": run_id, "acquired_at": now}
                    )
            except sa.exc.IntegrityError as exc:
                holder = self._lock_holder(conn, resource) or "another run"
                raise errors.LockHeld(resource, holder) from exc

    def _lock_holder(self, conn: sa.Connection, resource: str) -> str | None:
        return conn.execute(q.lock_holder, {"resource": resource}).scalar()

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
            consumed = conn.execute(
                q.consume_signal,
                {"signal_run": run_id, "signal_name": name, "now": now, "version": version},
            ).rowcount
            if not consumed:
                raise errors.StaleRun(f"signal {name!r} of run {run_id} was already consumed")

    def _publish(
        self,
        conn: sa.Connection,
        run_id: str,
        *,
        step: str,
        key: str,
        value: Any,
        version: int,
        now: dt.datetime,
    ) -> None:
        """Publish `key` (insert, or replace the run's earlier value of it)."""
        conn.execute(
            q.publish[conn.dialect.name],
            {
                "run_id": run_id,
                "key": key,
                "step": step,
                "value": value,
                "run_version": version,
                "published_at": now,
            },
        )

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
