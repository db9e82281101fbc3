"""The generic engine on a toy workflow, against real databases."""

from __future__ import annotations

import datetime as dt
import time

import pytest
import sqlalchemy as sa

from engine import errors
from engine import schema as t
from engine.context import StepContext
from engine.runner import Runner, RunnerSettings
from engine.store import Store
from engine.workflow import Advance, StepResult, Transition, Wait, Workflow

FAST = RunnerSettings(lease_ttl_s=5, poll_interval_s=0.001, retry_backoff_s=0.001)


class Job:
    def __init__(self, polls: int) -> None:
        self.polls = polls

    done = property(lambda self: self.polls <= 0)
    ok = property(lambda self: True)
    progress = property(lambda self: 100 if self.polls <= 0 else 50)
    message = ""
    details: dict[str, str] = {}  # noqa: RUF012


class Toy:
    """A three-step workflow whose side effects are counted."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.transient_left = 0
        self.jobs: dict[str, Job] = {}

    def workflow(self) -> Workflow:
        return Workflow(
            name="toy",
            version=1,
            states=("A", "B", "C", "Done", "Failed", "Aborted"),
            initial="A",
            failed="Failed",
            final=frozenset({"Done", "Aborted"}),
            transitions=(
                Transition("go", "A", "B"),
                Transition("next", "B", "C"),
                Transition("finish", "C", "Done"),
                Transition("abort", "B", "Aborted"),
                Transition("abort", "C", "Aborted"),
            ),
            steps={"A": self.step_a, "B": self.step_b, "C": self.step_c},
            signals=frozenset({"go_on"}),
            on_abort=lambda run: "abort" if run.state in ("B", "C") else None,
        )

    def step_a(self, ctx: StepContext) -> StepResult:
        return Advance("go", publish={"snapshot": {"vms": ["a", "b"]}}, acquire=("cluster:x",))

    def step_b(self, ctx: StepContext) -> StepResult:
        if self.transient_left:
            self.transient_left -= 1
            raise errors.TransientError("connection refused")
        outcome = ctx.run_job("job", submit=self._submit, poll=self._poll)
        return Advance("next", publish={"job": outcome.ref})

    def step_c(self, ctx: StepContext) -> StepResult:
        if not ctx.signal_pending("go_on"):
            return Wait("go_on", "operator must confirm")
        return Advance("finish", consume=("go_on",), release=("cluster:x",))

    def _submit(self) -> str:
        ref = f"job{len(self.submitted)}"
        self.submitted.append(ref)
        self.jobs[ref] = Job(polls=2)
        return ref

    def _poll(self, ref: str) -> Job:
        job = self.jobs[ref]
        job.polls -= 1
        return job


def make(engine: sa.Engine, toy: Toy, actor: str = "tester@host:1") -> Runner:
    return Runner(Store(engine), toy.workflow(), FAST, actor=actor, sleep=lambda _s: None)


def test_full_cycle_persists_every_transition_with_audit(engine: sa.Engine) -> None:
    """A run goes A→B→C, waits for a signal, then finishes; each transition is one audit row."""
    toy = Toy()
    runner = make(engine, toy)
    run = runner.create("x/1", {"p": 1})
    stop = runner.drive(run.id)
    assert (stop.reason, stop.run.state, stop.run.waiting_for) == ("waiting", "C", "go_on")
    runner.signal(run.id, "go_on")
    stop = runner.drive(run.id)
    assert (stop.reason, stop.run.state) == ("final", "Done")
    assert stop.run.finished_at is not None
    events = runner.store.events(run.id)
    transitions = [(e.from_state, e.to_state) for e in events if e.kind == "transition"]
    assert transitions == [("A", "B"), ("B", "C"), ("C", "Done")]
    assert runner.store.published(run.id) == {"snapshot": {"vms": ["a", "b"]}, "job": "job0"}
    assert runner.store.lock_holder("cluster:x") is None
    assert runner.store.pending_signals(run.id) == []
    assert toy.submitted == ["job0"]


def test_start_creates_the_run_leased_and_drives_it_with_the_same_trail(engine: sa.Engine) -> None:
    """`start` creates the run already leased (one transaction fewer than a create and a
    claim, and no moment when another process could take it), then drives it; the trail
    holds the same events as a create followed by a drive, and its hash chain verifies."""
    from engine import audit

    toy = Toy()
    runner = make(engine, toy)
    stop = runner.start("x/1", {"p": 1})
    assert (stop.reason, stop.run.state) == ("waiting", "C")
    assert runner.store.get(stop.run.id).lease_owner is None  # given back at the stop
    with pytest.raises(errors.Busy):
        runner.start("x/1", {})
    started = [e.kind for e in runner.store.events(stop.run.id)]
    runner.signal(stop.run.id, "go_on")
    assert runner.drive(stop.run.id).run.state == "Done"  # the lock cluster:x is free again
    created = runner.create("x/2", {"p": 1})
    runner.drive(created.id)
    assert started == [e.kind for e in runner.store.events(created.id)]
    assert started[:2] == ["created", "lease"]
    assert audit.verify(runner.store, stop.run.id) == []


def test_until_stops_on_entering_the_state_before_its_step(engine: sa.Engine) -> None:
    """--until B stops at B without running B's side effect; a later drive continues."""
    toy = Toy()
    runner = make(engine, toy)
    run = runner.create("x/1", {})
    stop = runner.drive(run.id, until="B")
    assert (stop.reason, stop.run.state, toy.submitted) == ("until", "B", [])
    assert runner.store.lock_holder("cluster:x") == run.id
    stop = runner.drive(run.id, until="C")
    assert (stop.reason, stop.run.state, toy.submitted) == ("until", "C", ["job0"])


def test_resumed_step_reattaches_to_the_journaled_job(engine: sa.Engine) -> None:
    """A job submitted and journaled before a crash is polled again, never submitted twice."""
    toy = Toy()
    runner = make(engine, toy)
    run = runner.create("x/1", {})
    runner.drive(run.id, until="B")
    lease = runner.store.claim(run.id, "crashed@host:2", dt.timedelta(seconds=5))
    b = runner.store.get(run.id)
    runner.store.journal_write(
        lease,
        step_key=f"B@{b.version}:job",
        attempt=1,
        state="B",
        status="submitted",
        external_ref="job-before-crash",
    )
    toy.jobs["job-before-crash"] = Job(polls=3)
    with engine.begin() as conn:  # the crashed process's lease expires
        conn.execute(t.run.update().values(lease_expires_at=dt.datetime(2000, 1, 1, tzinfo=dt.UTC)))
    stop = runner.drive(run.id, until="C")
    assert stop.run.state == "C"
    assert toy.submitted == []
    assert runner.store.published(run.id)["job"] == "job-before-crash"


def test_a_live_lease_makes_a_second_process_busy(engine: sa.Engine) -> None:
    """While one process holds the lease, another gets Busy naming the holder."""
    toy = Toy()
    runner = make(engine, toy)
    run = runner.create("x/1", {})
    runner.store.claim(run.id, "other@host:9", dt.timedelta(seconds=60))
    with pytest.raises(errors.Busy, match="other@host:9"):
        runner.drive(run.id)


def test_stale_writer_gets_a_clear_error_and_changes_nothing(engine: sa.Engine) -> None:
    """A transition from an outdated (state, version) raises StaleRun and writes nothing."""
    store = Store(engine)
    toy = Toy()
    runner = make(engine, toy)
    run = runner.create("x/1", {})
    lease = store.claim(run.id, "w@h:1", dt.timedelta(seconds=5))
    store.transition(lease, from_state="A", version=run.version, trigger="go", to_state="B")
    with pytest.raises(errors.StaleRun):
        store.transition(lease, from_state="A", version=run.version, trigger="go", to_state="B")
    assert [e.to_state for e in store.events(run.id) if e.kind == "transition"] == ["B"]


def test_transient_errors_are_retried_then_give_up(engine: sa.Engine) -> None:
    """Transient failures are retried with backoff; too many fail the run naming the cause."""
    toy = Toy()
    toy.transient_left = 2
    runner = make(engine, toy)
    run = runner.create("x/1", {})
    assert runner.drive(run.id, until="C").run.state == "C"
    runner.signal(run.id, "go_on")
    assert runner.drive(run.id).run.state == "Done"
    toy2 = Toy()
    toy2.transient_left = 5
    runner2 = make(engine, toy2)
    run2 = runner2.create("x/2", {})
    stop = runner2.drive(run2.id)
    assert stop.reason == "failed"
    assert stop.run.error is not None
    assert "gave up after 3 attempts" in stop.run.error["reason"]
    assert stop.run.failed_from == "B"
    toy2.transient_left = 0
    stop = runner2.drive(run2.id, until="C", retry=True)
    assert stop.run.state == "C"


def test_lock_conflict_fails_the_second_run_naming_the_holder(engine: sa.Engine) -> None:
    """Two runs wanting the same lock: the second fails with the holder's run ID."""
    runner = make(engine, Toy())
    first = runner.create("x/1", {})
    runner.drive(first.id, until="B")
    second = runner.create("x/2", {})
    stop = runner.drive(second.id)
    assert stop.reason == "failed"
    assert stop.run.error is not None
    assert first.id in stop.run.error["reason"]
    assert runner.store.published(second.id) == {}


def test_abort_signal_fires_the_workflows_abort_trigger(engine: sa.Engine) -> None:
    """An abort signal is consumed by the abort transition in the same transaction."""
    runner = make(engine, Toy())
    run = runner.create("x/1", {})
    runner.drive(run.id, until="B")
    runner.signal(run.id, "abort")
    stop = runner.drive(run.id)
    assert stop.run.state == "Aborted"
    assert runner.store.pending_signals(run.id) == []


def test_unknown_signal_and_state_are_usage_errors(engine: sa.Engine) -> None:
    """A typo in a signal or --until state is refused with the valid choices."""
    runner = make(engine, Toy())
    run = runner.create("x/1", {})
    with pytest.raises(errors.UsageError, match="go_on"):
        runner.signal(run.id, "patchd")
    with pytest.raises(errors.UsageError, match="expected one of"):
        runner.drive(run.id, until="Nowhere")


def test_a_waiting_step_keeps_its_deadline_across_its_re_entries(engine: sa.Engine) -> None:
    """A step that waits journals its deadline at its first wait (when it may give its lease
    back: yield_after_s), so every re-entry keeps that deadline instead of starting a new
    timeout: after yields, and after the process stopped in the middle of the wait (a stop
    request here; a crash or a takeover alike). A step that never ends does fail, after its
    timeout in all."""
    forever = Workflow(
        name="waits",
        version=1,
        states=("A", "Done", "Failed"),
        initial="A",
        failed="Failed",
        final=frozenset({"Done"}),
        transitions=(Transition("go", "A", "Done"),),
        steps={"A": _wait_forever},
    )
    naps = [0]

    def nap(seconds: float) -> None:  # every 5th nap, the process is stopped mid-wait
        time.sleep(seconds)
        naps[0] += 1
        if naps[0] % 5 == 0:
            runner.stop_requested.set()

    settings = RunnerSettings(
        lease_ttl_s=5, poll_interval_s=0.01, timeouts_s={"A": 0.6}, yield_after_s=0.2
    )
    runner = Runner(Store(engine), forever, settings, actor="t@h:1", sleep=nap)
    run = runner.create("w/1", {})
    reasons = []
    stop = runner.drive(run.id)
    while stop.run.state == "A" and len(reasons) < 200:
        reasons.append(stop.reason)
        runner.stop_requested.clear()
        stop = runner.drive(run.id, early=True)
    assert stop.run.state == "Failed" and "ran past its timeout of 0.6 s" in str(stop.run.error)
    assert "interrupted" in reasons and len(reasons) >= 5  # many entries, one timeout in all
    deadlines = [e for e in runner.store.journal_entries(run.id) if e.step_key.endswith("deadline")]
    assert len(deadlines) == 1  # journaled once, at the first wait


def _wait_forever(ctx: StepContext) -> StepResult:
    while True:
        ctx.wait(on="something that never comes")


def test_a_run_id_taken_in_the_same_second_is_drawn_again(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run IDs are random within their second; a draw that another run already holds is drawn
    again, and a creation whose draws are all taken fails with a clear error, writing nothing."""
    from engine import audit, creation

    store = Store(engine)
    first = store.create_run(
        workflow="w", workflow_version=1, subject="a", state="A", params={}, actor="t"
    )
    draws = iter([first.id, first.id, "20261126-000000-000002"])
    monkeypatch.setattr(creation, "new_run_id", lambda _now: next(draws))
    second = store.create_run(
        workflow="w", workflow_version=1, subject="b", state="A", params={}, actor="t"
    )
    assert second.id == "20261126-000000-000002"
    assert [e.kind for e in store.events(second.id)] == ["created"]
    assert not audit.verify(store, second.id)
    monkeypatch.setattr(creation, "new_run_id", lambda _now: first.id)
    with pytest.raises(errors.DatabaseError, match="run IDs drawn were all taken"):
        store.create_run(
            workflow="w", workflow_version=1, subject="c", state="A", params={}, actor="t"
        )
    assert {r.subject for r in store.runs(limit=10)} == {"a", "b"}
