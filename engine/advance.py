"""A run's transitions: the guarded UPDATE of (state, version, lease) that moves the run and
its audit head, with its locks, consumed signals, published data, cascaded signals and the
parent's wake-up, all in one transaction; retried over a lost connection, where a commit
that did land counts as success."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import Any

import sqlalchemy as sa

from engine import chain, crashpoints, errors
from engine import schema as t
from engine import statements as q
from engine.compiled import Hot
from engine.dbretry import DB_BACKOFF_S, DB_RETRIES
from engine.model import Lease, Loaded, Run, utcnow
from engine.signals import Signals
from engine.storebase import _event_fields, _notify


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


class Advance(Signals):
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
            update = q.advance_final if final else q.advance
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
            q.insert_event.rowcount(conn, event)
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
        self, conn: sa.Connection, update: Hot, change: dict[str, Any], event: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The guarded UPDATE of a transition, which also moves the audit head to its event;
        the run as it is now (loaded) and the event, chained. The previous head is the hint
        when there is one; when the UPDATE finds the run changed, the run is read (locked): another
        writer's transition or lease is StaleRun or LeaseLost, another event (a signal sent
        meanwhile) only moved the head, and the UPDATE is repeated after that head."""
        hint = self._heads.get(change["run_id"])
        if hint is not None:
            linked = chain.linked(event, hint)
            found = update.first(conn, {**change, "prev_head": hint, "head": linked["hash"]})
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
        found = update.first(conn, {**change, "prev_head": run.audit_head, "head": linked["hash"]})
        if found is None:  # the run is locked: another writer cannot have changed it
            raise AssertionError(f"run {run.id} changed under its lock")
        return found, linked

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
            taken = {"resource": resource, "run_id": run_id, "acquired_at": now}
            if not q.insert_lock.rowcount(conn, taken):  # taken meanwhile (PostgreSQL)
                raise errors.LockHeld(resource, self._lock_holder(conn, resource) or "another run")

    def _lock_holder(self, conn: sa.Connection, resource: str) -> str | None:
        row = q.lock_holder.first(conn, {"resource": resource})
        return None if row is None else str(row["run_id"])

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
        q.publish.rowcount(
            conn,
            {
                "run_id": run_id,
                "key": key,
                "step": step,
                "value": value,
                "run_version": version,
                "published_at": now,
            },
        )
