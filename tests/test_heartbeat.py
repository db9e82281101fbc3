"""The store's heartbeat: one thread renews every lease its drives hold, against real databases
(the expiry each renewal writes, and the statements each thread sends)."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from engine import errors
from engine import schema as t
from engine.context import StepContext
from engine.heartbeat import THREAD_NAME
from engine.model import Lease
from engine.runner import Runner, RunnerSettings
from engine.store import Store
from engine.workflow import Advance, StepResult, Transition, Workflow

TTL_S = 0.3
TTL = dt.timedelta(seconds=TTL_S)
PAST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def heartbeat_threads() -> set[threading.Thread]:
    return {th for th in threading.enumerate() if th.name == THREAD_NAME}


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


def leased(store: Store, count: int) -> list[Lease]:
    """`count` runs, each leased (for TTL) to its own owner."""
    leases = []
    for i in range(count):
        run = store.create_run(
            workflow="toy", workflow_version=1, subject=f"x/{i}", state="A", params={}, actor="t"
        )
        leases.append(store.claim(run.id, f"t@h:{i}", TTL))
    return leases


def expiry(store: Store, lease: Lease) -> dt.datetime | None:
    return store.get(lease.run_id).lease_expires_at


def later(store: Store, lease: Lease, than: dt.datetime) -> bool:
    found = expiry(store, lease)
    return found is not None and found > than


def renewed(store: Store, lease: Lease) -> None:
    """Wait until the lease's expiry has moved forward twice (two renewals)."""
    for _ in range(2):
        before = expiry(store, lease)
        assert before is not None
        wait_for(functools.partial(later, store, lease, before))


class Statements:
    """The statements sent on an engine, with the thread that sent each."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.sent: list[tuple[str, threading.Thread]] = []

    def _record(self, *args: Any) -> None:
        self.sent.append((args[2], threading.current_thread()))

    def renewals(self) -> list[threading.Thread]:
        return [th for sql, th in self.sent if "SET lease_expires_at" in sql]

    def __enter__(self) -> Statements:
        sa.event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._record)


def test_concurrent_drives_leases_are_all_renewed_by_one_thread(engine: sa.Engine) -> None:
    """Three drives on their own threads hold their leases at once: each lease's expiry moves
    forward in the database, and every renewal comes from one heartbeat thread."""
    store = Store(engine)
    leases = leased(store, 3)
    before = heartbeat_threads()
    held = threading.Barrier(4)
    done = threading.Event()
    lost: list[bool] = []

    def drive(lease: Lease) -> None:
        with store.heartbeats.holding(lease, TTL_S) as beat:
            held.wait()
            done.wait()
            lost.append(beat.lost)

    drives = [threading.Thread(target=drive, args=(lease,)) for lease in leases]
    with Statements(engine) as statements:
        for th in drives:
            th.start()
        held.wait()
        for lease in leases:
            renewed(store, lease)
        beats = heartbeat_threads() - before
        done.set()
        for th in drives:
            th.join()
    assert len(beats) == 1
    assert set(statements.renewals()) == beats
    assert lost == [False] * 3


def test_a_lease_taken_over_is_lost_for_its_drive_only(engine: sa.Engine) -> None:
    """One of three held leases runs out and another owner claims it: that drive's beat is
    lost and its check raises LeaseLost naming the new holder; the other two keep renewing."""
    store = Store(engine)
    taken, *others = leased(store, 3)
    with contextlib.ExitStack() as stack:
        beats = [
            stack.enter_context(store.heartbeats.holding(lease, TTL_S))
            for lease in (taken, *others)
        ]
        with engine.begin() as conn:  # stands for a holder that stopped renewing
            conn.execute(
                t.run.update().where(t.run.c.id == taken.run_id).values(lease_expires_at=PAST)
            )
        store.claim(taken.run_id, "other@h:9", dt.timedelta(seconds=30))
        wait_for(lambda: beats[0].lost)
        with pytest.raises(errors.LeaseLost, match="other@h:9"):
            beats[0].check()
        taken_expiry = expiry(store, taken)
        for lease in others:
            renewed(store, lease)
        assert expiry(store, taken) == taken_expiry  # the new holder's: not renewed by us
        assert [beat.lost for beat in beats[1:]] == [False, False]
        for beat in beats[1:]:
            beat.check()


def test_a_lease_is_not_renewed_after_its_drive_left(engine: sa.Engine) -> None:
    """Once `holding` has returned, its lease's expiry stops moving: no renewal follows."""
    store = Store(engine)
    (lease,) = leased(store, 1)
    with store.heartbeats.holding(lease, TTL_S):
        renewed(store, lease)
    left = expiry(store, lease)
    with Statements(engine) as statements:
        time.sleep(3 * TTL_S)
    assert statements.renewals() == []
    assert expiry(store, lease) == left


def test_leaving_waits_for_its_leases_renewal_in_flight(engine: sa.Engine) -> None:
    """A drive that leaves while its lease's renewal is blocked (another transaction holds the
    run's row) returns only once that renewal is over; its release then stays released."""
    store = Store(engine)
    (lease,) = leased(store, 1)
    holding = store.heartbeats.holding(lease, TTL_S)
    beat = holding.__enter__()
    blocker = engine.connect()
    tx = blocker.begin()
    blocker.execute(t.run.update().where(t.run.c.id == lease.run_id).values(detached=False))
    try:
        wait_for(lambda: beat.renewing)
        leaving = threading.Thread(target=holding.__exit__, args=(None, None, None))
        leaving.start()
        leaving.join(0.5)
        assert leaving.is_alive()  # still waiting for the renewal
    finally:
        tx.commit()
        blocker.close()
    leaving.join(10)
    assert not leaving.is_alive()
    assert not beat.renewing
    store.release(lease)
    time.sleep(2 * TTL_S)
    assert store.get(lease.run_id).lease_expires_at is None


def test_no_thread_starts_before_a_lease_is_registered(engine: sa.Engine) -> None:
    """A store that is used but drives nothing has no heartbeat thread; the first lease held
    starts one, and a second one held at the same time starts none."""
    before = heartbeat_threads()
    store = Store(engine)
    first, second = leased(store, 2)
    store.renew(first, TTL)
    assert heartbeat_threads() == before
    with store.heartbeats.holding(first, TTL_S):
        assert len(heartbeat_threads() - before) == 1
        with store.heartbeats.holding(second, TTL_S):
            assert len(heartbeat_threads() - before) == 1


def test_an_idle_heartbeat_sends_no_statements(engine: sa.Engine) -> None:
    """After its last lease is left, the heartbeat thread stays (for the next drive) and sends
    nothing to the database."""
    store = Store(engine)
    before = heartbeat_threads()
    (lease,) = leased(store, 1)
    with store.heartbeats.holding(lease, TTL_S):
        renewed(store, lease)
    with Statements(engine) as statements:
        time.sleep(0.5)
    assert statements.sent == []
    assert len(heartbeat_threads() - before) == 1


def _waiting(release: threading.Event) -> Workflow:
    def step(ctx: StepContext) -> StepResult:
        while not release.is_set():
            ctx.wait()
        return Advance("finish")

    return Workflow(
        name="beat",
        version=1,
        states=("A", "Done", "Failed"),
        initial="A",
        failed="Failed",
        final=frozenset({"Done"}),
        transitions=(Transition("finish", "A", "Done"),),
        steps={"A": step},
    )


@contextlib.contextmanager
def driving(runner: Runner, run_id: str) -> Iterator[list[BaseException | str]]:
    """Drive the run on a thread; the list gets its stop reason or its error."""
    outcome: list[BaseException | str] = []

    def drive() -> None:
        try:
            outcome.append(runner.drive(run_id).reason)
        except errors.EngineError as exc:
            outcome.append(exc)

    th = threading.Thread(target=drive)
    th.start()
    try:
        yield outcome
    finally:
        th.join(30)


def test_runners_driving_at_once_share_one_heartbeat(engine: sa.Engine) -> None:
    """Two runners drive waiting steps at once on one store: one heartbeat thread renews both
    leases; the run taken over ends its drive with LeaseLost, the other finishes."""
    store = Store(engine)
    release = threading.Event()
    settings = RunnerSettings(lease_ttl_s=TTL_S, poll_interval_s=0.01)
    runs = [
        store.create_run(
            workflow="beat", workflow_version=1, subject=f"s/{i}", state="A", params={}, actor="t"
        )
        for i in range(2)
    ]
    before = heartbeat_threads()
    with contextlib.ExitStack() as stack:
        outcomes = [
            stack.enter_context(
                driving(Runner(store, _waiting(release), settings, actor=f"r@h:{i}"), run.id)
            )
            for i, run in enumerate(runs)
        ]
        wait_for(lambda: all(store.get(run.id).lease_owner for run in runs))
        for run in runs:
            lease = Lease(run.id, "", store.get(run.id).lease_token)
            renewed(store, lease)
        assert len(heartbeat_threads() - before) == 1
        with engine.begin() as conn:
            conn.execute(
                t.run.update().where(t.run.c.id == runs[0].id).values(lease_expires_at=PAST)
            )
        store.claim(runs[0].id, "other@h:9", dt.timedelta(seconds=30))
        wait_for(lambda: bool(outcomes[0]))
        release.set()
    assert isinstance(outcomes[0][0], errors.LeaseLost)
    assert outcomes[1] == ["final"]
    assert store.get(runs[1].id).state == "Done"


def test_the_thread_ends_with_its_store(engine: sa.Engine) -> None:
    """The heartbeat holds its store weakly: once the store is collected, its thread ends (an
    idle thread never keeps a store, its engine and its connections alive)."""
    before = heartbeat_threads()
    store = Store(engine)
    (lease,) = leased(store, 1)
    with store.heartbeats.holding(lease, TTL_S):
        (thread,) = heartbeat_threads() - before
    del store
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()
