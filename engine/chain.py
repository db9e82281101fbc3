"""The audit trail's hash chain, pure: each event's hash covers its fields and the hash of the
event before it in its run (the first one follows GENESIS), and the run row keeps the newest
hash (`run.audit_head`). The store appends to the chain; `engine.audit` verifies it."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from typing import Any

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


def linked(event: Mapping[str, Any], prev_hash: str) -> dict[str, Any]:
    """The event with its place in the chain: `prev_hash` and its own `hash`."""
    return {**event, "prev_hash": prev_hash, "hash": event_hash(prev_hash, hashed_fields(event))}
