"""Where each node of a cycle stands, derived from the truth: the cycle's child runs (one node
run per node and round) and the facts the cycle journaled (waves, scripts, gates, retries,
compensations). Used by the cycle's own step and by `cycle status`; pure."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.model import Run

_CHILD = re.compile(r"child:node:(?P<node>.+):r(?P<round>\d+)$")

DONE, FAILED, PENDING, RUNNING = "done", "failed", "pending", "running"
GATING, RETRYING, COMPENSATING = "gating", "retrying", "compensating"
IN_FLIGHT = frozenset({RUNNING, GATING, RETRYING, COMPENSATING})


def child_name(node: str, round_: int) -> str:
    return f"node:{node}:r{round_}"


def child_of(run: Run) -> tuple[str, int] | None:
    found = _CHILD.search(run.child_key or "")
    return (found["node"], int(found["round"])) if found else None


@dataclass(frozen=True)
class NodeView:
    node: str
    status: str
    run: Run | None
    attempts: int
    outcome: str
    gate: Mapping[str, Any] | None = None
    retries: int = 0
    compensated: bool = False

    @property
    def settled(self) -> bool:
        return self.status in (DONE, FAILED)

    def to_json(self) -> dict[str, Any]:
        run = self.run
        return {
            "node": self.node,
            "run_id": run.id if run else None,
            "state": run.state if run else None,
            "status": self.status,
            "started_at": _iso(run.created_at) if run else None,
            "finished_at": _iso(run.finished_at) if run else None,
            "attempts": self.attempts,
            "outcome": self.outcome,
            "waiting_for": run.waiting_for if run and not run.finished_at else None,
            "gate": dict(self.gate) if self.gate is not None else None,
        }


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def facts_of(entries: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """The cycle's journaled facts by name (over every entry into its states)."""
    return {e.job: dict(e.result or {}) for e in entries if e.status == "succeeded"}


def current_round(published: Mapping[str, Any]) -> int:
    """Rounds count the times the cycle was resumed after it halted (Failed)."""
    return int(published.get("halted", {}).get("round", 0)) + 1


def waves_of(facts: Mapping[str, Mapping[str, Any]], round_: int) -> list[dict[str, Any]]:
    prefix = f"wave:r{round_}:"
    found = [(int(k[len(prefix) :]), v) for k, v in facts.items() if k.startswith(prefix)]
    return [dict(v) for _i, v in sorted(found, key=lambda item: item[0])]


def node_views(
    order: Sequence[str],
    children: Sequence[Run],
    facts: Mapping[str, Mapping[str, Any]],
    round_: int,
    retries_allowed: int,
) -> list[NodeView]:
    return [_view(node, children, facts, round_, retries_allowed) for node in order]


def _view(
    node: str,
    children: Sequence[Run],
    facts: Mapping[str, Mapping[str, Any]],
    round_: int,
    retries_allowed: int,
) -> NodeView:
    mine = [(c, child_of(c)) for c in children]
    runs = [c for c, key in mine if key and key[0] == node]
    for earlier in runs:  # a node that passed its gate in any round is done
        gate = facts.get(f"gate:{node}:{earlier.id}")
        if earlier.state == "Done" and gate and gate.get("ok"):
            return NodeView(node, DONE, earlier, _attempts(earlier, facts), "patched", gate)
    pre = facts.get(f"pre:{node}:r{round_}")
    current = [c for c, key in mine if key == (node, round_)]
    if pre is not None and not pre.get("ok"):
        return NodeView(
            node, FAILED, None, 0, f"skipped: pre-node script failed: {pre.get('output', '')}"
        )
    if not current:
        return NodeView(node, PENDING, runs[-1] if runs else None, 0, "not started")
    return _current(node, current[-1], facts, retries_allowed)


def _current(
    node: str, run: Run, facts: Mapping[str, Mapping[str, Any]], retries_allowed: int
) -> NodeView:
    """Where a node stands from its run of this round."""
    retries = _retries(run, facts)
    attempts = 1 + retries
    compensated = f"compensate:{run.id}" in facts
    reason = str((run.error or {}).get("reason", ""))
    if run.state == "Done":
        gate = facts.get(f"gate:{node}:{run.id}")
        if gate is None:
            return NodeView(node, GATING, run, attempts, "checking its health", None, retries)
        failed = "; ".join(str(c["detail"]) for c in gate.get("checks", []) if not c["ok"])
        return NodeView(node, FAILED, run, attempts, f"health gate failed: {failed}", gate, retries)
    if run.finished_at is not None:  # Aborted, Refused, Abandoned
        what = {"Refused": f"refused: {reason}", "Abandoned": f"released: {reason}"}.get(
            run.state, "aborted"
        )
        if run.state == "Aborted" and compensated:
            what = f"failed: {facts[f'compensate:{run.id}'].get('reason', '')}; compensated"
        return NodeView(node, FAILED, run, attempts, what, None, retries, compensated)
    status, outcome = (
        RUNNING,
        (f"waiting for signal {run.waiting_for!r}" if run.waiting_for else run.state),
    )
    if compensated:
        status = COMPENSATING
        outcome = f"compensation failed: {reason}" if run.failed_from else "compensating"
    elif run.failed_from is not None:
        status = RETRYING if retries < retries_allowed else FAILED
        outcome = f"failed: {reason}"
    return NodeView(node, status, run, attempts, outcome, None, retries, compensated)


def _retries(run: Run, facts: Mapping[str, Mapping[str, Any]]) -> int:
    return sum(1 for k in facts if k.startswith(f"retry:{run.id}:"))


def _attempts(run: Run, facts: Mapping[str, Mapping[str, Any]]) -> int:
    return 1 + _retries(run, facts)


def status(
    run: Run,
    published: Mapping[str, Any],
    children: Sequence[Run],
    entries: Sequence[Any],
) -> dict[str, Any]:
    """`cycle status --json`: the cycle, and where each of its nodes stands."""
    params = run.params
    round_ = current_round(published) if run.state != "Failed" else current_round(published) - 1
    facts = facts_of(entries)
    nodes = node_views(
        list(params["order"]), children, facts, max(round_, 1), int(params["retries_per_node"])
    )
    return {
        "run_id": run.id,
        "workflow": run.workflow,
        "cluster": params["cluster"],
        "state": run.state,
        "wake_at": _iso(run.wake_at),
        "waiting_for": run.waiting_for,
        "round": max(round_, 1),
        "nodes": [n.to_json() for n in nodes],
        "waves": waves_of(facts, max(round_, 1)),
        "plan": published.get("plan"),
        "error": run.error,
        "created_at": _iso(run.created_at),
        "finished_at": _iso(run.finished_at),
    }
