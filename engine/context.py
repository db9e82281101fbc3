"""What a step sees: its run, the published data, signals, progress, and journaled jobs.

`run_job` is the side-effect protocol: journal the intent, submit, journal the external
reference, follow it to the end, journal the outcome. After a crash the same call re-attaches to
the recorded reference instead of submitting again. Waiting is cooperative: every poll renews
nothing by itself (the runner's heartbeat does) but checks the lease and the step's deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine import crashpoints, errors
from engine.model import Lease, Run
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


ProgressSink = Callable[[str], None]


class LeaseGuard(Protocol):
    @property
    def lease(self) -> Lease: ...

    def check(self) -> None:
        """Raise LeaseLost if the heartbeat lost the lease."""


@dataclass
class StepContext:
    store: Store
    run: Run
    guard: LeaseGuard
    deadline: float
    poll_interval: float
    progress_sink: ProgressSink
    published: dict[str, Any]
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    @property
    def params(self) -> Mapping[str, Any]:
        return self.run.params

    def progress(self, message: str) -> None:
        self.progress_sink(message)

    def signal_pending(self, name: str) -> bool:
        return name in self.store.pending_signals(self.run.id)

    def check(self) -> None:
        self.guard.check()
        if self.clock() > self.deadline:
            raise errors.StepTimeout(f"{self.run.state} ran past its timeout")

    def wait(self, seconds: float | None = None) -> None:
        self.check()
        self.sleep(self.poll_interval if seconds is None else seconds)

    def key(self, name: str) -> str:
        """Journal keys are scoped to this entry into the state (its run version)."""
        return f"{self.run.state}@{self.run.version}:{name}"

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
        key = self.key(name)
        entry = self.store.journal(self.run.id, key)
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
            return self._follow(key, entry.attempt, entry.external_ref, poll, label, True)
        attempt = (
            entry.attempt
            if entry and entry.status == "intent"
            else (entry.attempt + 1 if entry else 1)
        )
        existing = find() if find else None
        if existing:
            self._journal(key, attempt, "submitted", ref=existing)
            return self._follow(key, attempt, existing, poll, label, True)
        self._journal(key, attempt, "intent")
        crashpoints.hit(f"before_submit:{name}")
        try:
            ref = submit()
        except errors.BackendError as exc:
            self._journal(key, attempt, "failed", result={"message": str(exc)})
            raise
        crashpoints.hit(f"after_submit:{name}")
        self._journal(key, attempt, "submitted", ref=ref)
        crashpoints.hit(f"after_journal:{name}")
        return self._follow(key, attempt, ref, poll, label, False)

    def _follow(
        self,
        key: str,
        attempt: int,
        ref: str,
        poll: Callable[[str], ExternalJob],
        label: str | None,
        reattached: bool,
    ) -> JobOutcome:
        shown = -1
        while True:
            job = poll(ref)
            if label and (job.progress != shown or job.done):
                shown = job.progress
                self.progress(f"{label}: {job.progress}% {job.message}".rstrip())
            if job.done:
                break
            self.wait()
        details = {str(k): str(v) for k, v in job.details.items()}
        status = "succeeded" if job.ok else "failed"
        self._journal(key, attempt, status, result={"message": job.message, "details": details})
        crashpoints.hit(f"after_outcome:{key.split(':', 1)[1]}")
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
        self.store.journal_write(
            self.guard.lease,
            step_key=key,
            attempt=attempt,
            state=self.run.state,
            status=status,
            external_ref=ref,
            result=result,
        )
