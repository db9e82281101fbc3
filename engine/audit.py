"""Verify a run's audit trail: each event's hash covers its content and the previous event's
hash, and the run row records the newest hash. An edited, deleted or re-ordered event breaks the
chain at a place this module names. The chain itself (what an event's hash covers) is
`engine.chain`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine import chain
from engine.model import Event
from engine.store import Store


@dataclass(frozen=True)
class Finding:
    """One problem in a run's trail: `kind` is edited, deleted or re-ordered; `event_id` is
    where it shows (for deleted events at the end, the last event that remains). An event whose
    stored JSON no longer parses is `edited`, saying so."""

    run_id: str
    event_id: int | None
    kind: str
    problem: str


def verify(store: Store, run_id: str) -> list[Finding]:
    run = store.get(run_id)
    events: list[Event] = []
    findings: list[Finding] = []
    for row in store.stored_events(run_id):
        event, garbled = _parsed(row)
        events.append(event)
        if garbled:
            findings.append(Finding(run_id, event.id, "edited", garbled))
        elif chain.event_hash(event.prev_hash, chain.hashed_fields(event.__dict__)) != event.hash:
            findings.append(
                Finding(run_id, event.id, "edited", "its content does not match its hash: edited")
            )
    ordered, gaps = _chain_order(events)
    findings += [
        Finding(run_id, e.id, "deleted", "the event before it is missing: deleted") for e in gaps
    ]
    findings += [
        Finding(run_id, by_id.id, "re-ordered", "it is out of its place in the chain: re-ordered")
        for by_id, by_chain in zip(events, ordered, strict=True)
        if by_id.id != by_chain.id
    ]
    last = events[-1].hash if events else chain.GENESIS
    if (run.audit_head or chain.GENESIS) != last:
        findings.append(
            Finding(
                run_id,
                events[-1].id if events else None,
                "deleted",
                "the events after it are missing (the run records a newer head): deleted",
            )
        )
    return sorted(findings, key=lambda f: (f.event_id is None, f.event_id or 0, f.kind))


def _parsed(row: dict[str, Any]) -> tuple[Event, str | None]:
    """The event of a stored row, and why its details cannot be read (None when they can)."""
    try:
        details = json.loads(row["details"])
    except json.JSONDecodeError as exc:
        reason = f"its details are not valid JSON ({exc.msg} at character {exc.pos}): edited"
        return Event.from_row({**row, "details": {}}), reason
    return Event.from_row({**row, "details": details}), None


def _chain_order(events: list[Event]) -> tuple[list[Event], list[Event]]:
    """The events in the order their hashes link them, from the genesis; and the events whose
    predecessor is missing (the chain resumes at each of them, in ID order)."""
    known = {e.hash for e in events} | {chain.GENESIS}
    after = {e.prev_hash: e for e in events}
    ordered: list[Event] = []
    gaps: list[Event] = []
    placed: set[int] = set()
    head = chain.GENESIS
    while len(ordered) < len(events):
        nxt = after.get(head)
        if nxt is None or nxt.id in placed:
            nxt = next(e for e in events if e.id not in placed)
            if nxt.prev_hash not in known:
                gaps.append(nxt)
        ordered.append(nxt)
        placed.add(nxt.id)
        head = nxt.hash
    return ordered, gaps
