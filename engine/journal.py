"""The step journal: each attempt of a step, keyed by (run, step key, attempt), written under
the run's lease (a write after the lease was lost is LeaseLost), and read back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine import statements as q
from engine.dbretry import retried
from engine.model import JournalEntry, Lease, utcnow
from engine.storebase import StoreBase, _lease_lost


class Journal(StoreBase):
    @retried
    def journal(self, run_id: str, step_key: str) -> JournalEntry | None:
        with self._tx(read_only=True) as conn:
            row = q.journal_newest.first(conn, {"run_id": run_id, "step_key": step_key})
        return JournalEntry.from_row(row) if row else None

    @retried
    def journal_entries(self, run_id: str) -> list[JournalEntry]:
        with self._tx(read_only=True) as conn:
            rows = q.journal_entries.all(conn, {"run_id": run_id})
        return [JournalEntry.from_row(r) for r in rows]

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
                if not statement.rowcount(conn, params):
                    raise _lease_lost(self._get(conn, lease.run_id))
