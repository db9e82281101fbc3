"""The report as one self-contained HTML page: inline CSS, an inline SVG timeline of nodes and
their states, tables; no script, no network asset. Pure: a report dict in, a string out."""

from __future__ import annotations

import datetime as dt
import html
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from workflows.report import style, timeline


class Raw(str):
    """Markup already escaped: a table cell that is put in as it is."""

    __slots__ = ()


def e(value: Any) -> str:
    if isinstance(value, Raw):
        return value
    return html.escape("" if value is None else str(value), quote=True)


def render(report: Mapping[str, Any]) -> str:
    run = report["run"]
    title = f"nodepatch report: {run['subject']} ({run['run_id']})"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{style.CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="muted">{e(_kind(report))}; generated {e(_generated(report))} UTC</p>',
        _summary(report),
        _audit(report["audit"]),
        _timeline(report),
        _nodes(report["nodes"]),
        _plan(report),
        *(_node(node, report["kind"]) for node in report["nodes"]),
        _cycle_journal(report.get("journal") or []),
        "</body></html>",
    ]
    return "\n".join(parts)


def _generated(report: Mapping[str, Any]) -> str:
    return _when(report["report"]["generated_at"])


def _kind(report: Mapping[str, Any]) -> str:
    if report["kind"] == "cycle":
        return f"patch cycle of {len(report['nodes'])} node(s)"
    return "node patch"


def _when(iso: str | None) -> str:
    if not iso:
        return ""
    return dt.datetime.fromisoformat(iso).astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 120:
        return f"{value:.1f} s"
    minutes = value / 60
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def _table(headers: Sequence[str] | None, rows: Iterable[Sequence[Any]]) -> str:
    """A table; without headers, a key-value table whose first column is the header."""
    body = "".join(
        "<tr>"
        + "".join(
            f"<th>{e(c)}</th>" if not headers and i == 0 else _td(c) for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    if not headers:
        return f'<table class="kv"><tbody>{body}</tbody></table>'
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(cell: Any) -> str:
    numeric = isinstance(cell, int | float) and not isinstance(cell, bool)
    return f'<td class="num">{e(cell)}</td>' if numeric else f"<td>{e(cell)}</td>"


def _summary(report: Mapping[str, Any]) -> str:
    run = report["run"]
    rows = [
        ("run", Raw(f"<code>{e(run['run_id'])}</code>")),
        ("workflow", f"{run['workflow']} v{run['workflow_version']}"),
        ("subject", run["subject"]),
        ("outcome", Raw(_outcome(run["state"], run["outcome"]))),
        ("started by", run["started_by"]),
        ("started at (UTC)", _when(run["started_at"])),
        ("finished at (UTC)", _when(run["finished_at"]) or "not finished"),
        ("duration", _seconds(run["duration_s"])),
        ("actors", ", ".join(run["actors"])),
        ("options", Raw(f"<code>{e(json.dumps(run['params'], sort_keys=True))}</code>")),
    ]
    return "<h2>Run</h2>" + _table(None, rows)


def _outcome(state: str | None, text: str) -> str:
    cls = "ok" if state == "Done" else ("bad" if state in ("Failed", "Refused", None) else "")
    return f'<span class="{cls}">{e(text)}</span>'


def _audit(audit: Mapping[str, Any]) -> str:
    cls = "ok" if audit["intact"] else "bad"
    verdict = "audit trail intact" if audit["intact"] else "AUDIT TRAIL TAMPERED"
    rows = [
        (
            Raw(f"<code>{e(r['run_id'])}</code>"),
            Raw(
                f'<span class="{"ok" if r["intact"] else "bad"}">'
                f"{'intact' if r['intact'] else 'tampered'}</span>"
            ),
            r["events"],
            Raw(f"<code>{e(r['head'])}</code>"),
            "; ".join(f"event {f['event_id']}: {f['problem']}" for f in r["findings"]),
        )
        for r in audit["runs"]
    ]
    return (
        f'<h2>Audit</h2><div class="box {cls}" id="audit"><span class="{cls}">{verdict}</span>: '
        f"{audit['runs_checked']} run(s) checked; head hash of the reported run "
        f'<code id="audit-head">{e(audit["head"])}</code></div>'
        + _table(("run", "chain", "events", "head hash", "findings"), rows)
    )


def _timeline(report: Mapping[str, Any]) -> str:
    rows = timeline.rows(report)
    states = sorted({bar.state for row in rows for bar in row.bars})
    legend = "".join(
        f'<span><i style="background:{style.colour(s)}"></i>{e(s)}</span>' for s in states
    )
    return (
        "<h2>Timeline</h2>"
        + timeline.svg(rows, style.colour, _generated(report))
        + f'<p class="legend">{legend}</p>'
    )


def _nodes(nodes: Sequence[Mapping[str, Any]]) -> str:
    """One line per node: how it ended, after how many runs and attempts, its gate."""
    rows = []
    for node in nodes:
        latest = node["runs"][-1] if node["runs"] else None
        gate = {True: "passed", False: "failed", None: "-"}[node["gate_ok"]]
        rows.append(
            (
                Raw(f'<a href="#node-{e(node["node"])}">{e(node["node"])}</a>'),
                Raw(_outcome(node["state"], node["outcome"])),
                len(node["runs"]),
                node["attempts"],
                gate,
                _when(latest["started_at"]) if latest else "",
                _seconds(latest["duration_s"]) if latest else "",
                len(latest["vms"]) if latest else 0,
            )
        )
    headers = (
        "node",
        "outcome",
        "runs",
        "attempts",
        "health gate",
        "last started (UTC)",
        "took",
        "VMs",
    )
    return "<h2>Nodes</h2>" + _table(headers, rows)


def _plan(report: Mapping[str, Any]) -> str:
    plan = report["plan"]
    parts = ["<h2>Plan</h2>", f"<p>Order: {e(' → '.join(plan['order']) or '(none)')}</p>"]
    waves = [
        (i + 1, ", ".join(w["nodes"]), w.get("reason", "")) for i, w in enumerate(plan["waves"])
    ]
    if waves:
        parts.append(_table(("wave", "nodes", "why this size"), waves))
    if plan["problems"]:
        parts.append(
            "<h4>Problems</h4><ul>"
            + "".join(f"<li>{e(p)}</li>" for p in plan["problems"])
            + "</ul>"
        )
    for node, vms in plan["vms"].items():
        rows = [
            (
                v["name"],
                Raw(f"<code>{e(v['id'])}</code>"),
                "yes" if v.get("ha") else "no",
                v.get("state"),
                v.get("memory_mb"),
                v.get("action"),
                v.get("target") or "",
            )
            for v in vms
        ]
        parts.append(f"<h4>Planned VM actions on {e(node)}</h4>")
        parts.append(_table(("VM", "ID", "HA", "state", "memory MB", "action", "target"), rows))
    return "".join(parts)


def _node(node: Mapping[str, Any], kind: str) -> str:
    name = node["node"]
    parts = [
        f'<section class="node" id="node-{e(name)}"><h2>Node {e(name)}</h2>',
        f"<p>{Raw(_outcome(node['state'], node['outcome']))}; {node['attempts']} attempt(s) "
        f"over {len(node['runs'])} node run(s)</p>",
    ]
    if not node["runs"]:
        parts.append('<p class="muted">not started: left untouched</p>')
    parts += [_node_run(run, kind) for run in node["runs"]]
    parts.append("</section>")
    return "".join(parts)


def _node_run(run: Mapping[str, Any], kind: str) -> str:
    rnd = f", round {run['round']}" if run.get("round") is not None else ""
    parts = [
        f"<h3>Run <code>{e(run['run_id'])}</code>{e(rnd)}: "
        f"{_outcome(run['state'], run['outcome'])}</h3>",
        f"<p>started by {e(run['started_by'])} at {e(_when(run['started_at']))} UTC; "
        f"{run['attempts']} attempt(s); took {e(_seconds(run['duration_s']))}</p>",
        _state_times(run["states"]),
        _retries(run["retries"]),
        _patch(run.get("patch")),
    ]
    if kind == "cycle":
        parts.append(_facts(run))
    parts += [_vms(run["vms"]), _jobs(run["jobs"])]
    return "".join(p for p in parts if p)


def _state_times(states: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        (
            s["state"],
            _when(s["entered"]),
            _when(s["left"]) or "",
            _seconds(s["seconds"]),
            s["trigger"] or "",
            s["actor"],
        )
        for s in states
    ]
    return "<h4>States</h4>" + _table(
        ("state", "entered (UTC)", "left (UTC)", "for", "trigger", "actor"), rows
    )


def _retries(retries: Sequence[Mapping[str, Any]]) -> str:
    if not retries:
        return ""
    rows = [(r["state"], _when(r["at"]), r["actor"]) for r in retries]
    return "<h4>Retries</h4>" + _table(("retried state", "at (UTC)", "by"), rows)


def _patch(patch: Mapping[str, Any] | None) -> str:
    if not patch:
        return '<h4>Patch</h4><p class="muted">not patched</p>'
    rows = [(k, v) for k, v in sorted(patch.items())]
    return "<h4>Patch</h4>" + _table(("detail", "value"), rows)


def _facts(run: Mapping[str, Any]) -> str:
    parts = []
    gate = run.get("gate")
    if gate is None:
        parts.append('<h4>Health gate</h4><p class="muted">no gate recorded</p>')
    else:
        verdict = _outcome(
            "Done" if gate.get("ok") else "Failed", "passed" if gate.get("ok") else "failed"
        )
        checks = [
            (
                c.get("name"),
                Raw(
                    _outcome("Done" if c.get("ok") else "Failed", "ok" if c.get("ok") else "failed")
                ),
                c.get("detail", ""),
            )
            for c in gate.get("checks", [])
        ]
        parts.append(f"<h4>Health gate: {verdict}</h4>")
        parts.append(_table(("check", "result", "detail"), checks))
        if gate.get("output"):
            parts.append(f"<pre>{e(gate['output'])}</pre>")
    for kind, label in (("pre", "Pre-node script"), ("post", "Post-node script")):
        fact = run.get(kind)
        if fact is not None:
            verdict = _outcome(
                "Done" if fact.get("ok") else "Failed", "ok" if fact.get("ok") else "failed"
            )
            parts.append(f"<h4>{label}: {verdict}</h4><pre>{e(fact.get('output', ''))}</pre>")
    return "".join(parts)


def _vms(vms: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        (
            v["vm_name"],
            Raw(f"<code>{e(v['vm_id'])}</code>"),
            v["from"],
            v["to"],
            v["action"],
            v["outcome"],
            Raw(" ".join(f"<code>{e(j)}</code>" for j in v["job_ids"])),
            _seconds(v["downtime_s"]),
            f"{v['state_before']} on {v['from']}",
            f"{v['after_state']} on {v['after_host']}" if v["after_host"] else "",
        )
        for v in vms
    ]
    headers = (
        "VM",
        "ID",
        "from",
        "to",
        "action",
        "outcome",
        "job IDs",
        "downtime",
        "before",
        "after",
    )
    return "<h4>VM actions</h4>" + _table(headers, rows)


def _cycle_journal(jobs: Sequence[Mapping[str, Any]]) -> str:
    """What the cycle itself journaled: node runs started, timers, gates, scripts."""
    if not jobs:
        return ""
    rows = [
        (
            j["key"],
            j["status"],
            Raw(f"<code>{e(j['job_id'])}</code>") if j["job_id"] else "",
            _when(j["started_at"]),
            _when(j["ended_at"]),
        )
        for j in jobs
    ]
    table = _table(("key", "status", "reference", "started (UTC)", "ended (UTC)"), rows)
    return '<section class="node"><h2>Cycle journal</h2>' + table + "</section>"


def _jobs(jobs: Sequence[Mapping[str, Any]]) -> str:
    if not jobs:
        return ""
    rows = [
        (
            j["state"],
            j["job"],
            j["attempt"],
            j["status"],
            Raw(f"<code>{e(j['job_id'])}</code>") if j["job_id"] else "",
            _when(j["started_at"]),
            _when(j["ended_at"]),
            j["message"],
        )
        for j in jobs
    ]
    headers = ("state", "job", "try", "status", "job ID", "started (UTC)", "ended (UTC)", "message")
    return "<h4>Cluster / VMM jobs</h4>" + _table(headers, rows)
