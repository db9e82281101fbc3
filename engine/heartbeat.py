"""The heartbeat: one thread per store renews the lease of every run its drives hold.

A drive registers its lease for as long as it runs (`Heartbeats.holding`) and gets a `Beat`,
whose `check()` raises LeaseLost once a renewal found the lease gone. Each lease is renewed
every ttl/3, counted from its registration or the start of its last renewal. A lease whose
renewal matches no row (taken over: its token moved on) is lost and not renewed again; a
database that is unavailable is logged and tried again at the lease's next beat.

The thread starts at the first registration and is a daemon. It sleeps until the next renewal
falls due, for good while no lease is held (a registration wakes it), and it renews without
holding the lock, so a drive never waits for another drive's renewal to register or leave.
Leaving `holding` waits only for an in-flight renewal of its own lease: once it returns, that
lease is never renewed again, so no renewal can land after the drive's release (the token
fences a renewal against a takeover, but a release keeps the token: a renewal after it would
set a fresh expiry on the released run, and a worker's claim waits for that expiry).

The store holds its `Heartbeats`; they hold the store weakly, and the thread ends when the
store is collected. A process forked from one whose heartbeat ran starts afresh: the child has
no thread and none of the parent's leases.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from engine import errors
from engine.model import Lease

if TYPE_CHECKING:
    from engine.store import Store

log = logging.getLogger("nodepatch.engine")

THREAD_NAME = "nodepatch-heartbeat"


class Beat:
    """One drive's hold on its lease: `check()` raises once the heartbeat lost the lease."""

    def __init__(self, store: Store, lease: Lease, ttl: float, due: float) -> None:
        self.store, self.lease, self.ttl = store, lease, ttl
        self.lost = False
        self.due = due  # when the next renewal falls due (the heartbeat's clock)
        self.renewing = False  # a renewal of this lease is in flight

    def check(self) -> None:
        if self.lost:
            raise errors.lease_lost(
                self.lease.run_id, self.store.get(self.lease.run_id).lease_owner
            )


class Heartbeats:
    """The leases a store's drives hold, renewed by one thread (started at the first
    registration). `clock` is monotonic seconds."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = weakref.ref(store)
        self._clock = clock
        weakref.finalize(store, self._close).atexit = False  # at exit, the daemon just stops
        self._reset()

    def _reset(self) -> None:
        """No thread and no lease: at creation, and in a forked child (the parent's lock may
        have been held at the fork, its thread does not exist here)."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the thread: a registration, or closing
        self._done = threading.Condition(self._lock)  # a leaving drive: a renewal finished
        self._held: set[Beat] = set()  # the leases to renew (not the lost ones)
        self._thread: threading.Thread | None = None
        self._sleeping_until = math.inf  # the thread's wake-up time while it waits
        self._closed = False

    @contextmanager
    def holding(self, lease: Lease, ttl: float) -> Iterator[Beat]:
        """Renew `lease` every ttl/3 until the block ends; after it, no renewal of it is in
        flight and none follows."""
        beat = self._register(lease, ttl)
        try:
            yield beat
        finally:
            self._unregister(beat)

    def _register(self, lease: Lease, ttl: float) -> Beat:
        store = self._store()
        assert store is not None, "heartbeats of a collected store"
        if self._pid != os.getpid():
            self._reset()
        beat = Beat(store, lease, ttl, self._clock() + ttl / 3)
        with self._lock:
            self._held.add(beat)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()
            elif beat.due < self._sleeping_until:
                self._wake.notify()
        return beat

    def _unregister(self, beat: Beat) -> None:
        with self._lock:
            self._held.discard(beat)
            while beat.renewing:
                self._done.wait()
        # The thread may still wake at this lease's due time: it finds nothing due, and sleeps
        # until the next one (for good if none is held).

    def _close(self) -> None:
        """The store is gone: the thread ends."""
        with self._lock:
            self._closed = True
            self._wake.notify()

    def _run(self) -> None:
        with self._lock:
            while not self._closed:
                self._beat_or_sleep()

    def _beat_or_sleep(self) -> None:
        """Renew the lease due first, or sleep until it falls due (for good if none is held)."""
        beat = min(self._held, key=lambda b: b.due, default=None)
        if beat is not None and beat.due <= self._clock():
            self._renew_unlocked(beat)
            return
        due = math.inf if beat is None else beat.due
        beat = None  # a sleeping thread keeps no drive's beat, nor its store, alive
        self._sleeping_until = due
        self._wake.wait(None if due == math.inf else due - self._clock())
        self._sleeping_until = -math.inf  # awake: it looks again before it sleeps

    def _renew_unlocked(self, beat: Beat) -> None:
        """Renew one lease with the lock released (called, and returning, with it held)."""
        beat.renewing = True
        started = self._clock()
        self._lock.release()
        try:
            kept = _renew(beat)
        finally:
            self._lock.acquire()
            beat.renewing = False
            self._done.notify_all()
        beat.due = started + beat.ttl / 3
        if not kept:
            beat.lost = True
            self._held.discard(beat)


def _renew(beat: Beat) -> bool:
    """One renewal: False once the lease is lost. A failure is logged and counts as kept: the
    next beat tries again."""
    try:
        return beat.store.renew(beat.lease, dt.timedelta(seconds=beat.ttl))
    except errors.DatabaseUnavailable as exc:  # the next beat tries again
        log.warning("lease renewal failed: %s", exc, extra={"action": "renew_failed"})
    except Exception:  # one lease's error must not stop the other leases' renewals
        log.exception("lease renewal failed", extra={"action": "renew_failed"})
    return True
