"""Human output: tables and report lines. Machines use --json instead.

A `Table` prints as plain aligned text (`str(table)`: pipes, files, tests); on a terminal
`workflows.terminal.echo` draws it with rich instead.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.model import Event, JournalEntry, Run, utcnow


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Table:
    """Headers, rows of cells and an optional note under the table."""

    headers: tuple[str, ...]
    rows: Sequence[Sequence[Any]]
    note: str = ""

    def __str__(self) -> str:
        text = table(self.headers, self.rows)
        return f"{text}\n{self.note}" if self.note else text

    def cells(self) -> list[list[str]]:
        return [[_cell(v) for v in row] for row in self.rows]


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("\n", "\\n").replace("\r", "\\r")


def plan_table(snapshot: Mapping[str, Any]) -> Table:
    rows = [
        (
            vm["name"],
            vm["id"],
            "yes" if vm["ha"] else "no",
            vm["state"],
            vm["memory_mb"],
            vm["action"],
            _estimated(vm) if vm["action"] == LIVE_MIGRATE else vm.get("target") or "",
        )
        for vm in snapshot["vms"]
    ]
    note = ""
    if any(vm["action"] == LIVE_MIGRATE for vm in snapshot["vms"]):
        note = "~ the cluster picks live-migration targets itself: the capacity check's estimate"
    return Table(("VM", "ID", "HA", "STATE", "MEMORY_MB", "ACTION", "TARGET"), rows, note)


LIVE_MIGRATE = "live-migrate"


def _estimated(vm: Mapping[str, Any]) -> str:
    return f"~{vm['target']}" if vm.get("target") else ""


def vm_report(published: Mapping[str, Any]) -> Table | None:
    """The per-VM table: VM, from, to, action, outcome."""
    report = published.get("rebalance")
    if report is None:
        snapshot = published.get("snapshot")
        if not snapshot:
            return None
        drained = published.get("drained")
        report = [_before_rebalance(vm, drained) for vm in snapshot["vms"]]
    rows = [(r["name"], r["id"], r["from"], r["to"], r["action"], r["outcome"]) for r in report]
    return Table(("VM", "ID", "FROM", "TO", "ACTION", "OUTCOME"), rows)


def _before_rebalance(vm: Mapping[str, Any], drained: Mapping[str, Any] | None) -> dict[str, Any]:
    """A VM's row before the move back: planned (`~` marks the cluster's own choice, only
    estimated), or where the drain left it, even a drain that failed half-way."""
    row = {"name": vm["name"], "id": vm["id"], "from": vm["host"], "action": vm["action"]}
    if drained is None:
        target = vm.get("target")
        live = vm["action"] == LIVE_MIGRATE and target
        return row | {"to": f"~{target}" if live else (target or vm["host"]), "outcome": "planned"}
    left = drained.get(vm["id"])
    if left is None:
        return row | {"to": "?", "outcome": "not moved by this run"}
    moved = left["host"].lower() != vm["host"].lower()
    outcome = f"moved, {left['state']}" if moved else f"on the node, {left['state']}"
    return row | {"to": left["host"], "outcome": outcome}


def warnings(published: Mapping[str, Any]) -> list[str]:
    """The VMs a finished run did not put back as they were, one line each."""
    return [
        f"{r['name']!r} ({r['id']}): {r['outcome']}"
        for r in published.get("rebalance", [])
        if r["outcome"].startswith("skipped")
        or r["outcome"] == "deleted during the run"
        or "by someone else" in r["outcome"]
    ]


def left_as_is(left: Mapping[str, Any]) -> str:
    if "cluster_read" in left:
        return f"node {left['node']}: the cluster could not be read ({left['cluster_read']})"
    where = "in maintenance" if left.get("maintenance") else "not in maintenance"
    lines = [f"left as is: node {left['node']} is {left['node_state']}, {where}"]
    rows = [(v["name"], v["id"], v["from"], v["host"] or "-", v["state"]) for v in left["vms"]]
    if rows:
        lines.append(table(("VM", "ID", "FROM", "NOW ON", "STATE"), rows))
    return "\n".join(lines)


def lease(run: Run, now: dt.datetime) -> dict[str, Any]:
    """Who holds the run and whether that process is alive (its heartbeat renews the lease)."""
    live = run.lease_live(now)
    return {
        "holder": run.lease_owner,
        "live": live,
        "heartbeat_age_s": _age(now, run.heartbeat_at),
        "expires_in_s": round((run.lease_expires_at - now).total_seconds(), 1)
        if run.lease_expires_at
        else None,
    }


def _age(now: dt.datetime, then: dt.datetime | None) -> float | None:
    return round((now - then).total_seconds(), 1) if then else None


def lease_line(run: Run, now: dt.datetime, final: bool) -> str:
    info = lease(run, now)
    if final:
        return "finished: no process holds it"
    if info["live"]:
        return (
            f"held by {info['holder']} (heartbeat {info['heartbeat_age_s']:g} s ago, "
            f"lease for {info['expires_in_s']:g} s more)"
        )
    gone = f" (last holder {info['holder']}, lease expired)" if info["holder"] else ""
    return f"no live process holds it{gone}: continue with `nodepatch resume {run.id}`"


def durations(events: Sequence[Event], now: dt.datetime, final: bool) -> list[dict[str, Any]]:
    """Each stay in a state: when it was entered and how long the run spent there."""
    entered = [(e.to_state, e.occurred_at) for e in events if e.kind in ("created", "transition")]
    out = []
    for i, (state, at) in enumerate(entered):
        last = i == len(entered) - 1
        end = None if last else entered[i + 1][1]
        if last and final:
            continue
        seconds = ((end or now) - at).total_seconds()
        out.append(
            {"state": state, "entered": at.isoformat(), "seconds": round(seconds, 1), "now": last}
        )
    return out


def durations_table(stays: Sequence[Mapping[str, Any]]) -> Table:
    rows = [
        (
            s["state"],
            s["entered"][:19].replace("T", " "),
            _human(s["seconds"]) + (" so far" if s["now"] else ""),
        )
        for s in stays
    ]
    return Table(("STATE", "ENTERED (UTC)", "FOR"), rows)


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def patch_line(published: Mapping[str, Any]) -> str | None:
    patch = published.get("patch")
    if not patch:
        return None
    kbs = patch.get("kbs") or "none reported"
    reboot = patch.get("reboot")
    rebooted = "" if reboot is None else f"; reboot: {reboot}"
    return f"patched with {patch.get('patcher')}: updates {kbs}{rebooted}"


def journal_table(entries: Sequence[JournalEntry]) -> Table:
    rows = [
        (
            f"{e.created_at:%H:%M:%S}" if e.created_at else "",
            f"{e.updated_at:%H:%M:%S}" if e.updated_at else "",
            e.step_key,
            e.attempt,
            e.status,
            e.external_ref or "",
            (e.result or {}).get("message", ""),
        )
        for e in entries
    ]
    return Table(("STARTED", "UPDATED", "JOB", "TRY", "STATUS", "REFERENCE", "MESSAGE"), rows)


def run_summary(run: Run) -> str:
    lines = [f"run {run.id}  {run.subject}  state {run.state}"]
    if run.waiting_for:
        lines.append(f"waiting for signal {run.waiting_for!r}")
    if run.error:
        lines.append(f"error: {run.error.get('reason')} (in {run.error.get('state')})")
    if run.state == "Refused":
        lines.append("refused before anything was touched; it blocks nothing")
    return "\n".join(lines)


def runs_table(runs: Sequence[Run]) -> Table:
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
    return Table(("RUN", "CLUSTER/NODE", "STATE", "CREATED (UTC)", "BY", "ERROR"), rows)


def history_table(events: Sequence[Event]) -> Table:
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
    return Table(("TIME (UTC)", "KIND", "TRIGGER", "TRANSITION", "ACTOR", "DETAIL"), rows)


def run_json(run: Run, published: Mapping[str, Any], stopped: str | None = None) -> dict[str, Any]:
    return {
        "run_id": run.id,
        "workflow": run.workflow,
        "workflow_version": run.workflow_version,
        "parent_run_id": run.parent_run_id,
        "wake_at": run.wake_at.isoformat() if run.wake_at else None,
        "detached": run.detached,
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
        "lease": lease(run, utcnow()),
        "warnings": warnings(published),
        "published": dict(published),
    }
