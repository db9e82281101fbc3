"""Planning and running: plan, start, resume, signal, abort."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NoReturn

import click

from engine import errors
from engine.model import Run, utcnow
from engine.runner import Runner, Stop
from workflows import plan as planning
from workflows import render, terminal
from workflows.app import App
from workflows.cli.common import (
    EXIT_DONE,
    EXIT_FAILED,
    EXIT_STOPPED,
    EXIT_WARNINGS,
    emit,
    finished_by,
    handed_over,
    inventory,
    json_option,
    pass_app,
    sleeps_until,
    until_option,
)
from workflows.cli.interrupts import graceful
from workflows.cli.webhooks import deliver_after
from workflows.cycle.params import CLUSTER_CYCLE
from workflows.node_patch import ABORTED, DONE, EXTERNAL, Params, subject

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
        terminal.echo(render.plan_table(result.to_json()))
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
@click.option("--detach", is_flag=True, help="Leave the run to `nodepatch worker` (exit 3).")
@json_option
@pass_app
def start_cmd(
    app: App,
    cluster: str,
    node: str,
    non_ha: str | None,
    stopped_ha: str | None,
    until: str | None,
    detach: bool,
    as_json: bool,
) -> None:
    """Start patching NODE of CLUSTER and drive the run as far as it goes (or, with --detach,
    leave it to the workers)."""
    if detach and until:
        raise errors.UsageError("--detach and --until do not go together: workers drive to the end")
    params = _params(app, cluster, node, non_ha, stopped_ha)
    found = inventory(app, cluster)
    host = found.host(node)
    if host is None:
        known = ", ".join(h.name for h in found.hosts)
        raise errors.UsageError(f"node {node!r} is not in cluster {cluster!r} (nodes: {known})")
    params = Params(found.cluster, host.name, params.policies, params.patcher, params.concurrency)
    _refuse_if_active(app, params)
    if params.patcher != EXTERNAL:
        app.patcher(params.patcher, params.cluster)  # invalid patcher settings: refuse now
    runner = app.runner()
    run = runner.create(subject(params.cluster, params.node), params.to_json(), detached=detach)
    if detach:
        _detached(app, run, as_json)
    if not as_json:
        click.echo(f"run {run.id} started for {run.subject}")
    _drive(app, runner, run.id, as_json, until=until)


def _detached(app: App, run: Run, as_json: bool) -> NoReturn:
    deliver_after(app)
    if as_json:
        emit(render.run_json(run, app.store.published(run.id), "detached"))
    else:
        click.echo(f"run {run.id} for {run.subject} is left to the workers (`nodepatch worker`)")
    sys.exit(EXIT_STOPPED)


def _refuse_if_active(app: App, params: Params) -> None:
    active = [
        r
        for r in app.store.runs(
            subject_prefix=subject(params.cluster, params.node), active_only=True
        )
        if r.params.get("node") == params.node
    ]
    if not active:
        return
    run = active[0]
    if run.lease_live(utcnow()):
        raise errors.Busy(
            f"node {params.node} is being patched by run {run.id} ({run.state}), held by "
            f"{run.lease_owner}"
        )
    raise errors.Busy(
        f"node {params.node} already has run {run.id} ({run.state}); "
        f"use `nodepatch resume {run.id}`, `nodepatch abort {run.id}` or "
        f"`nodepatch release {run.id} --reason TEXT`"
    )


@click.command("resume")
@click.argument("run_ref", metavar="RUN")
@until_option
@click.option("--now", "early", is_flag=True, help="Wake a run sleeping on a timer now.")
@click.option("--detach", is_flag=True, help="Hand the run over to `nodepatch worker` (exit 3).")
@json_option
@pass_app
def resume_cmd(
    app: App, run_ref: str, until: str | None, early: bool, detach: bool, as_json: bool
) -> None:
    """Continue RUN where it stopped; a Failed run retries its failed step."""
    run = app.store.resolve(run_ref)
    runner = app.runner_for(run)
    if detach:
        app.store.set_detached(run.id, True)
        _detached(app, app.store.get(run.id), as_json)
    if early:
        app.store.wake(run.id, utcnow())
    if run.workflow == CLUSTER_CYCLE:  # a cycle drives its node runs too
        from workflows.cli.cycle import drive

        if early and run.wake_at is not None and not run.finished_at:
            runner.signal(run.id, "continue")  # skip the soak or window it sleeps for
        drive(app, run.id, as_json, retry=True)
    _drive(app, runner, run.id, as_json, until=until, retry=True)


@click.command("signal")
@click.argument("run_ref", metavar="RUN")
@click.argument("name")
@pass_app
def signal_cmd(app: App, run_ref: str, name: str) -> None:
    """Send signal NAME (patched, abort) to RUN. It is consumed exactly once."""
    run = app.store.resolve(run_ref)
    if app.runner_for(run).signal(run.id, name):
        click.echo(f"signal {name!r} recorded for run {run.id}")
    else:
        click.echo(f"signal {name!r} is already pending for run {run.id}; nothing recorded")


@click.command("abort")
@click.argument("run_ref", metavar="RUN")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0, min_open=True),
    default=900.0,
    show_default=True,
    help="Seconds to drive the compensation before leaving it to `resume`.",
)
@json_option
@pass_app
def abort_cmd(app: App, run_ref: str, wait_s: float, as_json: bool) -> None:
    """Abort RUN with a durable compensation: node out of maintenance, VMs back, power
    states restored. Exit 0 when the run ends Aborted; 3 if the compensation is still going
    after --wait seconds (it goes on with `resume`)."""
    run = app.store.resolve(run_ref)
    runner = app.runner_for(run)
    if run.workflow == CLUSTER_CYCLE:
        from workflows.cli.cycle import abort_cmd as cycle_abort

        click.get_current_context().invoke(cycle_abort, run_ref=run.id, as_json=as_json)
    if not runner.signal(run.id, "abort"):
        click.echo(f"abort was already recorded for run {run.id}", err=True)
    app.progress = _always(app.progress)  # an abort reports what it does, terminal or not
    runner.progress = app.progress
    timer = threading.Timer(wait_s, runner.stop_requested.set)
    timer.daemon = True
    timer.start()
    try:
        _drive(app, runner, run.id, as_json, bound=(timer, wait_s))
    except errors.Busy as exc:
        raise errors.Busy(f"abort recorded, but {exc}; it aborts at its next step") from exc
    finally:
        timer.cancel()


@click.command("release")
@click.argument("run_ref", metavar="RUN")
@click.option("--reason", required=True, help="Why the run is given up (kept in the audit trail).")
@json_option
@pass_app
def release_cmd(app: App, run_ref: str, reason: str, as_json: bool) -> None:
    """Give up on RUN when it cannot finish (a node that never comes back): it ends Abandoned,
    its cluster lock is released, and the node and VMs are left as they are, listed."""
    run = app.store.resolve(run_ref)
    app.registry.check(run.workflow, run.workflow_version)
    left = _left_as_is(app, run)
    released = app.runner_for(run).release(run.id, reason, {"released": left})
    deliver_after(app)
    published = app.store.published(run.id)
    if as_json:
        emit(render.run_json(released, published, "final"))
        return
    click.echo(render.run_summary(released))
    click.echo(render.left_as_is(left))


def _left_as_is(app: App, run: Run) -> dict[str, Any]:
    """Where the run's node and VMs are now, as far as the cluster can tell."""
    snapshot = app.store.published(run.id).get("snapshot", {"vms": []})
    node = run.params.get("node")
    try:
        found = app.backend.inventory(str(run.params.get("cluster")))
    except errors.EngineError as exc:
        return {"node": node, "cluster_read": f"failed: {exc}", "vms": []}
    host = found.host(str(node))
    vms = []
    for planned in snapshot["vms"]:
        vm = found.vm(planned["id"])
        vms.append(
            {
                "id": planned["id"],
                "name": planned["name"],
                "from": planned["host"],
                "host": vm.host if vm else None,
                "state": str(vm.state) if vm else "deleted",
            }
        )
    return {
        "node": node,
        "node_state": str(host.state) if host else "not in the cluster",
        "maintenance": host.maintenance if host else None,
        "vms": vms,
    }


def _always(sink: Callable[[str], None]) -> Callable[[str], None]:
    def echo(message: str) -> None:
        sink(message)
        if not terminal.interactive(sys.stderr):  # the sink itself shows it on a terminal
            click.echo(f"  {message}", err=True)

    return echo


def _drive(
    app: App,
    runner: Runner,
    run_id: str,
    as_json: bool,
    *,
    until: str | None = None,
    retry: bool = False,
    bound: tuple[threading.Timer, float] | None = None,
) -> None:
    """Drive the run here until it stops; a step that waits long (a reboot) gives its lease
    back every `engine.yield_after_s` and is driven again after its short sleep, outside the
    lease (see `engine.family`)."""
    from engine.family import drive_family

    runner.settings = replace(runner.settings, yield_after_s=app.settings.yield_after_s)
    with graceful(runner.stop_requested, run_id):
        try:
            stopped = drive_family(
                app.store,
                lambda _run: runner,
                run_id,
                until=until,
                retry=retry,
                sleep=time.sleep,
                stopping=runner.stop_requested.is_set,
            )
        finally:
            terminal.settle()  # the live progress panel goes before the result is printed
    stop = stopped.stop
    deliver_after(app)
    if stopped.handed_to is not None:
        if stop.run.finished_at is None:
            _handed_over(app, stop.run, stopped.handed_to, as_json)
        click.echo(finished_by(stop.run, stopped.handed_to), err=True)
        stop = Stop(stop.run, "final")
    timed_out = bound is not None and not bound[0].is_alive() and stop.reason == "interrupted"
    _finish(app, stop, as_json, bound=bound[1] if timed_out and bound else None)


def _handed_over(app: App, run: Run, holder: str, as_json: bool) -> NoReturn:
    """Another process (a worker) claimed the run while this one slept between two checks:
    it drives the run now, and this command leaves it alone (exit 3)."""
    if as_json:
        emit({**render.run_json(run, app.store.published(run.id), "handed_over"), "by": holder})
    click.echo(handed_over(run.id, holder), err=True)
    sys.exit(EXIT_STOPPED)


def _finish(app: App, stop: Stop, as_json: bool, *, bound: float | None = None) -> None:
    published = app.store.published(stop.run.id)
    warnings = render.warnings(published) if stop.run.state in (DONE, ABORTED) else []
    if as_json:
        emit(render.run_json(stop.run, published, stop.reason))
    else:
        click.echo(render.run_summary(stop.run))
        if stop.reason in ("final", "failed"):
            terminal.echo(render.vm_report(published))
        if warnings:
            click.echo(f"{stop.run.state}, but {len(warnings)} VM(s) were not put back:")
            for line in warnings:
                click.echo(f"  {line}")
        if stop.reason == "until":
            click.echo(
                f"stopped before {stop.run.state}; continue with `nodepatch resume {stop.run.id}`"
            )
    if stop.reason == "sleeping" and stop.run.wake_at:
        click.echo(sleeps_until("run", stop.run), err=True)
    if stop.reason == "interrupted":
        what = (
            f"the compensation did not finish within {bound:g} s"
            if bound is not None
            else "stopped as asked"
        )
        click.echo(
            f"{what}; run {stop.run.id} is in {stop.run.state}: continue with "
            f"`nodepatch resume {stop.run.id}`"
            + (
                f", or if it cannot finish: `nodepatch release {stop.run.id} --reason TEXT`"
                if bound is not None
                else ""
            ),
            err=True,
        )
    if stop.reason in ("until", "waiting", "interrupted", "sleeping"):
        sys.exit(EXIT_STOPPED)
    if stop.run.state in (DONE, ABORTED):
        sys.exit(EXIT_WARNINGS if warnings else EXIT_DONE)
    sys.exit(EXIT_FAILED)
