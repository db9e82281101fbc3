"""Per-VM rows of a node run's report, pure: from its published data (`snapshot`, `drained`,
`rebalance`) and its step journal (the cluster/VMM job of each action, with its times)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from engine.model import JournalEntry

POWERED_OFF_BY_RUN = ("save", "shutdown")
DRAIN_JOBS = ("enter_maintenance", "enter_maintenance_again")
MOVED_BY_OTHERS = re.compile(r"moved by someone else to (?P<host>[^\s(,]+)")
POWER_CHANGED = re.compile(r"power state changed by someone else \((?P<was>\w+) -> (?P<now>\w+)\)")


def rows(
    run_id: str, node: str, published: Mapping[str, Any], journal: Sequence[JournalEntry]
) -> list[dict[str, Any]]:
    """One row per VM of the run's snapshot: what was planned, done and found afterwards."""
    snapshot = published.get("snapshot") or {}
    rebalance = {r["id"]: r for r in published.get("rebalance") or []}
    drained = published.get("drained")
    return [
        _row(run_id, node, vm, rebalance.get(vm["id"]), drained=drained, journal=journal)
        for vm in snapshot.get("vms", [])
    ]


def _row(
    run_id: str,
    node: str,
    vm: Mapping[str, Any],
    done: Mapping[str, Any] | None,
    *,
    drained: Mapping[str, Any] | None,
    journal: Sequence[JournalEntry],
) -> dict[str, Any]:
    jobs = vm_jobs(vm, journal)
    down, up = power_times(vm, journal)
    to, outcome = (done["to"], done["outcome"]) if done else _before_rebalance(vm, drained)
    after_host, after_state = after(vm, to, outcome) if done else (None, None)
    return {
        "run_id": run_id,
        "node": node,
        "vm_id": vm["id"],
        "vm_name": vm["name"],
        "ha": vm.get("ha"),
        "memory_mb": vm.get("memory_mb"),
        "action": vm["action"],
        "from": vm["host"],
        "to": to,
        "outcome": outcome,
        "state_before": vm.get("state"),
        "after_host": after_host,
        "after_state": after_state,
        "job_ids": [j["job_id"] for j in jobs if j["job_id"]],
        "jobs": jobs,
        "down_at": down.isoformat() if down else None,
        "up_at": up.isoformat() if up else None,
        "downtime_s": round((up - down).total_seconds(), 3) if down and up else None,
    }


def _before_rebalance(
    vm: Mapping[str, Any], drained: Mapping[str, Any] | None
) -> tuple[str | None, str]:
    """Where the VM is and what happened so far, for a run that has not moved VMs back."""
    if drained is None:
        return vm.get("target") or vm["host"], "planned"
    left = drained.get(vm["id"])
    if left is None:
        return None, "not moved by this run"
    moved = str(left["host"]).lower() != str(vm["host"]).lower()
    return left["host"], f"{'moved' if moved else 'on the node'}, {left['state']}"


def after(vm: Mapping[str, Any], to: str | None, outcome: str) -> tuple[str | None, str | None]:
    """Where the VM ended and in which power state, as the run's move back found it."""
    if outcome.startswith("deleted"):
        return None, None
    others = MOVED_BY_OTHERS.search(outcome)
    stayed_away = outcome.startswith(("pending", "failed to move back", "skipped: not enough"))
    host = others["host"] if others else (to if stayed_away else vm["host"])
    power = POWER_CHANGED.search(outcome)
    if power:
        return host, power["now"]
    if "started" in outcome:
        return host, "Running"
    return host, vm.get("state")


def vm_jobs(vm: Mapping[str, Any], journal: Sequence[JournalEntry]) -> list[dict[str, Any]]:
    """The jobs that acted on the VM: its own (move, save, shut down, start) and, for a VM the
    drain live-migrates, the node's maintenance job that moved it."""
    own = [e for e in journal if e.job.partition(":")[2] == vm["id"]]
    if vm["action"] == "live-migrate":
        own += [e for e in journal if e.job in DRAIN_JOBS]
    own.sort(key=lambda e: (e.created_at is None, e.created_at, e.step_key, e.attempt))
    return [
        {
            "job": e.job.partition(":")[0],
            "state": e.state,
            "attempt": e.attempt,
            "status": e.status,
            "job_id": e.external_ref,
        }
        for e in own
    ]


def power_times(vm: Mapping[str, Any], journal: Sequence[JournalEntry]) -> tuple[Any, Any]:
    """When a VM the run saved or shut down went down (its save/shutdown job's end) and came
    back (its start job's end), from the journal; None where that did not happen."""
    if vm["action"] not in POWERED_OFF_BY_RUN:
        return None, None
    down = _ended(journal, f"{vm['action']}_vm:{vm['id']}")
    up = _ended(journal, f"start_vm:{vm['id']}")
    return down, (up if down and up and up >= down else None)


def _ended(journal: Sequence[JournalEntry], job: str) -> Any:
    ends = [e.updated_at for e in journal if e.job == job and e.status == "succeeded"]
    return max((t for t in ends if t is not None), default=None)
