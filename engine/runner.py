"""The runner: take the run's lease, run the current step, persist its outcome, advance.

It stops on entering `until` (before that state's step runs), when a step waits for a signal,
in a final state, or in the failed state. The store's heartbeat renews the lease while it drives
(`engine.heartbeat`); losing it stops the runner before its next write.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from engine import errors, logcontext
from engine.context import ProgressSink, StepContext
from engine.heartbeat import Beat
from engine.model import JournalEntry, Lease, Loaded, Run, utcnow
from engine.store import Store
from engine.workflow import Advance, Sleep, StepResult, Wait, Workflow

if TYPE_CHECKING:
    from engine.machine import StateMachine

log = logging.getLogger("nodepatch.engine")

ABORT = "abort"


@dataclass(frozen=True)
class Retry:
    """How a step's transient errors are retried: `attempts` in all, with a doubling backoff
    from `backoff_s` up to `backoff_max_s`."""

    attempts: int = 3
    backoff_s: float = 5.0
    backoff_max_s: float = 120.0

    def delay(self, attempt: int) -> float:
        """The pause after failed attempt `attempt` (1, 2, ...)."""
        return min(self.backoff_s * 2.0 ** (attempt - 1), self.backoff_max_s)


@dataclass(frozen=True)
class RunnerSettings:
    lease_ttl_s: float = 30.0
    poll_interval_s: float = 2.0
    default_timeout_s: float = 3600.0
    timeouts_s: Mapping[str, float] = field(default_factory=dict)
    retry_attempts: int = 3
    retry_backoff_s: float = 5.0
    retry_backoff_max_s: float = 120.0
    # A step that has waited this long gives its lease back and sleeps one poll interval
    # (a worker's slot is never held by a waiting step); its timeout is then kept durably.
    yield_after_s: float | None = None
    # Per state, over the flat retry_* settings (`retries.<workflow>.<State>` in the config).
    retries: Mapping[str, Retry] = field(default_factory=dict)

    def timeout(self, state: str) -> float:
        return self.timeouts_s.get(state, self.default_timeout_s)

    def retry(self, state: str) -> Retry:
        """The retry settings of `state`'s step."""
        found = self.retries.get(state)
        if found is not None:
            return found
        return Retry(self.retry_attempts, self.retry_backoff_s, self.retry_backoff_max_s)


@dataclass(frozen=True)
class Stop:
    run: Run
    reason: Literal["final", "failed", "until", "waiting", "interrupted", "sleeping"]


class Runner:
    def __init__(
        self,
        store: Store,
        workflow: Workflow,
        settings: RunnerSettings,
        *,
        actor: str,
        progress: ProgressSink = lambda _msg: None,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], dt.datetime] = utcnow,
        initial_states: Callable[[str, int], str] | None = None,
        machine: StateMachine | None = None,
    ) -> None:
        self.store, self.workflow, self.settings = store, workflow, settings
        if machine is None:
            from engine.machine import StateMachine  # transitions: only to drive a run

            machine = StateMachine(workflow)
        self.machine = machine
        self.actor, self.progress, self.sleep, self.now = actor, progress, sleep, now
        self.initial_states = initial_states or (lambda _name, _version: workflow.initial)
        self.stop_requested = threading.Event()

    # ---- operator actions --------------------------------------------------------------

    def create(self, subject: str, params: Mapping[str, Any], *, detached: bool = False) -> Run:
        return self.store.create_run(
            workflow=self.workflow.name,
            workflow_version=self.workflow.version,
            subject=subject,
            state=self.workflow.initial,
            params=params,
            actor=self.actor,
            detached=detached,
        )

    def start(self, subject: str, params: Mapping[str, Any], *, until: str | None = None) -> Stop:
        """Create a run and drive it at once: created already leased to this runner, in one
        transaction with its first events, so that nothing can take it in between."""
        if until is not None:
            self._known_state(until)
        ttl = dt.timedelta(seconds=self.settings.lease_ttl_s)
        with self.store.pinned():
            run = self.store.create_run(
                workflow=self.workflow.name,
                workflow_version=self.workflow.version,
                subject=subject,
                state=self.workflow.initial,
                params=params,
                actor=self.actor,
                lease=(self.actor, ttl),
            )
            lease = Lease(run.id, self.actor, run.lease_token)
            return self.drive(run.id, until=until, lease=lease, loaded=Loaded(run, [], {}))

    def signal(self, run_id: str, name: str, payload: Mapping[str, Any] | None = None) -> bool:
        """Record signal `name` for the run; False if the same signal is already pending."""
        allowed = sorted(self.workflow.signals | {ABORT})
        if name not in allowed:
            raise errors.UsageError(
                f"unknown signal {name!r}; expected one of {', '.join(allowed)}"
            )
        run = self.store.get(run_id)
        if self.machine.is_final(run.state):
            raise errors.UsageError(f"run {run_id} is already {run.state}")
        return self.store.send_signal(run_id, name, payload or {}, self.actor)

    def release(self, run_id: str, reason: str, publish: Mapping[str, Any]) -> Run:
        """Give up on a run that cannot finish: it ends in the workflow's abandoned state, its
        locks released, with the reason, the actor and what was left (`publish`) in the trail.
        Nothing outside the database is touched."""
        if self.workflow.abandoned is None:
            raise errors.UsageError(f"{self.workflow.name} runs cannot be released")
        if not reason.strip():
            raise errors.UsageError("--reason must say why the run is released")
        lease = self.store.claim(
            run_id, self.actor, dt.timedelta(seconds=self.settings.lease_ttl_s)
        )
        try:
            run = self.store.get(run_id)
            if self.machine.is_final(run.state):
                raise errors.UsageError(f"run {run_id} is already {run.state}")
            released = self.store.transition(
                lease,
                from_state=run.state,
                version=run.version,
                trigger="release",
                to_state=self.workflow.abandoned,
                final=True,
                publish=publish,
                release=tuple(self.store.locks(run_id)),
                details={"reason": reason, "by": self.actor, "in": run.state},
                error={"state": run.state, "reason": f"released by {self.actor}: {reason}"},
            )
            return released.run
        finally:
            self.store.release(lease)

    def drive(
        self,
        run_id: str,
        *,
        until: str | None = None,
        retry: bool = False,
        early: bool = False,
        lease: Lease | None = None,
        loaded: Loaded | None = None,
    ) -> Stop:
        """Advance the run as far as it goes; retry=True first re-enters a failed step. A run
        sleeping on a timer is left alone before its time unless `early`. `lease`: a lease the
        caller (a worker) has already claimed, and `loaded` the run as that claim returned it."""
        if until is not None:
            self._check_until(self.store.get(run_id), until)
        if lease is None:
            ttl = dt.timedelta(seconds=self.settings.lease_ttl_s)
            awake_at = None if early else self.now()
            taken, loaded = self.store.take(run_id, self.actor, ttl, awake_at=awake_at)
            if taken is None:
                return Stop(loaded.run, "sleeping")
            lease = taken
        stop: Stop | None = None
        try:
            with (
                logcontext.bound(run_id=run_id, workflow=self.workflow.name),
                self.store.heartbeats.holding(lease, self.settings.lease_ttl_s) as beat,
                self.store.pinned(),
            ):
                stop = self._loop(lease, beat, until, retry, loaded)
                return stop
        finally:
            # A final transition has given the lease back already.
            if stop is None or stop.reason != "final" or stop.run.lease_owner is not None:
                self.store.release(lease)

    def _known_state(self, state: str) -> None:
        if state not in self.workflow.states:
            raise errors.UsageError(
                f"unknown state {state!r}; expected one of {', '.join(self.workflow.states)}"
            )

    def _check_until(self, run: Run, until: str) -> None:
        self._known_state(until)
        here = (
            run.failed_from if run.state == self.workflow.failed and run.failed_from else run.state
        )
        if self.machine.is_final(run.state) or until not in self.workflow.ahead(here):
            raise errors.UsageError(
                f"run {run.id} is at {run.state}: --until {until} is not ahead of it"
            )

    # ---- the loop ----------------------------------------------------------------------

    def _loop(
        self,
        lease: Lease,
        beat: Beat,
        until: str | None,
        retry: bool,
        loaded: Loaded | None,
    ) -> Stop:
        """Each pass works on the run as its last write returned it (a claim, a transition)
        and reads it only when it has nothing fresher (a run a worker claimed)."""
        made = 0  # the run version this drive's last transition made
        while True:
            beat.check()
            run, signals, published = loaded or self.store.load(lease.run_id)
            loaded = None
            logcontext.update(state=run.state)
            if self.machine.is_final(run.state):
                return Stop(run, "final")
            if self.stop_requested.is_set():
                return Stop(run, "interrupted")
            if ABORT in signals:
                trigger = self.workflow.on_abort(run)
                if trigger is None:
                    raise errors.UsageError(f"run {run.id} cannot be aborted in {run.state}")
                aborted = {"by": self.actor, "in": run.state}
                abort = Advance(
                    trigger, consume=(ABORT,), details=aborted, publish={"aborted": aborted}
                )
                loaded = self._fire(lease, run, abort, cascade=(ABORT,))
                made = loaded.run.version
                continue
            if run.state == self.workflow.failed:
                if not (retry and run.failed_from):
                    return Stop(run, "failed")
                retry = False
                loaded = self._fire(lease, run, Advance(f"retry:{run.failed_from}"))
                made = loaded.run.version
                continue
            retry = False  # only a run that was Failed when this drive began is retried
            if until == run.state:
                return Stop(run, "until")
            step = self._step(lease, run, beat, published, fresh=run.version == made)
            if isinstance(step, Stop):
                return step
            loaded = step
            made = step.run.version

    def _step(
        self, lease: Lease, run: Run, beat: Beat, published: dict[str, Any], *, fresh: bool
    ) -> Stop | Loaded:
        """Run the state's step and persist what it returned; a Stop when the drive ends,
        else the run as the transition left it."""
        try:
            outcome = self._execute(run, beat, published, fresh=fresh)
        except errors.Interrupted:
            return Stop(self.store.get(run.id), "interrupted")
        except errors.Yielded as exc:  # an internal hand-back: logged, never shown
            until = self.now() + dt.timedelta(seconds=self.settings.poll_interval_s)
            self.store.set_sleep(lease, until, str(exc))
            log.debug(
                "run %s gives its lease back until %s: %s",
                run.id,
                until.isoformat(),
                exc,
                extra={"action": "step_yielded", "run_id": run.id, "state": run.state},
            )
            return Stop(self.store.get(run.id), "sleeping")
        if isinstance(outcome, Wait):
            self.store.set_waiting(lease, outcome.signal, outcome.reason)
            self.progress(f"waiting for signal {outcome.signal!r}: {outcome.reason}")
            return Stop(self.store.get(run.id), "waiting")
        if isinstance(outcome, Sleep):
            self.store.set_sleep(lease, outcome.until, outcome.reason)
            self.progress(f"sleeping until {outcome.until:%Y-%m-%d %H:%M:%S} UTC: {outcome.reason}")
            return Stop(self.store.get(run.id), "sleeping")
        return self._fire(lease, run, outcome)

    def _execute(
        self, run: Run, beat: Beat, published: dict[str, Any], *, fresh: bool
    ) -> StepResult:
        """Run the state's step, retrying transient errors. `fresh`: this drive's own
        transition made this entry into the state, so its journal is known to be empty."""
        step = self.workflow.steps[run.state]
        retry = self.settings.retry(run.state)
        entries: dict[str, JournalEntry] | None = {} if fresh else None
        attempt = 0
        while True:
            attempt += 1
            ctx = StepContext(
                _store=self.store,
                run=run,
                guard=beat,
                deadline=time.monotonic() + self.settings.timeout(run.state),
                poll_interval=self.settings.poll_interval_s,
                progress_sink=self.progress,
                published=published,
                sleep=self.sleep,
                stopping=self.stop_requested.is_set,
                now=self.now,
                timeout_s=self.settings.timeout(run.state),
                initial_states=self.initial_states,
                yield_after=self.settings.yield_after_s,
                journal_seen=entries,
            )
            if self.settings.yield_after_s is not None:  # re-entered (a yield, a takeover):
                until = ctx.timer_set("deadline")  # the deadline its first wait journaled
                if until is not None:
                    ctx.deadline = time.monotonic() + (until - self.now()).total_seconds()
            log.info(
                "step %s of run %s (attempt %d)",
                run.state,
                run.id,
                attempt,
                extra={"action": "step_started", "run_id": run.id, "state": run.state},
            )
            try:
                return step(ctx)
            except errors.TransientError as exc:
                if attempt >= retry.attempts:
                    return _failure(f"gave up after {attempt} attempts: {exc}")
                delay = retry.delay(attempt)
                self.progress(f"{run.state}: {exc}; retrying in {delay:g}s")
                self._pause(delay)
                entries = ctx.journal_seen  # what the failed attempt journaled
            except errors.StepFailed as exc:
                return _failure(str(exc))

    def _pause(self, seconds: float) -> None:
        """Sleep before a retry, in short naps so that a stop request is honoured at once."""
        end = time.monotonic() + seconds
        while not self.stop_requested.is_set() and (left := end - time.monotonic()) > 0:
            self.sleep(min(left, 0.5))
        if self.stop_requested.is_set():
            raise errors.Interrupted("stopped as asked while waiting to retry")

    def _fire(
        self, lease: Lease, run: Run, outcome: Advance, cascade: tuple[str, ...] = ()
    ) -> Loaded:
        if outcome.trigger == "fail":
            return self._fail(lease, run, dict(outcome.details), outcome.publish)
        to_state = self.machine.next_state(run.state, outcome.trigger)
        try:
            loaded = self.store.transition(
                lease,
                from_state=run.state,
                version=run.version,
                trigger=outcome.trigger,
                to_state=to_state,
                final=self.machine.is_final(to_state),
                publish=outcome.publish,
                acquire=outcome.acquire,
                release=outcome.release,
                consume=outcome.consume,
                details=outcome.details,
                error={"state": run.state, **outcome.error} if outcome.error else None,
                cascade=cascade,
            )
        except errors.LockHeld as exc:
            details = {"reason": str(exc), "holder": exc.holder}
            if outcome.if_held is None:
                return self._fail(lease, run, details)
            instead = Advance(outcome.if_held, outcome.publish, details=details, error=details)
            return self._fire(lease, run, instead)
        self.progress(f"{run.state} -> {to_state}")
        return loaded

    def _fail(
        self,
        lease: Lease,
        run: Run,
        details: dict[str, Any],
        publish: Mapping[str, Any] | None = None,
    ) -> Loaded:
        reason = str(details.get("reason", "failed"))
        loaded = self.store.transition(
            lease,
            publish=publish,
            from_state=run.state,
            version=run.version,
            trigger="fail",
            to_state=self.workflow.failed,
            error={"state": run.state, **details, "reason": reason},
        )
        self.progress(f"{run.state} -> {self.workflow.failed}: {reason}")
        return loaded


def _failure(reason: str) -> Advance:
    return Advance("fail", details={"reason": reason})
