"""Frozen value objects read from the store. Pure: no I/O."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes; everything the engine stores is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Run:
    id: str
    workflow: str
    workflow_version: int
    subject: str
    state: str
    version: int
    params: Mapping[str, Any]
    lease_owner: str | None
    lease_token: int
    lease_expires_at: dt.datetime | None
    waiting_for: str | None
    failed_from: str | None
    error: Mapping[str, Any] | None
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    audit_head: str | None = None
    heartbeat_at: dt.datetime | None = None
    wake_at: dt.datetime | None = None
    parent_run_id: str | None = None
    root_run_id: str | None = None
    child_key: str | None = None
    detached: bool = False

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Run:
        values = {name: row[name] for name in _RUN_FIELDS}
        for name in _RUN_TIMES:  # as_utc, inline: a run is read on every transition
            value = values[name]
            if value is not None and value.tzinfo is None:
                values[name] = value.replace(tzinfo=dt.UTC)
        return cls(**values)

    @property
    def root(self) -> str:
        """The run that owns this run's locks: the top of its family (itself when it has no
        parent)."""
        return self.root_run_id or self.id

    def lease_live(self, now: dt.datetime) -> bool:
        return self.lease_owner is not None and (
            self.lease_expires_at is not None and self.lease_expires_at > now
        )


_RUN_FIELDS = tuple(Run.__dataclass_fields__)
_RUN_TIMES = (
    "lease_expires_at", "created_at", "updated_at", "finished_at", "heartbeat_at", "wake_at",
)  # fmt: skip


class Loaded(NamedTuple):
    """A run as the runner reads it before a step: the run, its pending signals (names, oldest
    first) and its published data."""

    run: Run
    signals: list[str]
    published: dict[str, Any]


@dataclass(frozen=True)
class Event:
    id: int
    run_id: str
    run_version: int
    kind: str
    trigger: str | None
    from_state: str | None
    to_state: str | None
    actor: str
    lease_token: int
    occurred_at: dt.datetime
    details: Mapping[str, Any]
    prev_hash: str
    hash: str

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Event:
        values = {name: row[name] for name in cls.__dataclass_fields__}
        values["occurred_at"] = as_utc(values["occurred_at"])
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "run_version": self.run_version,
            "kind": self.kind,
            "trigger": self.trigger,
            "from": self.from_state,
            "to": self.to_state,
            "actor": self.actor,
            "time": self.occurred_at.isoformat(),
            "details": dict(self.details),
            "hash": self.hash,
        }


@dataclass(frozen=True)
class JournalEntry:
    step_key: str
    attempt: int
    state: str
    status: str
    external_ref: str | None
    result: Mapping[str, Any] | None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> JournalEntry:
        values = {name: row[name] for name in cls.__dataclass_fields__}
        for name in ("created_at", "updated_at"):
            values[name] = as_utc(values[name])
        return cls(**values)

    @property
    def job(self) -> str:
        """The job's name within its step (`move_vm:<id>`), without the state@version scope."""
        return self.step_key.split(":", 1)[1]

    @property
    def may_have_acted(self) -> bool:
        """Whether the external system may have done this job: anything but a request that was
        refused when it was submitted. An intent counts (the process may have died after
        submitting, before journaling the reference)."""
        return not (self.status == "failed" and not self.external_ref)


@dataclass(frozen=True)
class Lease:
    run_id: str
    owner: str
    token: int
