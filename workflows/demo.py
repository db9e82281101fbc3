"""`nodepatch demo`: a full patch cycle of one node on a fresh simulated cluster."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import click

from engine.runner import RunnerSettings
from workflows import plan as planning
from workflows import render
from workflows.app import App
from workflows.node_patch import DONE, Params, subject


@click.command("demo")
@click.option(
    "--speed",
    default=300.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Simulated seconds per real second.",
)
@click.option("--keep", type=click.Path(), help="Write the simulated cluster to this file.")
@click.pass_obj
def demo_cmd(app: App, speed: float, keep: str | None) -> None:
    """Patch one node of a fresh simulated cluster, end to end, on the configured database."""
    from workflows.backends.simulated import SimulatedCluster

    path = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="nodepatch-demo-")) / "c.json"
    cluster = SimulatedCluster.generate(
        path, hosts=3, vms=9, non_ha=1, stopped_ha=1, seed=7, speed=speed
    )
    before = {vm["id"]: vm for vm in cluster.snapshot()["vms"]}
    non_ha = [vm for vm in before.values() if not vm["ha"] and vm["state"] == "Running"]
    node = non_ha[0]["host"] if non_ha else "hv01"
    click.echo(f"simulated cluster {path}: 3 nodes, 9 VMs (one non-HA running, one HA off)")
    app.sim_file = str(path)
    app.settings = replace(
        app.settings,
        patcher="simulated",
        runner=replace(app.settings.runner, poll_interval_s=0.05)
        if isinstance(app.settings.runner, RunnerSettings)
        else app.settings.runner,
    )
    app.progress = lambda message: click.echo(f"  {message}")
    params = Params(
        "cluster1",
        node,
        planning.Policies(planning.NonHaPolicy.MIGRATE, planning.StoppedHaPolicy.EVACUATE),
        "simulated",
        app.settings.concurrency,
    )
    click.echo(f"policies: non_ha=migrate, stopped_ha=evacuate; database {app.database_url}")
    runner = app.runner()
    run = runner.create(subject("cluster1", node), params.to_json())
    click.echo(f"run {run.id}: patching {node}")
    stop = runner.drive(run.id)
    click.echo()
    click.echo(render.run_summary(stop.run))
    table = render.vm_report(app.store.published(run.id))
    if table:
        click.echo(table)
    after = {vm["id"]: vm for vm in cluster.snapshot()["vms"]}
    same = all(
        after[i]["host"] == v["host"] and after[i]["state"] == v["state"] for i, v in before.items()
    )
    click.echo()
    click.echo(
        "every VM is back on its host in its power state"
        if same
        else "some VMs are not where they started (see the table)"
    )
    click.echo(f"audit trail: nodepatch history {run.id}")
    sys.exit(0 if stop.run.state == DONE and same else 1)
