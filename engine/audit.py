"""Verify a run's audit trail: each event's hash covers its content and the previous event's
hash, and the run row records the newest hash. An edited, deleted or re-ordered event breaks the
chain at a place this module names. The chain itself (what an event's hash covers) is
`engine.chain`."""

from __future__ import annotations

from dataclasses import dataclass

from engine import chain
from engine.model import Event
from engine.store import Store


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
        if chain.event_hash(e.prev_hash, chain.hashed_fields(e.__dict__)) != e.hash
    ]
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
