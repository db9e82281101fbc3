"""Child runs, durable timers, the workflow registry and one unfinished run per subject: the
engine on toy workflows against real databases (SQLite file and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

from engine import crashpoints, errors
from engine.context import StepContext
from engine.model import utcnow
from engine.registry import Registry
from engine.runner import Runner, RunnerSettings
from engine.store import Store
from engine.workflow import Advance, Sleep, StepResult, Transition, Workflow

FAST = RunnerSettings(lease_ttl_s=5, poll_interval_s=0.001, retry_backoff_s=0.001)
T0 = dt.datetime(2026, 11, 28, 22, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.at = T0

    def __call__(self) -> dt.datetime:
        return self.at


def child_workflow() -> Workflow:
    """Takes the family's lock, then waits for a signal-free step to finish."""
    return Workflow(
        name="child",
        version=1,
        states=("Work", "Done", "Failed", "Aborted"),
        initial="Work",
        failed="Failed",
        final=frozenset({"Done", "Aborted"}),
        transitions=(
            Transition("finish", "Work", "Done"),
            Transition("abort", "Work", "Aborted"),
            Transition("abort", "Failed", "Aborted"),
        ),
        steps={"Work": lambda ctx: Advance("finish", acquire=("cluster:x",))},
        on_abort=lambda _run: "abort",
    )


class Parent:
    """Holds cluster:x, starts one child, soaks 60 s on a durable timer, waits for the child."""

    def __init__(self) -> None:
        self.children_started = 0

    def workflow(self) -> Workflow:
        return Workflow(
            name="parent",
            version=1,
            states=("Start", "Spawn", "Soak", "Done", "Failed", "Aborted"),
            initial="Start",
            failed="Failed",
            final=frozenset({"Done", "Aborted"}),
            transitions=(
                Transition("go", "Start", "Spawn"),
                Transition("spawned", "Spawn", "Soak"),
                Transition("finish", "Soak", "Done"),
                Transition("abort", "Spawn", "Aborted"),
                Transition("abort", "Soak", "Aborted"),
            ),
            steps={"Start": self.start, "Spawn": self.spawn, "Soak": self.soak},
            on_abort=lambda _run: "abort",
        )

    def start(self, ctx: StepContext) -> StepResult:
        return Advance("go", acquire=("cluster:x",))

    def spawn(self, ctx: StepContext) -> StepResult:
        child = ctx.start_child("node1", workflow="child", version=1, subject="x/node1", params={})
        return Advance("spawned", publish={"child": child.id})

    def soak(self, ctx: StepContext) -> StepResult:
        until = ctx.timer("soak", 60)
        if ctx.now() < until:
            return Sleep(until, "soaking")
        child = ctx.child(ctx.published["child"])
        if child.state not in ("Done", "Aborted"):
            return Sleep(ctx.now() + dt.timedelta(hours=1), f"waiting for child {child.id}")
        return Advance("finish", release=("cluster:x",))


def registry(parent: Parent) -> Registry:
    reg = Registry()
    reg.add("parent", 1, parent.workflow)
    reg.add("child", 1, child_workflow)
    return reg


def runner(engine: sa.Engine, reg: Registry, name: str, clock: Clock) -> Runner:
    return Runner(
        Store(engine),
        reg.get(name, 1),
        FAST,
        actor="t@h:1",
        sleep=lambda _s: None,
        now=clock,
        initial_states=reg.initial,
    )


@contextmanager
def crash_at(point: str) -> Iterator[None]:
    class Crash(BaseException):
        pass

    original = crashpoints.hit

    def hit(name: str) -> None:
        if name == point:
            raise Crash

    crashpoints.hit = hit  # type: ignore[assignment]
    try:
        yield
    except Crash:
        pass
    finally:
        crashpoints.hit = original  # type: ignore[assignment]


def expire_leases(engine: sa.Engine) -> None:
    from engine import schema as t

    with engine.begin() as conn:
        conn.execute(t.run.update().values(lease_expires_at=dt.datetime(2000, 1, 1, tzinfo=dt.UTC)))


def test_a_timer_fires_on_time_and_a_child_ends_the_wait(engine: sa.Engine) -> None:
    """The parent sleeps on its soak timer (lease given back, wake_at recorded), is left alone
    before its time, goes on when the clock reaches it, then sleeps for its child; the child,
    taking the lock its root holds, finishes and wakes the parent at once."""
    clock, parent = Clock(), Parent()
    reg = registry(parent)
    p = runner(engine, reg, "parent", clock)
    run = p.create("x", {})
    stop = p.drive(run.id)
    assert (stop.reason, stop.run.state, stop.run.wake_at) == (
        "sleeping",
        "Soak",
        T0 + dt.timedelta(seconds=60),
    )
    assert p.store.get(run.id).lease_owner is None  # the lease is given back
    clock.at += dt.timedelta(seconds=59)
    assert p.drive(run.id).reason == "sleeping"  # not yet: nothing claimed, nothing written
    clock.at += dt.timedelta(seconds=2)
    stop = p.drive(run.id)
    assert (
        stop.reason == "sleeping"
        and "waiting for child" in p.store.events(run.id)[-1].details["reason"]
    )
    (child,) = p.store.children(run.id)
    assert (child.parent_run_id, child.root_run_id, child.state) == (run.id, run.id, "Work")
    assert runner(engine, reg, "child", clock).drive(child.id).run.state == "Done"
    woken = p.store.get(run.id)
    assert woken.wake_at is not None and woken.wake_at <= utcnow()
    assert p.drive(run.id).run.state == "Done"
    assert p.store.locks(run.id) == []


def test_a_lock_of_the_root_is_refused_to_everyone_else(engine: sa.Engine) -> None:
    """A child may take what its root holds; any other run is refused, naming the holder."""
    clock, parent = Clock(), Parent()
    reg = registry(parent)
    p = runner(engine, reg, "parent", clock)
    run = p.create("x", {})
    p.drive(run.id, until="Spawn")
    stranger = runner(engine, reg, "child", clock)
    other = stranger.create("y/1", {})
    stop = stranger.drive(other.id)
    assert stop.run.state == "Failed"
    assert stop.run.error is not None and run.id in stop.run.error["reason"]


@pytest.mark.parametrize("point", ["before_submit:child:node1", "after_submit:child:node1"])
def test_a_crash_around_starting_a_child_never_leaves_two(engine: sa.Engine, point: str) -> None:
    """A crash right before or right after the child is created (its intent journaled, its
    reference not yet): the resumed step finds it, or creates it, once."""
    clock, parent = Clock(), Parent()
    reg = registry(parent)
    p = runner(engine, reg, "parent", clock)
    run = p.create("x", {})
    p.drive(run.id, until="Spawn")
    with crash_at(point):
        p.drive(run.id)
    expire_leases(engine)
    p.drive(run.id)
    assert len(p.store.children(run.id)) == 1
    assert p.store.get(run.id).state == "Soak"


def test_aborting_a_parent_aborts_its_children_in_the_same_transaction(
    engine: sa.Engine,
) -> None:
    """The abort transition of the parent and the abort signals of its unfinished children
    commit together: a crash before the commit leaves neither, after it both."""
    clock, parent = Clock(), Parent()
    reg = registry(parent)
    p = runner(engine, reg, "parent", clock)
    run = p.create("x", {})
    p.drive(run.id)  # sleeps in Soak with its child started
    (child,) = p.store.children(run.id)
    p.signal(run.id, "abort")
    with crash_at("before_commit:Soak->Aborted"):
        p.drive(run.id)
    assert p.store.get(run.id).state == "Soak"
    assert p.store.pending_signals(child.id) == []
    expire_leases(engine)
    assert p.drive(run.id).run.state == "Aborted"
    assert p.store.pending_signals(child.id) == ["abort"]
    assert runner(engine, reg, "child", clock).drive(child.id).run.state == "Aborted"


def test_one_unfinished_run_per_subject_is_enforced_by_the_database(engine: sa.Engine) -> None:
    clock = Clock()
    reg = registry(Parent())
    c = runner(engine, reg, "child", clock)
    first = c.create("x/1", {})
    with pytest.raises(errors.Busy, match=f"unfinished run {first.id}"):
        c.create("x/1", {})
    c.drive(first.id)
    assert c.create("x/1", {}).state == "Work"  # the first one ended: the subject is free


def test_an_unknown_workflow_is_refused_naming_name_and_version() -> None:
    reg = registry(Parent())
    with pytest.raises(errors.UsageError, match="'parent' version 2 is not known"):
        reg.get("parent", 2)
    with pytest.raises(errors.UsageError, match="'cycle' version 1"):
        reg.check("cycle", 1)
