"""What a step sees: its run, the published data, signals, progress, and journaled jobs.

`run_job` is the side-effect protocol: journal the intent, submit, journal the external
reference, follow it to the end, journal the outcome. After a crash the same call re-attaches to
the recorded reference instead of submitting again. Waiting is cooperative: each poll checks the
lease (kept alive by the store's heartbeat) and the step's deadline.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from engine import crashpoints, errors
from engine.model import JournalEntry, Lease, Run, utcnow
from engine.store import Store


class ExternalJob(Protocol):
    """Anything with a completion status and progress (a VMM job, a patch run)."""

    @property
    def done(self) -> bool: ...
    @property
    def ok(self) -> bool: ...
    @property
    def progress(self) -> int: ...
    @property
    def message(self) -> str: ...
    @property
    def details(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class JobOutcome:
    ok: bool
    ref: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)
    reattached: bool = False


@dataclass(frozen=True)
class JobSpec:
    """One external job to run: `name` is its journal key within the step."""

    name: str
    submit: Callable[[], str]
    find: Callable[[], str | None] | None = None
    label: str | None = None


ProgressSink = Callable[[str], None]


class LeaseGuard(Protocol):
    @property
    def lease(self) -> Lease: ...

    def check(self) -> None:
        """Raise LeaseLost if the heartbeat lost the lease."""


@dataclass
class StepContext:
    _store: Store
    run: Run
    guard: LeaseGuard
    deadline: float
    poll_interval: float
    progress_sink: ProgressSink
    published: dict[str, Any]
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    stopping: Callable[[], bool] = lambda: False
    now: Callable[[], dt.datetime] = utcnow
    timeout_s: float = 0.0
    waiting_on: str = ""  # what the step is waiting for, named if it times out
    initial_states: Callable[[str, int], str] = lambda _name, _version: ""
    yield_after: float | None = None
    started: float = field(default_factory=time.monotonic)
    # This entry into the state's journal (the newest attempt of each key), read once when
    # first needed and kept up to date by `_journal`: only the lease holder writes it. The
    # runner hands in an empty one when its own transition made this entry (nothing can be
    # journaled under a version the run has just reached), and the same one to each attempt.
    journal_seen: dict[str, JournalEntry] | None = field(default=None, repr=False)

    def progress(self, message: str) -> None:
        self.progress_sink(message)

    def signal_pending(self, name: str) -> bool:
        return name in self._store.pending_signals(self.run.id)

    def check(self) -> None:
        """Raise if the lease is lost, a stop was asked for (every side effect so far is
        journaled: a durable point), or the step ran past its timeout."""
        self.guard.check()
        if self.stopping():
            raise errors.Interrupted(f"stopped in {self.run.state} as asked")
        if self.clock() > self.deadline:
            raise errors.StepTimeout(
                f"{self.run.state} ran past its timeout of {self.timeout_s:g} s"
                f"{f' ({self.waiting_on})' if self.waiting_on else ''}"
            )

    def wait(self, seconds: float | None = None, *, on: str | None = None) -> None:
        """Sleep one poll interval (or `seconds`), checking first; `on` names what is awaited."""
        if on is not None:
            self.waiting_on = on
        self.check()
        if self.yield_after is not None:
            # A step that waits may outlive this process or yield: its deadline is journaled
            # at its first wait, so that a re-entry (a takeover, a wake-up) keeps it. A step
            # that never waits writes nothing for it.
            self.timer("deadline", self.deadline - self.clock())
            if self.clock() - self.started > self.yield_after:
                raise errors.Yielded(self.waiting_on or f"waiting in {self.run.state}")
        self.sleep(self.poll_interval if seconds is None else seconds)

    def lock_holder(self, resource: str) -> str | None:
        """The run holding `resource`, unless it is this run or its root."""
        return self._store.family_lock_holder(self.run, resource)

    # ---- durable timers ------------------------------------------------------------------

    def timer(self, name: str, seconds: float) -> dt.datetime:
        """When timer `name` of this entry into the state fires: journaled the first time it is
        asked for, so a resumed step waits for the same moment, not for `seconds` more."""
        found = self.timer_set(name)
        if found is not None:
            return found
        until = self.now() + dt.timedelta(seconds=seconds)
        key = self.key(f"timer:{name}")
        self._journal(key, 1, "succeeded", result={"until": until.isoformat()})
        crashpoints.hit(f"after_timer:{name}")
        return until

    def timer_set(self, name: str) -> dt.datetime | None:
        """When timer `name` of this entry into the state fires, if it was journaled."""
        entry = self._entry(self.key(f"timer:{name}"))
        if entry and entry.result and "until" in entry.result:
            return dt.datetime.fromisoformat(str(entry.result["until"]))
        return None

    # ---- child runs ----------------------------------------------------------------------

    def start_child(
        self,
        name: str,
        *,
        workflow: str,
        version: int,
        subject: str,
        params: Mapping[str, Any],
    ) -> Run:
        """Start child run `name` of this run at most once: journaled like any side effect,
        and found again by its key after a crash between creating it and journaling it."""
        key = self.key(f"child:{name}")
        entry = self._entry(key)
        if entry and entry.external_ref:
            return self._store.get(entry.external_ref)
        existing = self._store.child(self.run.id, key)
        if existing is None:
            self._journal(key, 1, "intent")
            crashpoints.hit(f"before_submit:child:{name}")
            existing = self._store.create_run(
                workflow=workflow,
                workflow_version=version,
                subject=subject,
                state=self.initial_states(workflow, version),
                params=params,
                actor=self.guard.lease.owner,
                parent=self.run,
                child_key=key,
                detached=self.run.detached,
            )
            crashpoints.hit(f"after_submit:child:{name}")
        self._journal(key, 1, "submitted", ref=existing.id)
        return existing

    def child(self, run_id: str) -> Run:
        return self._store.get(run_id)

    def children(self) -> list[Run]:
        """Every child run of this run, oldest first."""
        return self._store.children(self.run.id)

    def published_of(self, run_id: str) -> dict[str, Any]:
        """What another run (a child) has published."""
        return self._store.published(run_id)

    def pending_signals_of(self, child: Run) -> list[str]:
        return self._store.pending_signals(child.id)

    def signal_child(self, child: Run, name: str) -> bool:
        """Send signal `name` (e.g. `abort`) to a child run; False if it is already pending."""
        if child.parent_run_id != self.run.id:
            raise errors.UsageError(f"run {child.id} is not a child of run {self.run.id}")
        self.guard.check()
        return self._store.send_signal(child.id, name, {}, self.guard.lease.owner)

    def retry_child(self, child: Run) -> bool:
        """Send a failed child back into the step it failed in, so that whoever drives it (a
        worker, or the CLI driving the family) runs that step again. False if the child is not
        failed (any more): retrying is idempotent against the child's own state."""
        if child.parent_run_id != self.run.id:
            raise errors.UsageError(f"run {child.id} is not a child of run {self.run.id}")
        self.guard.check()
        owner = self.guard.lease.owner
        lease = self._store.claim(child.id, owner, dt.timedelta(seconds=60))
        try:
            now = self._store.get(child.id)
            if now.failed_from is None or now.finished_at is not None:
                return False
            self._store.transition(
                lease,
                from_state=now.state,
                version=now.version,
                trigger=f"retry:{now.failed_from}",
                to_state=now.failed_from,
                details={"by": owner, "for_parent": self.run.id},
            )
            return True
        finally:
            self._store.release(lease)

    def remember(self, name: str, compute: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
        """A durable fact of this entry into the state (a health gate's result, a script's
        output): computed once and journaled, then read back, never computed again, when the
        step runs again after a wake-up, a crash or a takeover."""
        found = self.recalled(name)
        if found is not None:
            return found
        result = dict(compute())
        crashpoints.hit(f"before_fact:{name}")
        self._journal(self.key(name), 1, "succeeded", result=result)
        crashpoints.hit(f"after_fact:{name}")
        return result

    def recalled(self, name: str) -> dict[str, Any] | None:
        """A fact `remember` journaled in this entry into the state, if any."""
        entry = self._entry(self.key(name))
        if entry is None or entry.status != "succeeded" or entry.result is None:
            return None
        return dict(entry.result)

    def key(self, name: str) -> str:
        """Journal keys are scoped to this entry into the state (its run version)."""
        return f"{self.run.state}@{self.run.version}:{name}"

    def _entry(self, key: str) -> JournalEntry | None:
        """The newest attempt journaled under `key` (one of this entry into the state)."""
        if self.journal_seen is None:
            scope = self.key("")
            newest: dict[str, JournalEntry] = {}
            for entry in self._store.journal_entries(self.run.id):
                held = newest.get(entry.step_key)
                if entry.step_key.startswith(scope) and (
                    held is None or entry.attempt >= held.attempt
                ):
                    newest[entry.step_key] = entry
            self.journal_seen = newest
        return self.journal_seen.get(key)

    def job_status(self, name: str) -> str | None:
        """The journal status of job `name` in this entry into the state, if it was started:
        intent, submitted, succeeded or failed."""
        entry = self._entry(self.key(name))
        return entry.status if entry else None

    def jobs_in(self, state: str) -> list[JournalEntry]:
        """Every job this run journaled in `state`, over all its entries into it: what the run
        itself did there, for compensation and reports."""
        return [e for e in self._store.journal_entries(self.run.id) if e.state == state]

    def in_flight(self, name: str) -> bool:
        """Whether job `name` was submitted (its reference journaled) and not concluded: the
        step must re-attach to it, whatever the cluster looks like now. A job journaled only
        as an intent may never have reached the backend: the step decides from the cluster's
        state, and `run_jobs` looks for it before submitting again."""
        return self.job_status(name) == "submitted"

    def run_job(
        self,
        name: str,
        *,
        submit: Callable[[], str],
        poll: Callable[[str], ExternalJob],
        find: Callable[[], str | None] | None = None,
        label: str | None = None,
    ) -> JobOutcome:
        """Run one external job at most once per attempt, re-attaching after a crash."""
        spec = JobSpec(name, submit, find, label)
        return self.run_jobs([spec], poll=poll, concurrency=1)[name]

    def run_jobs(
        self,
        specs: Sequence[JobSpec],
        *,
        poll: Callable[[str], ExternalJob],
        concurrency: int = 1,
    ) -> dict[str, JobOutcome]:
        """Run jobs with at most `concurrency` in flight; each is journaled: intent, then its
        reference, then its outcome. Jobs already journaled are re-attached, not resubmitted."""
        pending = list(specs)
        active: dict[str, tuple[JobSpec, int, str, bool]] = {}
        shown: dict[str, int] = {}
        outcomes: dict[str, JobOutcome] = {}
        polled: dict[str, ExternalJob] = {}  # a job's first poll, made by _start
        latest = ""
        while pending or active:
            while pending and len(active) < max(concurrency, 1):
                spec = pending.pop(0)
                started = self._start(spec, poll)
                if isinstance(started, JobOutcome):
                    outcomes[spec.name] = started
                else:
                    attempt, ref, reattached, first = started
                    active[spec.name] = (spec, attempt, ref, reattached)
                    if first is not None:
                        polled[spec.name] = first
            for name, (spec, attempt, ref, reattached) in list(active.items()):
                job = polled.pop(name, None) or poll(ref)
                latest = f"{spec.label or name}: {job.progress}% {job.message}".rstrip()
                if spec.label and (job.progress != shown.get(name) or job.done):
                    shown[name] = job.progress
                    self.progress(f"{spec.label}: {job.progress}% {job.message}".rstrip())
                if job.done:
                    del active[name]
                    outcomes[name] = self._finish(spec, attempt, ref, job, reattached)
            if active:
                self.wait(on=f"{len(active)} job(s) in flight, latest {latest}")
        return outcomes

    def _start(
        self, spec: JobSpec, poll: Callable[[str], ExternalJob]
    ) -> JobOutcome | tuple[int, str, bool, ExternalJob | None]:
        """Journal and submit the job, or find it again; its attempt, reference, whether it
        was re-attached, and its first poll if `_start` made one (see `_submitted`)."""
        key = self.key(spec.name)
        entry = self._entry(key)
        if entry and entry.status == "succeeded":
            result = dict(entry.result or {})
            return JobOutcome(
                True,
                entry.external_ref or "",
                result.get("message", ""),
                result.get("details", {}),
                reattached=True,
            )
        if entry and entry.status == "submitted" and entry.external_ref:
            return entry.attempt, entry.external_ref, True, None
        attempt = (
            entry.attempt
            if entry and entry.status == "intent"
            else (entry.attempt + 1 if entry else 1)
        )
        existing = spec.find() if spec.find else None
        if existing:
            self._journal(key, attempt, "submitted", ref=existing)
            return attempt, existing, True, None
        self._journal(key, attempt, "intent")
        crashpoints.hit(f"before_submit:{spec.name}")
        try:
            ref = spec.submit()
        except errors.BackendError as exc:  # refused: a failed job, for the step to judge
            self._journal(key, attempt, "failed", result={"message": str(exc)})
            return JobOutcome(False, "", str(exc))
        crashpoints.hit(f"after_submit:{spec.name}")
        return self._submitted(spec, attempt, ref, poll(ref))

    def _submitted(
        self, spec: JobSpec, attempt: int, ref: str, job: ExternalJob
    ) -> JobOutcome | tuple[int, str, bool, ExternalJob | None]:
        """Journal a job's reference. A job that had already ended at its first poll (a quick
        move, a host already in the state asked for) is journaled with its outcome in the same
        write: one commit instead of two, and the same point to resume from."""
        key = self.key(spec.name)
        if not job.done:
            self._journal(key, attempt, "submitted", ref=ref)
            crashpoints.hit(f"after_journal:{spec.name}")
            return attempt, ref, False, job
        if spec.label:
            self.progress(f"{spec.label}: {job.progress}% {job.message}".rstrip())
        return self._finish(spec, attempt, ref, job, reattached=False, journaled=False)

    def _finish(
        self,
        spec: JobSpec,
        attempt: int,
        ref: str,
        job: ExternalJob,
        reattached: bool,
        *,
        journaled: bool = True,
    ) -> JobOutcome:
        """Journal the job's outcome (and its reference, unless `journaled` already)."""
        details = {str(k): str(v) for k, v in job.details.items()}
        status = "succeeded" if job.ok else "failed"
        self._journal(
            self.key(spec.name),
            attempt,
            status,
            ref=None if journaled else ref,
            result={"message": job.message, "details": details},
        )
        if not journaled:
            crashpoints.hit(f"after_journal:{spec.name}")
        crashpoints.hit(f"after_outcome:{spec.name}")
        return JobOutcome(job.ok, ref, job.message, details, reattached)

    def _journal(
        self,
        key: str,
        attempt: int,
        status: str,
        *,
        ref: str | None = None,
        result: Mapping[str, Any] | None = None,
    ) -> None:
        self._store.journal_write(
            self.guard.lease,
            step_key=key,
            attempt=attempt,
            state=self.run.state,
            status=status,
            external_ref=ref,
            result=result,
        )
        held = self._entry(key)
        if held is not None and held.attempt == attempt:  # as journal_write updates the row
            written = replace(
                held,
                status=status,
                external_ref=held.external_ref if ref is None else ref,
                result=held.result if result is None else dict(result),
            )
        else:
            written = JournalEntry(key, attempt, self.run.state, status, ref, result)
        assert self.journal_seen is not None  # read by _entry just above
        self.journal_seen[key] = written
