"""`nodepatch worker`: drive due runs unattended, several at once, on one or many machines.

Each slot claims one due run (see `Store.claim_next`: SKIP LOCKED on PostgreSQL, BEGIN
IMMEDIATE on SQLite), drives it to its next stop (final, failed, waiting for a signal, asleep on
a timer) and claims the next. Idle slots take turns: one at a time looks for work and naps until
a wake-up or its poll interval, so an idle worker costs the database the same however many
slots it has. A stop request (SIGTERM) ends claiming, and in-flight runs stop at
their next durable point and give their leases back. A worker that dies loses nothing: its
leases expire and other workers take the runs over.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from engine import errors
from engine.model import Lease, Loaded, Run, utcnow
from engine.runner import Runner
from engine.store import Store

log = logging.getLogger("nodepatch.worker")

ERROR_BACKOFF = dt.timedelta(seconds=60)
TURN_WAIT_S = 0.1  # how often a slot waiting for its turn looks at a stop request


@dataclass(frozen=True)
class WorkerSettings:
    concurrency: int = 2
    lease_ttl_s: float = 30.0
    poll_interval_s: float = 1.0
    yield_after_s: float = 30.0  # a step waits at most this long in one go, then sleeps


class Worker:
    def __init__(
        self,
        store: Store,
        runner_for: Callable[[Run], Runner],
        settings: WorkerSettings,
        *,
        owner: str,
        now: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.store, self.runner_for, self.settings = store, runner_for, settings
        self.owner, self.now = owner, now
        self.stop = threading.Event()
        self.wakeup = threading.Event()  # set by LISTEN/NOTIFY: something may be due
        self.driven = 0
        self._busy = 0
        self._lock = threading.Lock()
        # The turn to look for due runs: one idle slot at a time claims or naps (a wake-up
        # ends its nap), so that the database sees one poll per interval from this process
        # however many slots wait; a slot that claimed a run hands the turn on at once.
        self._turn = threading.Lock()

    def request_stop(self) -> None:
        """No new claims; in-flight runs stop at their next durable point."""
        self.stop.set()
        self.wakeup.set()

    def run(self, *, until_idle: bool = False, grace_s: float = 30.0) -> None:
        """Drive runs until stopped (or, with `until_idle`, until nothing is due and nothing is
        in flight). After a stop request, waits up to `grace_s` for in-flight runs."""
        slots = [
            threading.Thread(target=self._slot, args=(i, until_idle), name=f"worker-{i}")
            for i in range(max(self.settings.concurrency, 1))
        ]
        listener = threading.Thread(
            target=self.store.listen, args=(self.wakeup.set, self.stop), name="worker-listen"
        )
        listener.daemon = True
        listener.start()
        for slot in slots:
            slot.daemon = True
            slot.start()
        while any(s.is_alive() for s in slots) and not self.stop.is_set():
            self.stop.wait(0.1)
        deadline = threading.Event()
        timer = threading.Timer(grace_s, deadline.set)
        timer.daemon = True
        timer.start()
        for slot in slots:
            while slot.is_alive() and not deadline.is_set():
                slot.join(0.1)
        timer.cancel()

    def _slot(self, index: int, until_idle: bool) -> None:
        owner = f"{self.owner}#{index}"
        ttl = dt.timedelta(seconds=self.settings.lease_ttl_s)
        while not self.stop.is_set():
            if not self._turn.acquire(timeout=TURN_WAIT_S):  # another idle slot is looking
                continue
            try:
                if self.stop.is_set():  # asked while this slot waited for its turn
                    return
                try:
                    claimed = self.store.claim_due(owner, ttl, self.now())
                except errors.DatabaseError as exc:
                    log.warning("claiming failed: %s", exc, extra={"action": "claim_failed"})
                    self.stop.wait(self.settings.poll_interval_s)
                    continue
                if claimed is None:
                    if until_idle and self._idle():
                        return
                    self._nap()
                    continue
            finally:
                self._turn.release()
            with self._lock:
                self._busy += 1
            try:
                self._drive(*claimed, owner)
            finally:
                with self._lock:
                    self._busy -= 1
                    self.driven += 1

    def _nap(self) -> None:
        """Wait for a wake-up (PostgreSQL NOTIFY), the next timer, or the poll interval."""
        timeout = self.settings.poll_interval_s
        upcoming = self.store.next_wake(self.now())
        if upcoming is not None:
            timeout = min(timeout, max((upcoming - self.now()).total_seconds(), 0.01))
        if self.wakeup.wait(timeout):
            self.wakeup.clear()

    def _idle(self) -> bool:
        """Nothing in flight, nothing due, and no timer about to fall due (a step that gave its
        slot back for a poll interval is still in flight)."""
        with self._lock:
            if self._busy:
                return False
        now = self.now()
        if self.store.due_count(now):
            return False
        upcoming = self.store.next_wake(now)
        soon = now + dt.timedelta(seconds=self.settings.poll_interval_s + 1)
        return upcoming is None or upcoming > soon

    def _drive(self, lease: Lease, loaded: Loaded, owner: str) -> None:
        try:
            run = loaded.run
            runner = self.runner_for(run)
            runner.actor = owner
            runner.stop_requested = self.stop
            runner.settings = replace(runner.settings, yield_after_s=self.settings.yield_after_s)
            stop = runner.drive(run.id, lease=lease, loaded=loaded)
            log.info(
                "run %s stopped: %s in %s",
                run.id,
                stop.reason,
                stop.run.state,
                extra={"action": "run_stopped", "run_id": run.id, "state": stop.run.state},
            )
        except errors.LeaseLost:
            return  # another worker took it over: nothing of ours to clean up
        except errors.EngineError as exc:  # e.g. a workflow this build does not know
            log.error(
                "run %s cannot be driven here: %s",
                lease.run_id,
                exc,
                extra={"action": "run_error", "run_id": lease.run_id},
            )
            try:
                self.store.set_sleep(lease, self.now() + ERROR_BACKOFF, f"worker error: {exc}")
            finally:
                self.store.release(lease)
