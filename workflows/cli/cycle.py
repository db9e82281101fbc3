"""`nodepatch cycle plan|start|status|abort`: patch a whole cluster, node by node or in waves.

A cycle is a run of workflow `cluster_cycle` whose node patches are child runs; `resume`,
`signal`, `history`, `runs` and `audit verify` work on it as on any run."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NoReturn

import click

from engine import errors
from engine.model import Run
from workflows import plan as planning
from workflows import render
from workflows.app import App
from workflows.cli.common import (
    EXIT_DONE,
    EXIT_FAILED,
    EXIT_STOPPED,
    emit,
    finished_by,
    handed_over,
    inventory,
    pass_app,
    sleeps_until,
)
from workflows.cli.interrupts import graceful
from workflows.cli.webhooks import deliver_after
from workflows.cycle import view, waves
from workflows.cycle import workflow as cyc
from workflows.cycle.params import CLUSTER_CYCLE, CycleParams, OnNodeFailure, check
from workflows.cycle.windows import parse_duration, show_duration


@click.group("cycle")
def cycle_group() -> None:
    """Patch a whole cluster: a durable rolling cycle of node runs, with health gates,
    maintenance windows, capacity-aware waves and a failure budget."""


def _options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--cluster", required=True, help="The cluster to patch."),
        click.option("--nodes", help="Only these nodes, comma-separated (default: all)."),
        click.option(
            "--order",
            type=click.Choice([o.value for o in waves.Order]),
            help="Node order [default: fewest-vms, ties by name].",
        ),
        click.option("--max-parallel", help="Nodes out at once: a number or auto [default: 1]."),
        click.option("--max-failed-nodes", type=int, help="Halt when more fail [default: 0]."),
        click.option("--retries-per-node", type=int, help="Retries of a failed node [default: 1]."),
        click.option("--soak", help="Wait after each wave, e.g. 15m [default: 0]."),
        click.option(
            "--window",
            "windows",
            multiple=True,
            help='Maintenance window, e.g. "Sat 22:00/8h Europe/Berlin" (repeatable; '
            "overrides cycle.windows).",
        ),
        click.option("--stop-after", help="Start no node after this long, e.g. 6h."),
        click.option("--health-check", help="Command run after each node; exit 0 passes."),
        click.option(
            "--pre-node-script", type=click.Path(), help="Run on the node before its drain."
        ),
        click.option(
            "--post-node-script", type=click.Path(), help="Run on the node once it is back."
        ),
        click.option(
            "--on-node-failure",
            type=click.Choice([o.value for o in OnNodeFailure]),
            help="A failed node: abort its run (compensate) or leave it [default: compensate].",
        ),
        click.option("--non-ha", type=click.Choice([str(p) for p in planning.NonHaPolicy])),
        click.option("--stopped-ha", type=click.Choice([str(p) for p in planning.StoppedHaPolicy])),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _params(app: App, options: dict[str, Any]) -> CycleParams:
    """CycleParams from the options over the config's `cycle:` defaults over the built-ins."""
    values: dict[str, Any] = dict(app.settings.cycle)
    values["non_ha"] = str(app.settings.policies.non_ha)
    values["stopped_ha"] = str(app.settings.policies.stopped_ha)
    values["patcher"] = app.settings.patcher_for_runs()
    values["concurrency"] = app.settings.concurrency
    given = {k: v for k, v in options.items() if v not in (None, ())}
    for key in (
        "max_failed_nodes",
        "retries_per_node",
        "health_check",
        "pre_node_script",
        "post_node_script",
        "on_node_failure",
        "non_ha",
        "stopped_ha",
    ):
        if key in given:
            values[key] = given[key]
    if "order" in given:
        values["order_by"] = given["order"]
    if "max_parallel" in given:
        raw = str(given["max_parallel"])
        if raw != "auto" and not raw.isdigit():
            raise errors.UsageError("--max-parallel: must be a positive number or auto")
        values["max_parallel"] = None if raw == "auto" else int(raw)
    for key in ("soak", "stop_after"):
        if key in given:
            values[f"{key}_s"] = parse_duration(
                given[key], f"--{key.replace('_', '-')}"
            ).total_seconds()
    if "windows" in given:
        values["windows"] = list(given["windows"])
    found = inventory(app, options["cluster"])
    nodes = (
        [n.strip() for n in options["nodes"].split(",") if n.strip()]
        if options.get("nodes")
        else None
    )
    order = waves.order_nodes(found, nodes, waves.Order(values.get("order_by", "fewest-vms")))
    params = CycleParams(
        cluster=found.cluster,
        order=order,
        **{k: v for k, v in values.items() if k in CycleParams.__dataclass_fields__},
    )
    check(params)
    return params


@cycle_group.command("plan")
@_options
@pass_app
def plan_cmd(app: App, /, as_json: bool, **options: Any) -> None:
    """Show the cycle's plan without touching anything: the node order, the waves and why each
    has its size, every node's per-VM plan, and what would refuse the cycle (exit 1)."""
    params = _params(app, options)
    cycle = cyc.ClusterCycle(app.backend, app.node_scripts(), app.node_durations)
    plan = cyc.make_plan(
        app.backend.inventory(params.cluster),
        params,
        lock_holder=app.store.lock_holder(f"cluster:{params.cluster.lower()}"),
        interference=app.backend.interference(params.cluster),
        estimate=lambda node: cycle.estimate(params, node),
    )
    if as_json:
        emit(plan)
    else:
        click.echo(_plan_text(plan, params))
    sys.exit(EXIT_FAILED if plan["problems"] else EXIT_DONE)


def _plan_text(plan: dict[str, Any], params: CycleParams) -> str:
    lines = [f"cycle plan for cluster {plan['cluster']}: {len(plan['order'])} node(s)"]
    lines.append("order: " + ", ".join(plan["order"]))
    for i, wave in enumerate(plan["waves"], 1):
        lines.append(f"wave {i}: {', '.join(wave['nodes'])}  ({wave['reason']})")
    for node in plan["order"]:
        rows = [
            (
                vm["name"],
                vm["id"],
                "HA" if vm["ha"] else "non-HA",
                vm["state"],
                vm["action"],
                vm.get("target") or "",
            )
            for vm in plan["vms"][node]
        ]
        lines.append(f"\n{node}: {len(rows)} VM(s)")
        if rows:
            lines.append(render.table(("VM", "ID", "HA", "STATE", "ACTION", "TARGET"), rows))
    if params.windows:
        lines.append("\nwindows: " + "; ".join(params.windows))
    if plan["problems"]:
        lines.append("\nthe cycle cannot start:")
        lines += [f"  - {p}" for p in plan["problems"]]
    else:
        lines.append("\nready: nothing refuses the cycle")
    return "\n".join(lines)


@cycle_group.command("start")
@_options
@click.option("--until-node", help="Stop the cycle after this node is done (exit 3).")
@click.option("--detach", is_flag=True, help="Leave the cycle to `nodepatch worker` (exit 3).")
@pass_app
def start_cmd(
    app: App, /, as_json: bool, until_node: str | None, detach: bool, **options: Any
) -> None:
    """Start patching the whole cluster and drive the cycle (and its node runs) as far as it
    goes here; exit 0 when every node succeeded, 1 when a node failed (resume retries), 3 when
    it stopped before the end (a window, a soak, --until-node, a node waiting for a signal)."""
    params = _params(app, options)
    if until_node:
        params = CycleParams.from_json({**params.to_json(), "until_node": until_node})
        check(params)
    runner = app.runner(CLUSTER_CYCLE, 1)
    _refuse_if_active(app, params.cluster)
    run = runner.create(cyc.cycle_subject(params.cluster), params.to_json(), detached=detach)
    if detach:
        _finish(app, app.store.get(run.id), "detached", as_json)
    drive(app, run.id, as_json)


def _refuse_if_active(app: App, cluster: str) -> None:
    active = app.store.runs(subject_prefix=cyc.cycle_subject(cluster), active_only=True, limit=5)
    for run in active:
        if run.subject == cyc.cycle_subject(cluster):
            raise errors.Busy(
                f"cluster {cluster} already has cycle {run.id} ({run.state}); use "
                f"`nodepatch resume {run.id}`, `nodepatch cycle abort {run.id}` or "
                f"`nodepatch release {run.id} --reason TEXT`"
            )


def drive(
    app: App, run_id: str, as_json: bool, *, retry: bool = False, early: bool = False
) -> NoReturn:
    """Drive the cycle and its node runs here, then report and exit."""
    from engine.family import drive_family

    stop_flag = app.runner(CLUSTER_CYCLE, 1).stop_requested
    with graceful(stop_flag, run_id):
        stopped = drive_family(
            app.store,
            lambda run: _runner(app, run, stop_flag),
            run_id,
            retry=retry,
            early=early,
            sleep=time.sleep,
            stopping=stop_flag.is_set,
        )
    run, reason = stopped.stop.run, stopped.stop.reason
    if stopped.handed_to is not None and run.finished_at is not None:  # a worker ended it
        click.echo(finished_by(run, stopped.handed_to), err=True)
        reason = "final"
    elif stopped.handed_to is not None:  # a worker claimed the cycle while this process slept
        deliver_after(app)
        if as_json:
            doc = status_doc(app, run)
            emit({**doc, "stopped": "handed_over", "by": stopped.handed_to})
        click.echo(handed_over(run_id, stopped.handed_to), err=True)
        sys.exit(EXIT_STOPPED)
    _finish(app, run, reason, as_json, stopped.waiting_children)


def _runner(app: App, run: Run, stop_flag: Any) -> Any:
    """The runner of the cycle or of one of its node runs, driven here: a step that waits long
    (a node's reboot, storage healing) gives its lease back every `engine.yield_after_s`, and
    the family loop drives it again (see `engine.family`)."""
    runner = app.runner_for(run)
    runner.stop_requested = stop_flag
    runner.settings = replace(runner.settings, yield_after_s=app.settings.yield_after_s)
    return runner


def _finish(
    app: App, run: Run, reason: str, as_json: bool, waiting: tuple[Run, ...] = ()
) -> NoReturn:
    deliver_after(app)
    doc = status_doc(app, run)
    if as_json:
        emit({**doc, "stopped": reason})
    else:
        click.echo(status_text(doc))
    for child in waiting:
        click.echo(
            f"node run {child.id} ({child.params.get('node')}) waits for signal "
            f"{child.waiting_for!r}: `nodepatch signal {child.id} {child.waiting_for}`, "
            f"then `nodepatch resume {run.id}`",
            err=True,
        )
    if not as_json:
        if reason == "sleeping" and run.wake_at and not waiting:
            why = doc.get("sleeping_because")
            click.echo(sleeps_until("cycle", run, why), err=True)
        if reason == "detached":
            click.echo(f"cycle {run.id} is left to `nodepatch worker`", err=True)
    if reason in ("until", "waiting", "interrupted", "sleeping", "detached"):
        sys.exit(EXIT_STOPPED)
    sys.exit(EXIT_DONE if run.state in (cyc.DONE, cyc.ABORTED) else EXIT_FAILED)


def status_doc(app: App, run: Run) -> dict[str, Any]:
    entries = app.store.journal_entries(run.id)
    doc = view.status(run, app.store.published(run.id), app.store.children(run.id), entries)
    sleeping = [e for e in app.store.events(run.id) if e.kind == "sleeping"]
    asleep = sleeping and run.wake_at and run.finished_at is None and not run.waiting_for
    doc["sleeping_because"] = sleeping[-1].details.get("reason") if asleep else None
    if not asleep:
        doc["wake_at"] = None
    return doc


def status_text(doc: dict[str, Any]) -> str:
    lines = [f"cycle {doc['run_id']}  cluster {doc['cluster']}  state {doc['state']}"]
    if doc.get("sleeping_because") and doc.get("wake_at"):
        lines.append(f"asleep until {doc['wake_at']}: {doc['sleeping_because']}")
    if doc.get("waiting_for"):
        lines.append(f"waiting for signal {doc['waiting_for']!r}")
    rows = [
        (
            n["node"],
            n["status"],
            n["run_id"] or "",
            n["state"] or "",
            str(n["attempts"]),
            _took(n),
            n["outcome"],
        )
        for n in doc["nodes"]
    ]
    lines.append(render.table(("NODE", "STATUS", "RUN", "STATE", "TRIES", "TOOK", "OUTCOME"), rows))
    if doc.get("error"):
        lines.append(f"error: {doc['error'].get('reason')}")
    return "\n".join(lines)


def _took(node: dict[str, Any]) -> str:
    import datetime as dt

    if not node["started_at"] or not node["finished_at"]:
        return ""
    took = dt.datetime.fromisoformat(node["finished_at"]) - dt.datetime.fromisoformat(
        node["started_at"]
    )
    return show_duration(took)


@cycle_group.command("status")
@click.argument("run_ref", metavar="CYCLE")
@click.option("--watch", is_flag=True, help="Redraw every 2 s until the cycle stops moving.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_app
def status_cmd(app: App, run_ref: str, watch: bool, as_json: bool) -> None:
    """Where the cycle and each of its nodes stand: node run, state, attempts, outcome."""
    run = _cycle(app, run_ref)
    while True:
        doc = status_doc(app, run)
        if as_json:
            emit(doc)
        else:
            click.echo(status_text(doc))
        if not watch or run.finished_at is not None:
            return
        time.sleep(2)
        click.echo("")
        run = app.store.get(run.id)


@cycle_group.command("abort")
@click.argument("run_ref", metavar="CYCLE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_app
def abort_cmd(app: App, run_ref: str, as_json: bool) -> None:
    """Abort the cycle: nodes not started stay untouched; every node run in flight is aborted
    (out of maintenance, VMs home), durably. Exit 0 when it ends Aborted."""
    run = _cycle(app, run_ref)
    if not app.runner_for(run).signal(run.id, "abort"):
        click.echo(f"abort was already recorded for cycle {run.id}", err=True)
    drive(app, run.id, as_json, early=True)


def _cycle(app: App, run_ref: str) -> Run:
    run = app.store.resolve(run_ref)
    if run.workflow != CLUSTER_CYCLE:
        raise errors.UsageError(
            f"run {run.id} is a {run.workflow} run, not a cycle: use `nodepatch status {run.id}`"
        )
    return run
