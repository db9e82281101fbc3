"""All the engine's SQL. Every write is one transaction that first updates the run row under a
guard (its lease token, and its state and version for transitions), so a stale writer changes
nothing and gets StaleRun or LeaseLost instead.

Every event is chained after the run's audit head (`engine.chain`): the write that appends it
moves `run.audit_head` from the event's `prev_hash` to its `hash`, guarded by the old head, in
the same UPDATE as the run's own change where there is one. The frequent statements are built
once (`engine.statements`).

The store is one class composed of parts, each a module: `engine.storebase` (the
transaction, one run's read, the audit-chain append), `engine.reads`, `engine.creation`,
`engine.leases` (claims, leases, timers, wake-ups), `engine.signals`, `engine.advance`
(transitions, locks, published data) and `engine.journal`; `engine.dbretry` retries calls
over a lost connection."""

from __future__ import annotations

import sqlalchemy as sa

from engine.advance import Advance
from engine.creation import Creation, new_run_id
from engine.dbretry import DB_BACKOFF_S, DB_RETRIES, retried
from engine.heartbeat import Heartbeats
from engine.journal import Journal
from engine.leases import Leases
from engine.reads import Reads
from engine.signals import Signals
from engine.storebase import CHANNEL, HINTS_MAX

__all__ = [
    "CHANNEL",
    "DB_BACKOFF_S",
    "DB_RETRIES",
    "HINTS_MAX",
    "Store",
    "new_run_id",
    "retried",
]


class Store(Creation, Reads, Leases, Advance, Signals, Journal):
    """The engine's store: every read and write of runs, their events, signals, locks,
    published data and journal (see the parts this class is composed of). Its `heartbeats`
    renew the leases its drives hold, on one thread."""

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(engine)
        self.heartbeats = Heartbeats(self)
