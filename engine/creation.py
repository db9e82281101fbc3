"""Creating a run: its ID, the row and its `created` event (and, when it is created leased,
its `lease` event) in one transaction; a second unfinished run of the same subject is Busy,
naming the first."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from engine import chain, errors
from engine import statements as q
from engine.model import Run, utcnow
from engine.reads import Reads
from engine.storebase import _event_fields, _notify

ID_DRAWS = 5  # 24 random bits a second: a thousand runs in one second collide at ~3%


def new_run_id(now: dt.datetime) -> str:
    """Sortable and short enough to type: 20261125-100312-3f9a1c."""
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


class Creation(Reads):
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
        transaction and with the same events as a create and a claim. Run IDs are random within
        their second: an ID another run took in the same second is drawn again."""
        now = utcnow()
        family: dict[str, Any] = {}
        if parent is not None:
            family = {
                "parent_run_id": parent.id,
                "root_run_id": parent.root,
                "child_key": child_key,
            }
        leased: dict[str, Any] = {"lease_token": 0}
        if lease is not None:
            owner, ttl = lease
            leased = {
                "lease_owner": owner,
                "lease_token": 1,
                "lease_expires_at": now + ttl,
                "heartbeat_at": now,
            }
        values = {
            **q.RUN_UNSET,
            "workflow": workflow,
            "workflow_version": workflow_version,
            "subject": subject,
            "state": state,
            "version": 1,
            "params": dict(params),
            "created_by": actor,
            "created_at": now,
            "updated_at": now,
            **leased,
            "detached": detached,
            "wake_at": now if detached else None,
            **family,
        }
        details = {"params": dict(params), **family}
        for _ in range(ID_DRAWS):
            run_id = new_run_id(now)
            created = _event_fields(
                run_id, 1, "created", actor=actor, token=0, now=now, to_state=state, details=details
            )
            events = [chain.linked(created, chain.GENESIS)]
            if lease is not None:
                taken = _event_fields(run_id, 1, "lease", actor=lease[0], token=1, now=now)
                events.append(chain.linked(taken, events[0]["hash"]))
            run = self._insert({**values, "id": run_id, "audit_head": events[-1]["hash"]}, events)
            if run is not None:
                return run
        raise errors.DatabaseError(
            f"cannot create the run: {ID_DRAWS} run IDs drawn were all taken"
        )

    def _insert(self, values: dict[str, Any], events: list[dict[str, Any]]) -> Run | None:
        """The run's row and its first events, in one transaction; None if its ID is taken."""
        try:
            with self._tx() as conn:
                row = q.create_run.first(conn, values)
                assert row is not None  # an INSERT ... RETURNING returns its row
                for event in events:
                    q.insert_event.rowcount(conn, event)
                if values["detached"]:
                    _notify(conn, values["id"])
        except sa.exc.IntegrityError as exc:
            subject = values["subject"]
            active = self.runs(subject_prefix=subject, active_only=True, limit=20)
            winner = next((r for r in active if r.subject == subject), None)
            if winner is None and self._taken(values["id"]):
                return None
            if winner is None:
                raise errors.DatabaseError(f"cannot create the run: {exc.orig}") from exc
            live = winner.lease_live(values["created_at"])
            holder = f", held by {winner.lease_owner}" if live else ""
            raise errors.Busy(
                f"{subject} already has the unfinished run {winner.id} ({winner.state}{holder})"
            ) from exc
        return self._seen(Run.from_row(row))

    def _taken(self, run_id: str) -> bool:
        with self._tx(read_only=True) as conn:
            return q.run.first(conn, {"run_id": run_id}) is not None
