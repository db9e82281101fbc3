"""The report of a past run, as one plain JSON-ready dict: a node patch, or a cycle (a run with
child runs) with every node run it started.

`collect` is the only I/O: it reads each run of the family from the store once (run, audit
events, published data, step journal, audit verification). `build` turns that into the report
and is pure, so every figure in a report can be traced to a row of the database."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine import audit
from engine.model import Event, JournalEntry, Run
from engine.store import Store
from workflows import render
from workflows.report import vms as vm_rows

FORMAT_VERSION = 1
# The child key a cycle gives each node run: `<State>@<version>:child:node:<NODE>:r<ROUND>`.
CHILD_KEY = re.compile(r":child:node:(?P<node>.+):r(?P<round>\d+)$")
# What a cycle journals about a node run: `<State>@<version>:<fact>:<NODE>:<child run ID>`.
FACTS = ("gate", "pre", "post")
FINISHED_OK = "Done"


@dataclass(frozen=True)
class RunRecord:
    """Everything the store holds about one run, read once."""

    run: Run
    events: Sequence[Event]
    published: Mapping[str, Any]
    journal: Sequence[JournalEntry]
    findings: Sequence[audit.Finding]


@dataclass(frozen=True)
class Family:
    root: RunRecord
    children: Sequence[RunRecord]


def collect(store: Store, run_id: str) -> Family:
    """Read RUN and its child runs (for a cycle, its node runs) from the store."""

    def record(run: Run) -> RunRecord:
        return RunRecord(
            run=run,
            events=store.events(run.id),
            published=store.published(run.id),
            journal=store.journal_entries(run.id),
            findings=audit.verify(store, run.id),
        )

    root = store.get(run_id)
    return Family(record(root), [record(child) for child in store.children(root.id)])


def build(family: Family, now: dt.datetime) -> dict[str, Any]:
    """The whole report: the run, its plan, per node its runs, per VM its actions, the audit."""
    root = family.root
    cycle = bool(family.children)
    facts = _facts(root.journal) if cycle else {}
    by_node: dict[str, list[dict[str, Any]]] = {}
    for rec in family.children if cycle else [root]:
        section = node_run(rec, now, facts.get(rec.run.id, {}))
        by_node.setdefault(section["node"], []).append(section)
    plan = _plan(root, cycle)
    nodes = [_node(name, by_node.get(name, [])) for name in _node_order(plan, by_node)]
    return {
        "report": {"format_version": FORMAT_VERSION, "generated_at": now.isoformat()},
        "kind": "cycle" if cycle else "node",
        "run": header(root.run, root.events, now),
        "states": stays(root.events, now, finished=root.run.finished_at is not None),
        "plan": plan,
        "nodes": nodes,
        "vm_actions": [row for n in nodes for r in n["runs"] for row in r["vms"]],
        "journal": [_job(e) for e in root.journal] if cycle else [],
        "audit": audit_summary([root, *family.children] if cycle else [root]),
    }


# ---- a run ---------------------------------------------------------------------------------


def header(run: Run, events: Sequence[Event], now: dt.datetime) -> dict[str, Any]:
    """Who started the run and when, what with, how it ended and how long it took."""
    created = next((e for e in events if e.kind == "created"), None)
    actors = list(dict.fromkeys(e.actor for e in events))
    return {
        "run_id": run.id,
        "workflow": run.workflow,
        "workflow_version": run.workflow_version,
        "subject": run.subject,
        "cluster": run.params.get("cluster"),
        "state": run.state,
        "outcome": outcome(run),
        "error": dict(run.error) if run.error else None,
        "started_by": created.actor if created else run.created_by,
        "started_at": (created.occurred_at if created else run.created_at).isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "duration_s": duration_s(run, now),
        "actors": actors,
        "params": dict(run.params),
        "parent_run_id": run.parent_run_id,
    }


def outcome(run: Run) -> str:
    """One phrase: done, failed and why, refused, aborted, or how far an unfinished run is."""
    reason = (run.error or {}).get("reason")
    if run.finished_at is None and run.state != "Failed":
        waiting = f", waiting for signal {run.waiting_for!r}" if run.waiting_for else ""
        return f"unfinished: in {run.state}{waiting}"
    word = run.state.lower()
    return f"{word}: {reason}" if reason and run.state != FINISHED_OK else word


def duration_s(run: Run, now: dt.datetime) -> float:
    """From creation to the end (to `now` for a run not finished)."""
    return round(((run.finished_at or now) - run.created_at).total_seconds(), 3)


def stays(events: Sequence[Event], now: dt.datetime, *, finished: bool) -> list[dict[str, Any]]:
    """Each stay in a state, from the audit trail's created and transition events: when it was
    entered and left, by which trigger, and for how long (a stay not left yet runs to `now`;
    the state a finished run ended in has no length)."""
    entered = [e for e in events if e.kind in ("created", "transition")]
    out = []
    for i, event in enumerate(entered):
        left = entered[i + 1].occurred_at if i + 1 < len(entered) else None
        seconds = None if left is None and finished else ((left or now) - event.occurred_at)
        out.append(
            {
                "state": event.to_state,
                "entered": event.occurred_at.isoformat(),
                "left": left.isoformat() if left else None,
                "seconds": None if seconds is None else round(seconds.total_seconds(), 3),
                "trigger": event.trigger,
                "actor": event.actor,
                "event_id": event.id,
            }
        )
    return out


def retries(events: Sequence[Event]) -> list[dict[str, Any]]:
    """Every `retry:<State>` transition: a failed step tried again."""
    return [
        {"state": e.to_state, "at": e.occurred_at.isoformat(), "actor": e.actor}
        for e in events
        if e.kind == "transition" and (e.trigger or "").startswith("retry:")
    ]


def node_run(rec: RunRecord, now: dt.datetime, facts: Mapping[str, Any]) -> dict[str, Any]:
    """One node run: its header, state times, attempts, patch, per-VM actions, jobs, audit,
    and what its cycle recorded about it (health gate, pre- and post-node scripts)."""
    run = rec.run
    found = CHILD_KEY.search(run.child_key or "")
    node = found["node"] if found else str(run.params.get("node") or run.subject)
    tried = retries(rec.events)
    head = header(run, rec.events, now)
    not_back = render.warnings(rec.published)
    if not_back and run.finished_at is not None:
        head["outcome"] += f", {len(not_back)} VM(s) not put back"
    return {
        **head,
        "warnings": not_back,
        "node": node,
        "child_key": run.child_key,
        "round": int(found["round"]) if found else None,
        "states": stays(rec.events, now, finished=run.finished_at is not None),
        "attempts": 1 + len(tried),
        "retries": tried,
        "patch": rec.published.get("patch"),
        "aborted": rec.published.get("aborted"),
        "released": rec.published.get("released"),
        "problems": list((rec.published.get("snapshot") or {}).get("problems", [])),
        "vms": vm_rows.rows(run.id, node, rec.published, rec.journal),
        "jobs": [_job(e) for e in rec.journal],
        "audit": _run_audit(rec),
        "gate": facts.get("gate"),
        "pre": facts.get("pre"),
        "post": facts.get("post"),
    }


def _job(entry: JournalEntry) -> dict[str, Any]:
    result = entry.result or {}
    return {
        "key": entry.step_key,
        "state": entry.state,
        "job": entry.job,
        "attempt": entry.attempt,
        "status": entry.status,
        "job_id": entry.external_ref,
        "started_at": entry.created_at.isoformat() if entry.created_at else None,
        "ended_at": entry.updated_at.isoformat()
        if entry.updated_at and entry.status in ("succeeded", "failed")
        else None,
        "message": result.get("message", "") if isinstance(result, Mapping) else "",
    }


# ---- a cycle -------------------------------------------------------------------------------


def _facts(journal: Sequence[JournalEntry]) -> dict[str, dict[str, Any]]:
    """What the cycle journaled per node run (`gate`, `pre`, `post`), by child run ID; of
    several attempts the latest."""
    out: dict[str, dict[str, Any]] = {}
    for entry in sorted(journal, key=lambda e: e.attempt):
        kind, _, rest = entry.job.partition(":")
        node, _, child = rest.rpartition(":")
        if kind not in FACTS or not node or not child:
            continue
        out.setdefault(child, {})[kind] = {
            "node": node,
            "status": entry.status,
            "at": (entry.updated_at or entry.created_at or dt.datetime.min).isoformat(),
            **dict(entry.result or {}),
        }
    return out


def _plan(root: RunRecord, cycle: bool) -> dict[str, Any]:
    """The cycle's published plan; for a node run the same shape from its snapshot."""
    if cycle:
        plan = dict(root.published.get("plan") or {})
        plan.setdefault("order", [])
        plan.setdefault("waves", [])
        plan.setdefault("vms", {})
        plan.setdefault("problems", [])
        return plan
    snapshot = root.published.get("snapshot") or {}
    node = str(root.run.params.get("node") or root.run.subject)
    return {
        "order": [node],
        "waves": [{"nodes": [node], "reason": "a single node run"}],
        "vms": {node: list(snapshot.get("vms", []))},
        "problems": list(snapshot.get("problems", [])),
    }


def _node_order(plan: Mapping[str, Any], by_node: Mapping[str, Any]) -> list[str]:
    """The plan's order, then any node that has runs but is not in it, by first run."""
    order = [str(n) for n in plan.get("order", [])]
    return order + [n for n in by_node if n not in order]


def _node(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A node of the report: its runs (the latest last), where it ended and how many tries."""
    runs = sorted(runs, key=lambda r: (r["started_at"], r["run_id"]))
    latest = runs[-1] if runs else None
    return {
        "node": name,
        "state": latest["state"] if latest else None,
        "outcome": latest["outcome"] if latest else "not started",
        "runs": runs,
        "attempts": sum(r["attempts"] for r in runs),
        "gate_ok": (latest["gate"] or {}).get("ok") if latest else None,
    }


# ---- the audit -----------------------------------------------------------------------------


def _run_audit(rec: RunRecord) -> dict[str, Any]:
    return {
        "run_id": rec.run.id,
        "intact": not rec.findings,
        "head": rec.run.audit_head,
        "last_event_hash": rec.events[-1].hash if rec.events else None,
        "events": len(rec.events),
        "findings": [
            {"event_id": f.event_id, "kind": f.kind, "problem": f.problem} for f in rec.findings
        ],
    }


def audit_summary(records: Sequence[RunRecord]) -> dict[str, Any]:
    """The chain verification of every run in the report; the head is the reported run's."""
    runs = [_run_audit(rec) for rec in records]
    return {
        "intact": all(r["intact"] for r in runs),
        "head": records[0].run.audit_head,
        "runs_checked": len(runs),
        "runs": runs,
    }
