"""Verify a run's audit trail: each event's hash covers its content and the previous event's
hash, and the run row records the newest hash. An edited, deleted or re-ordered event breaks the
chain at a place this module names."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.store import Store

GENESIS = "0" * 64


def event_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def hashed_fields(event: Mapping[str, Any]) -> dict[str, Any]:
    """The fields an event's hash covers (everything but its id and the hashes)."""
    occurred = event["occurred_at"]
    if isinstance(occurred, dt.datetime):
        if occurred.tzinfo is not None:
            occurred = occurred.astimezone(dt.UTC)
        occurred = occurred.replace(tzinfo=None).isoformat()
    return {
        "run_id": event["run_id"],
        "run_version": event["run_version"],
        "kind": event["kind"],
        "trigger": event["trigger"],
        "from_state": event["from_state"],
        "to_state": event["to_state"],
        "actor": event["actor"],
        "lease_token": event["lease_token"],
        "occurred_at": occurred,
        "details": event["details"],
    }


@dataclass(frozen=True)
class Finding:
    run_id: str
    event_id: int | None
    problem: str


def verify(store: Store, run_id: str) -> list[Finding]:
    run = store.get(run_id)
    findings: list[Finding] = []
    expected_prev = GENESIS
    last = GENESIS
    for event in store.events(run_id):
        fields = hashed_fields(event.__dict__)
        if event.prev_hash != expected_prev:
            findings.append(
                Finding(
                    run_id, event.id, "chain broken: an earlier event was deleted or re-ordered"
                )
            )
        if event_hash(event.prev_hash, fields) != event.hash:
            findings.append(Finding(run_id, event.id, "content does not match its hash: edited"))
        expected_prev = last = event.hash
    if (run.audit_head or GENESIS) != last:
        findings.append(
            Finding(run_id, None, "the newest events are missing: deleted after the fact")
        )
    return findings
