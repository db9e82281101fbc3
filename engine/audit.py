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
    from engine.model import Event
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
    """One problem in a run's trail: `kind` is edited, deleted or re-ordered; `event_id` is
    where it shows (for deleted events at the end, the last event that remains)."""

    run_id: str
    event_id: int | None
    kind: str
    problem: str


def verify(store: Store, run_id: str) -> list[Finding]:
    run = store.get(run_id)
    events = store.events(run_id)
    findings = [
        Finding(run_id, e.id, "edited", "its content does not match its hash: edited")
        for e in events
        if event_hash(e.prev_hash, hashed_fields(e.__dict__)) != e.hash
    ]
    chain, gaps = _chain_order(events)
    findings += [
        Finding(run_id, e.id, "deleted", "the event before it is missing: deleted") for e in gaps
    ]
    findings += [
        Finding(run_id, by_id.id, "re-ordered", "it is out of its place in the chain: re-ordered")
        for by_id, by_chain in zip(events, chain, strict=True)
        if by_id.id != by_chain.id
    ]
    last = events[-1].hash if events else GENESIS
    if (run.audit_head or GENESIS) != last:
        findings.append(
            Finding(
                run_id,
                events[-1].id if events else None,
                "deleted",
                "the events after it are missing (the run records a newer head): deleted",
            )
        )
    return sorted(findings, key=lambda f: (f.event_id is None, f.event_id or 0, f.kind))


def _chain_order(events: list[Event]) -> tuple[list[Event], list[Event]]:
    """The events in the order their hashes link them, from the genesis; and the events whose
    predecessor is missing (the chain resumes at each of them, in ID order)."""
    known = {e.hash for e in events} | {GENESIS}
    after = {e.prev_hash: e for e in events}
    chain: list[Event] = []
    gaps: list[Event] = []
    placed: set[int] = set()
    head = GENESIS
    while len(chain) < len(events):
        nxt = after.get(head)
        if nxt is None or nxt.id in placed:
            nxt = next(e for e in events if e.id not in placed)
            if nxt.prev_hash not in known:
                gaps.append(nxt)
        chain.append(nxt)
        placed.add(nxt.id)
        head = nxt.hash
    return chain, gaps
