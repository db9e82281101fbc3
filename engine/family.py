"""Drive a run and its child runs in this process, for a command that drives a parent run
(a run started without --detach): the parent's steps start children and sleep until they end;
this loop drives each child that can move, wakes the parent, and stops where nothing here can
move any more (the parent final or failed, a child waiting for an operator's signal, a timer
far away). Workers do the same across processes with `claim_next`.

A run without children is its simplest case: a CLI drive of one run, whose step gives its lease
back now and then (`yield_after_s`) and is driven again once its short sleep is over. Between two
drives this process holds no lease; if another process (a worker) claimed the run meanwhile, the
loop stops and names it rather than fight it for the run."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from dataclasses import dataclass

from engine import errors
from engine.model import Run, utcnow
from engine.runner import ABORT, Runner, Stop
from engine.store import Store

SHORT_WAIT = dt.timedelta(seconds=30)  # a parent's poll: waited for here, not handed back
NAP_S = 0.5  # the longest sleep between two looks at a stop request


@dataclass(frozen=True)
class FamilyStop:
    stop: Stop
    waiting_children: tuple[Run, ...] = ()  # children waiting for a signal nobody sent yet
    handed_to: str | None = None  # who claimed the root while this process slept


def drive_family(
    store: Store,
    runner_for: Callable[[Run], Runner],
    root_id: str,
    *,
    until: str | None = None,
    retry: bool = False,
    early: bool = False,
    sleep: Callable[[float], None],
    now: Callable[[], dt.datetime] = utcnow,
    stopping: Callable[[], bool] = lambda: False,
) -> FamilyStop:
    token: int | None = None  # the root's lease token as this process left it
    while True:
        first = token is None
        stop = _drive_root(
            store,
            runner_for,
            root_id,
            token,
            until=until,  # not yet reached: the root stops on entering it
            retry=retry and first,
            early=early and first,
        )
        if isinstance(stop, FamilyStop):
            return stop
        token = stop.run.lease_token
        if stop.reason != "sleeping":
            return FamilyStop(stop)
        if stopping():  # a short sleep is this loop's own: stopped as asked
            near = stop.run.wake_at is not None and stop.run.wake_at - now() <= SHORT_WAIT
            return FamilyStop(Stop(stop.run, "interrupted") if near else stop)
        children = [c for c in store.children(root_id) if c.finished_at is None]
        movable = [c for c in children if _movable(store, c)]
        if movable:  # a wave's node runs move at the same time, as workers would drive them
            _drive_together(runner_for, movable)
            if stopping():
                return FamilyStop(Stop(store.get(root_id), "interrupted"))
            store.wake(root_id, now())
            continue
        root = store.get(root_id)
        waiting = tuple(c for c in children if c.waiting_for and not _signalled(store, c))
        wake = root.wake_at
        if waiting or (wake is not None and wake - now() > SHORT_WAIT):
            return FamilyStop(Stop(root, "sleeping"), waiting)
        if not _nap_until(wake, sleep, now, stopping):
            return FamilyStop(Stop(store.get(root_id), "interrupted"))


def _drive_root(
    store: Store,
    runner_for: Callable[[Run], Runner],
    root_id: str,
    token: int | None,
    *,
    until: str | None,
    retry: bool,
    early: bool,
) -> Stop | FamilyStop:
    """Drive the root once; a FamilyStop naming the holder if another process has claimed it
    since this one last let it go (`token`: its lease token then; None on the first drive,
    where a live holder is the caller's Busy)."""
    root = store.get(root_id)
    if token is not None and root.lease_token != token:
        return FamilyStop(Stop(root, "sleeping"), handed_to=_holder(store, root))
    try:
        return runner_for(root).drive(root_id, until=until, retry=retry, early=early)
    except errors.Busy:  # claimed between the look above and the claim
        if token is None:
            raise
        root = store.get(root_id)
        return FamilyStop(Stop(root, "sleeping"), handed_to=_holder(store, root))


def _nap_until(
    wake: dt.datetime | None,
    sleep: Callable[[float], None],
    now: Callable[[], dt.datetime],
    stopping: Callable[[], bool],
) -> bool:
    """Sleep until `wake` in short naps, so that a stop request is honoured at once; False if
    one came. No `wake` (the timer was cleared: the run handed to the workers): no sleep, and
    the next look says whether a worker has claimed it."""
    while wake is not None and not stopping() and (left := (wake - now()).total_seconds()) > 0:
        sleep(min(left, NAP_S))
    return not stopping()


def _holder(store: Store, run: Run) -> str:
    """Who holds the run's lease now, or who last claimed it if it has been given back."""
    if run.lease_owner is not None and run.lease_live(utcnow()):
        return run.lease_owner
    claims = [e for e in store.events(run.id) if e.kind == "lease"]
    return claims[-1].actor if claims else "another process"


def _drive_together(runner_for: Callable[[Run], Runner], children: list[Run]) -> None:
    """Drive the children at the same time, a thread each, until every one has stopped; the
    first error is raised once all have. The threads are daemons, joined in short waits, so
    that an exception in this thread (a second Ctrl-C: stop at once) ends the process without
    waiting for them: their leases then expire, as a killed worker's do, and every side effect
    so far is journaled. (A ThreadPoolExecutor's threads are joined at exit: a second Ctrl-C
    would wait for every child to reach its next durable point.)"""
    runners = [runner_for(child) for child in children]
    failures: list[BaseException] = []

    def drive(runner: Runner, child: Run) -> None:
        try:
            runner.drive(child.id, early=True)
        except BaseException as exc:  # noqa: BLE001 - handed to the driving thread
            failures.append(exc)

    threads = [
        threading.Thread(target=drive, args=pair, name=f"family-{pair[1].id}", daemon=True)
        for pair in zip(runners, children, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.1)  # short joins: signal handlers run in this thread meanwhile
    if failures:
        raise failures[0]


def _movable(store: Store, child: Run) -> bool:
    """A child that driving can move now: not failed (its parent decides about those) unless
    an abort is pending, not waiting for a signal that has not come."""
    pending = store.pending_signals(child.id)
    if child.failed_from is not None:
        return ABORT in pending
    return not child.waiting_for or child.waiting_for in pending or ABORT in pending


def _signalled(store: Store, child: Run) -> bool:
    return bool(child.waiting_for and child.waiting_for in store.pending_signals(child.id))
