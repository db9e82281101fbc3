"""Past runs of a cluster (`nodepatch runs --since`): cycles and node runs with their outcome
and duration. Pure: runs in, rows and a table out."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from engine.model import Run
from workflows import render
from workflows.node_patch import NODE_PATCH
from workflows.report import data


def select(
    runs: Sequence[Run], cluster: str | None, node: str | None, since: dt.datetime
) -> list[Run]:
    """The runs started at or after `since`, of `cluster` (by their params, or a subject of
    the cluster) and `node` if given, newest first as the store gives them."""

    def of_cluster(run: Run) -> bool:
        if cluster is None:
            return True
        named = str(run.params.get("cluster") or "").lower() == cluster.lower()
        subject = run.subject.lower()
        return named or subject == cluster.lower() or subject.startswith(f"{cluster.lower()}/")

    def of_node(run: Run) -> bool:
        return node is None or str(run.params.get("node") or "").lower() == node.lower()

    return [r for r in runs if r.created_at >= since and of_cluster(r) and of_node(r)]


def kind(run: Run) -> str:
    """node (a node patch), cycle (a cluster cycle), else the workflow's name."""
    if run.workflow == NODE_PATCH:
        return "node"
    return "cycle" if "cycle" in run.workflow else run.workflow


def row(run: Run, now: dt.datetime) -> dict[str, Any]:
    """A run as `runs --since --json` lists it."""
    return {
        "run_id": run.id,
        "kind": kind(run),
        "workflow": run.workflow,
        "subject": run.subject,
        "cluster": run.params.get("cluster"),
        "node": run.params.get("node"),
        "parent_run_id": run.parent_run_id,
        "state": run.state,
        "outcome": data.outcome(run),
        "started_at": run.created_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "duration_s": data.duration_s(run, now),
        "started_by": run.created_by,
    }


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    cells = [
        (
            r["run_id"],
            r["kind"] if not r["parent_run_id"] else f"node of {r['parent_run_id']}",
            r["subject"],
            r["state"],
            r["started_at"][:19].replace("T", " "),
            _duration(r),
            r["outcome"],
        )
        for r in rows
    ]
    headers = ("RUN", "KIND", "SUBJECT", "STATE", "STARTED (UTC)", "DURATION", "OUTCOME")
    return render.table(headers, cells)


def _duration(r: Mapping[str, Any]) -> str:
    seconds = float(r["duration_s"])
    if seconds < 120:
        text = f"{seconds:.1f} s"
    elif seconds < 7200:
        text = f"{seconds / 60:.0f} min"
    else:
        text = f"{seconds / 3600:.1f} h"
    return text if r["finished_at"] else f"{text} so far"
