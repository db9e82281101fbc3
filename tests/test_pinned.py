"""A drive's transactions run on one pinned connection (`Store.pinned`), on a real SQLite file
and PostgreSQL: one checkout from the pool per drive instead of one per transaction; a
transaction opened inside another still works; pins never take more than the pool's base size,
so a worker with more slots than that still drives every run."""

from __future__ import annotations

import threading
from collections.abc import Callable

import sqlalchemy as sa

from engine.runner import Runner, RunnerSettings
from engine.store import Store
from engine.workflow import Advance, StepResult, Transition, Workflow

STATES = ("S0", "S1", "S2", "S3", "S4")


def _chain() -> Workflow:
    def step(trigger: str) -> Callable[..., StepResult]:
        return lambda _ctx: Advance(trigger)

    return Workflow(
        name="chain",
        version=1,
        states=(*STATES, "Done", "Failed"),
        initial="S0",
        failed="Failed",
        final=frozenset({"Done"}),
        transitions=tuple(
            Transition(f"t{i}", s, (*STATES, "Done")[i + 1]) for i, s in enumerate(STATES)
        ),
        steps={s: step(f"t{i}") for i, s in enumerate(STATES)},
    )


def _checkouts(engine: sa.Engine) -> list[int]:
    counted = [0]

    def checkout(*_args: object) -> None:
        counted[0] += 1

    sa.event.listen(engine, "checkout", checkout)
    return counted


def test_a_drive_checks_out_one_connection(engine: sa.Engine) -> None:
    """Creating a run and driving it through five transitions (six transactions) takes one
    connection from the pool; the lease is given back with the final transition."""
    store = Store(engine)
    runner = Runner(store, _chain(), RunnerSettings(), actor="tester")
    counted = _checkouts(engine)
    stop = runner.start("subject", {})
    assert stop.run.state == "Done"
    assert counted[0] == 1
    assert len([e for e in store.events(stop.run.id) if e.kind == "transition"]) == 5


def test_a_transaction_inside_another_gets_its_own_connection(engine: sa.Engine) -> None:
    store = Store(engine)
    run = store.create_run(
        workflow="w", workflow_version=1, subject="s", state="A", params={}, actor="t"
    )
    with store.pinned(), store._tx(read_only=True) as outer, store._tx(read_only=True) as inner:
        assert outer is not inner
        assert store.get(run.id).id == run.id  # a third, while both are open


def test_pins_never_take_more_than_the_pool_size(engine: sa.Engine) -> None:
    """More threads than the pool's base size each pin and read at once: the pins stop at the
    base size, the other threads' transactions use the overflow, and every read succeeds."""
    store = Store(engine)
    run = store.create_run(
        workflow="w", workflow_version=1, subject="s", state="A", params={}, actor="t"
    )
    pool = engine.pool
    assert isinstance(pool, sa.pool.QueuePool)
    threads = pool.size() + 3
    inside, measured, done = (threading.Barrier(threads + 1) for _ in range(3))
    read: list[str] = []

    def drive() -> None:
        with store.pinned():
            inside.wait(timeout=30)
            measured.wait(timeout=30)
            read.append(store.get(run.id).id)
            done.wait(timeout=30)

    workers = [threading.Thread(target=drive) for _ in range(threads)]
    for worker in workers:
        worker.start()
    inside.wait(timeout=30)
    pinned = pool.checkedout()
    measured.wait(timeout=30)
    done.wait(timeout=30)
    for worker in workers:
        worker.join(timeout=30)
    assert pinned == pool.size()
    assert read == [run.id] * threads
