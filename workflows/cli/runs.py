"""Planning and running: plan, start, resume, signal, abort."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from engine import errors
from engine.runner import Stop
from workflows import plan as planning
from workflows import render
from workflows.app import App
from workflows.cli.common import (
    EXIT_DONE,
    EXIT_FAILED,
    EXIT_STOPPED,
    emit,
    inventory,
    json_option,
    pass_app,
    until_option,
)
from workflows.node_patch import ABORTED, DONE, EXTERNAL, NodePatch, Params, subject

# ---- planning and running ----------------------------------------------------------------

policy_options = [
    click.option(
        "--non-ha",
        type=click.Choice([str(p) for p in planning.NonHaPolicy]),
        help="Policy for running non-HA VMs (overrides the config).",
    ),
    click.option(
        "--stopped-ha",
        type=click.Choice([str(p) for p in planning.StoppedHaPolicy]),
        help="Policy for HA VMs that are not running (overrides the config).",
    ),
]


def with_policies(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(policy_options):
        f = option(f)
    return f


def _params(
    app: App, cluster: str, node: str, non_ha: str | None, stopped_ha: str | None
) -> Params:
    base = app.settings.policies
    return Params(
        cluster=cluster,
        node=node,
        policies=planning.Policies(
            planning.NonHaPolicy(non_ha) if non_ha else base.non_ha,
            planning.StoppedHaPolicy(stopped_ha) if stopped_ha else base.stopped_ha,
        ),
        patcher=app.settings.patcher_for_runs(),
        concurrency=app.settings.concurrency,
    )


def _plan(app: App, params: Params) -> planning.Plan:
    found = inventory(app, params.cluster)
    holder = app.store.lock_holder(f"cluster:{params.cluster.lower()}")
    return planning.make_plan(found, params.node, params.policies, lock_holder=holder)


@click.command("plan")
@click.option("--cluster", required=True)
@click.option("--node", required=True)
@with_policies
@json_option
@pass_app
def plan_cmd(
    app: App, cluster: str, node: str, non_ha: str | None, stopped_ha: str | None, as_json: bool
) -> None:
    """Show the per-VM plan for patching NODE. Touches nothing. Exit 1 if it would be refused."""
    result = _plan(app, _params(app, cluster, node, non_ha, stopped_ha))
    if as_json:
        emit(result.to_json())
    else:
        click.echo(f"plan for {result.node} in {result.cluster}")
        click.echo(render.plan_table(result.to_json()))
        for problem in result.problems:
            click.echo(f"refused: {problem}")
        if result.ok:
            click.echo("preflight would pass")
    sys.exit(EXIT_DONE if result.ok else EXIT_FAILED)


@click.command("start")
@click.option("--cluster", required=True)
@click.option("--node", required=True)
@with_policies
@until_option
@json_option
@pass_app
def start_cmd(
    app: App,
    cluster: str,
    node: str,
    non_ha: str | None,
    stopped_ha: str | None,
    until: str | None,
    as_json: bool,
) -> None:
    """Start patching NODE of CLUSTER and drive the run as far as it goes."""
    params = _params(app, cluster, node, non_ha, stopped_ha)
    found = inventory(app, cluster)
    host = found.host(node)
    if host is None:
        known = ", ".join(h.name for h in found.hosts)
        raise errors.UsageError(f"node {node!r} is not in cluster {cluster!r} (nodes: {known})")
    params = Params(found.cluster, host.name, params.policies, params.patcher, params.concurrency)
    active = [
        r
        for r in app.store.runs(
            subject_prefix=subject(params.cluster, params.node), active_only=True
        )
        if r.params.get("node") == params.node
    ]
    if active:
        raise errors.UsageError(
            f"node {params.node} already has run {active[0].id} ({active[0].state}); "
            f"use `nodepatch resume {active[0].id}` or `nodepatch abort {active[0].id}`"
        )
    if params.patcher != EXTERNAL:
        app.patcher(params.patcher, params.cluster)  # invalid patcher settings: refuse now
    runner = app.runner()
    run = runner.create(subject(params.cluster, params.node), params.to_json())
    if not as_json:
        click.echo(f"run {run.id} started for {run.subject}")
    _finish(app, runner.drive(run.id, until=until), as_json)


@click.command("resume")
@click.argument("run_ref", metavar="RUN")
@until_option
@json_option
@pass_app
def resume_cmd(app: App, run_ref: str, until: str | None, as_json: bool) -> None:
    """Continue RUN where it stopped; a Failed run retries its failed step."""
    run = app.store.resolve(run_ref)
    _finish(app, app.runner().drive(run.id, until=until, retry=True), as_json)


@click.command("signal")
@click.argument("run_ref", metavar="RUN")
@click.argument("name")
@pass_app
def signal_cmd(app: App, run_ref: str, name: str) -> None:
    """Send signal NAME (patched, abort) to RUN. It is consumed exactly once."""
    run = app.store.resolve(run_ref)
    signals = NodePatch(app.backend, app.patcher).workflow().signals | {"abort"}
    if name not in signals:
        raise errors.UsageError(
            f"unknown signal {name!r}; expected one of {', '.join(sorted(signals))}"
        )
    app.runner().signal(run.id, name)
    click.echo(f"signal {name!r} recorded for run {run.id}")


@click.command("abort")
@click.argument("run_ref", metavar="RUN")
@json_option
@pass_app
def abort_cmd(app: App, run_ref: str, as_json: bool) -> None:
    """Abort RUN with a durable compensation: node out of maintenance, VMs back, power
    states restored. Exit 0 when the run ends Aborted."""
    run = app.store.resolve(run_ref)
    runner = app.runner()
    runner.signal(run.id, "abort")
    try:
        stop = runner.drive(run.id)
    except errors.Busy as exc:
        raise errors.Busy(f"abort recorded, but {exc}; it aborts at its next step") from exc
    _finish(app, stop, as_json, ok_states=(DONE, ABORTED))


def _finish(app: App, stop: Stop, as_json: bool, ok_states: tuple[str, ...] = (DONE,)) -> None:
    published = app.store.published(stop.run.id)
    if as_json:
        emit(render.run_json(stop.run, published, stop.reason))
    else:
        click.echo(render.run_summary(stop.run))
        table = render.vm_report(published)
        if table and stop.reason in ("final", "failed"):
            click.echo(table)
        if stop.reason == "until":
            click.echo(
                f"stopped before {stop.run.state}; continue with `nodepatch resume {stop.run.id}`"
            )
    if stop.reason in ("until", "waiting"):
        sys.exit(EXIT_STOPPED)
    sys.exit(EXIT_DONE if stop.run.state in ok_states else EXIT_FAILED)
