"""The store's write guards, each held by a test that fails when the guard is removed.

Every write first updates the run row under a guard: transitions under (state, version, lease
token), journal writes and waits under the lease token alone. A stale writer, or a holder whose
lease was taken over, must raise and leave every table as it was.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa

from engine import errors
from engine.model import Lease
from engine.store import Store

TTL = dt.timedelta(seconds=30)


def tables(store: Store, run_id: str) -> dict[str, Any]:
    """Everything the store holds about a run, to compare before and after a refused write."""
    return {
        "run": store.get(run_id),
        "events": [(e.id, e.hash) for e in store.events(run_id)],
        "published": store.published(run_id),
        "journal": store.journal_entries(run_id),
        "locks": store.locks(run_id),
        "signals": store.pending_signals(run_id),
    }


def new_run(store: Store) -> tuple[str, Lease]:
    run = store.create_run(
        workflow="toy", workflow_version=1, subject="x/1", state="A", params={}, actor="t@h:1"
    )
    return run.id, store.claim(run.id, "t@h:1", TTL)


def test_a_writer_back_in_the_same_state_at_an_older_version_is_stale(engine: sa.Engine) -> None:
    """A run that left A and came back to it (A → Failed → retry:A) is at A again, at a newer
    version. A writer still holding (A, v1) matches the state but not the version: StaleRun,
    nothing written. (Kills the `version` condition of the guarded UPDATE.)"""
    store = Store(engine)
    run_id, lease = new_run(store)
    store.transition(
        lease,
        from_state="A",
        version=1,
        trigger="fail",
        to_state="Failed",
        error={"reason": "boom"},
    )
    store.transition(lease, from_state="Failed", version=2, trigger="retry:A", to_state="A")
    before = tables(store, run_id)
    with pytest.raises(errors.StaleRun, match="is at A v3, not A v1"):
        store.transition(
            lease,
            from_state="A",
            version=1,
            trigger="go",
            to_state="B",
            publish={"snapshot": {"stale": True}},
            acquire=("cluster:x",),
        )
    assert tables(store, run_id) == before


def test_a_writer_at_the_current_version_but_another_state_is_stale(engine: sa.Engine) -> None:
    """The mirror case: the version matches but the state does not. (Kills the `state`
    condition of the guarded UPDATE.)"""
    store = Store(engine)
    run_id, lease = new_run(store)
    store.transition(lease, from_state="A", version=1, trigger="go", to_state="B")
    before = tables(store, run_id)
    with pytest.raises(errors.StaleRun, match="is at B v2, not A v2"):
        store.transition(
            lease,
            from_state="A",
            version=2,
            trigger="go",
            to_state="B",
            publish={"snapshot": {"stale": True}},
        )
    assert tables(store, run_id) == before


def test_a_holder_whose_expired_lease_was_taken_over_writes_nothing(engine: sa.Engine) -> None:
    """The old holder of an expired lease that another process took over: its journal write,
    its wait and its transition each raise LeaseLost naming the new holder, and nothing is
    written. (Kills the lease token in `_fenced` and in the guarded UPDATE.)"""
    store = Store(engine)
    run_id, old = new_run(store)
    store.journal_write(old, step_key="A@1:job", attempt=1, state="A", status="intent")
    with engine.begin() as conn:  # the old holder stops renewing: its lease runs out
        from engine import schema as t

        conn.execute(t.run.update().values(lease_expires_at=dt.datetime(2000, 1, 1, tzinfo=dt.UTC)))
    new = store.claim(run_id, "n@h:2", TTL)
    assert new.token == old.token + 1
    before = tables(store, run_id)
    writes = {
        "journal_write": lambda: store.journal_write(
            old, step_key="A@1:job", attempt=1, state="A", status="submitted", external_ref="j1"
        ),
        "journal_insert": lambda: store.journal_write(
            old, step_key="A@1:other", attempt=1, state="A", status="intent"
        ),
        "set_waiting": lambda: store.set_waiting(old, "go_on", "waiting"),
        "transition": lambda: store.transition(
            old, from_state="A", version=1, trigger="go", to_state="B"
        ),
    }
    for name, write in writes.items():
        with pytest.raises(errors.LeaseLost, match="n@h:2") as caught:
            write()
        assert "without writing" in str(caught.value), name
        assert tables(store, run_id) == before, name
    store.transition(new, from_state="A", version=1, trigger="go", to_state="B")
    assert store.get(run_id).state == "B"


def test_a_transition_returns_the_run_exactly_as_a_load_reads_it_after(engine: sa.Engine) -> None:
    """The runner works on what a transition returns instead of reading the run again: the
    UPDATE's RETURNING plus, worked out in Python, the signals it consumed and the values it
    published (replaced ones move to the end, new ones by key, each as its JSON column gives it
    back). It must equal a load made after the commit."""
    store = Store(engine)
    run_id, lease = new_run(store)
    for name in ("go", "pause", "abort"):
        assert store.send_signal(run_id, name, {}, "t@h:1")
    first = store.transition(
        lease,
        from_state="A",
        version=1,
        trigger="t1",
        to_state="B",
        publish={"zeta": (1, 2), "alpha": {"n": 1}, "keep": "x"},
        consume=("pause",),
    )
    assert first == store.load(run_id)
    assert first.signals == ["go", "abort"]
    assert first.published == {"alpha": {"n": 1}, "keep": "x", "zeta": [1, 2]}
    second = store.transition(
        lease,
        from_state="B",
        version=2,
        trigger="t2",
        to_state="C",
        publish={"alpha": {1: "one"}, "beta": None},
        consume=("go", "abort"),
    )
    assert second == store.load(run_id)
    assert list(second.published) == ["keep", "zeta", "alpha", "beta"]
    assert second.published["alpha"] == {"1": "one"} and second.signals == []
