"""Verify a run's audit trail: each event's hash covers its content and the previous event's
hash, and the run row records the newest hash. An edited, deleted or re-ordered event breaks the
chain at a place this module names."""

from __future__ import annotations

from dataclasses import dataclass

from engine.store import GENESIS, Store, event_hash, hashed_fields


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
