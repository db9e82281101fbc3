"""Human output: plain tables for terminals. Machines use --json instead."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engine.model import Event, Run


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("\n", "\\n").replace("\r", "\\r")


def plan_table(snapshot: Mapping[str, Any]) -> str:
    rows = [
        (
            vm["name"],
            vm["id"],
            "yes" if vm["ha"] else "no",
            vm["state"],
            vm["memory_mb"],
            vm["action"],
            vm.get("target") or "",
        )
        for vm in snapshot["vms"]
    ]
    return table(("VM", "ID", "HA", "STATE", "MEMORY_MB", "ACTION", "TARGET"), rows)


def vm_report(published: Mapping[str, Any]) -> str | None:
    """The per-VM table: VM, from, to, action, outcome."""
    report = published.get("rebalance")
    if report is None:
        snapshot = published.get("snapshot")
        if not snapshot:
            return None
        drained = published.get("drained", {})
        report = [
            {
                "name": vm["name"],
                "id": vm["id"],
                "from": vm["host"],
                "to": drained.get(vm["id"], {}).get("host", vm.get("target") or vm["host"]),
                "action": vm["action"],
                "outcome": "planned" if not drained else "drained",
            }
            for vm in snapshot["vms"]
        ]
    rows = [(r["name"], r["id"], r["from"], r["to"], r["action"], r["outcome"]) for r in report]
    return table(("VM", "ID", "FROM", "TO", "ACTION", "OUTCOME"), rows)


def run_summary(run: Run) -> str:
    lines = [f"run {run.id}  {run.subject}  state {run.state}"]
    if run.waiting_for:
        lines.append(f"waiting for signal {run.waiting_for!r}")
    if run.error:
        lines.append(f"error: {run.error.get('reason')} (in {run.error.get('state')})")
    return "\n".join(lines)


def runs_table(runs: Sequence[Run]) -> str:
    rows = [
        (
            r.id,
            r.subject,
            r.state,
            f"{r.created_at:%Y-%m-%d %H:%M:%S}",
            r.created_by,
            (r.error or {}).get("reason", ""),
        )
        for r in runs
    ]
    return table(("RUN", "CLUSTER/NODE", "STATE", "CREATED (UTC)", "BY", "ERROR"), rows)


def history_table(events: Sequence[Event]) -> str:
    rows = []
    for e in events:
        what = f"{e.from_state or ''} -> {e.to_state}" if e.kind == "transition" else ""
        if e.kind == "created":
            what = f"-> {e.to_state}"
        detail = (
            e.details.get("error", {}).get("reason")
            if "error" in e.details
            else (
                e.details.get("signal")
                or e.details.get("reason")
                or e.details.get("taken_over_from")
                or ""
            )
        )
        rows.append(
            (f"{e.occurred_at:%Y-%m-%d %H:%M:%S}", e.kind, e.trigger or "", what, e.actor, detail)
        )
    return table(("TIME (UTC)", "KIND", "TRIGGER", "TRANSITION", "ACTOR", "DETAIL"), rows)


def run_json(run: Run, published: Mapping[str, Any], stopped: str | None = None) -> dict[str, Any]:
    return {
        "run_id": run.id,
        "cluster": run.params.get("cluster"),
        "node": run.params.get("node"),
        "state": run.state,
        "stopped": stopped,
        "waiting_for": run.waiting_for,
        "error": dict(run.error) if run.error else None,
        "params": dict(run.params),
        "created_at": run.created_at.isoformat(),
        "created_by": run.created_by,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "published": dict(published),
    }
