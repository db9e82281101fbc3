"""`nodepatch demo`: a full patch cycle of one node on a fresh simulated cluster."""

from __future__ import annotations

import shlex
import sys
from dataclasses import replace
from pathlib import Path

import click
from click.core import ParameterSource

from workflows import plan as planning
from workflows import render, terminal
from workflows.app import App, shown_url
from workflows.node_patch import DONE, Params, subject


def _vm(
    n: int, host: str, *, ha: bool = True, state: str = "Running", mb: int = 4096
) -> dict[str, object]:
    return {
        "id": f"00000000-0000-4000-8000-{n:012d}",
        "name": f"vm{n:02d}",
        "host": host,
        "ha": ha,
        "state": state,
        "memory_mb": mb,
    }


DEMO_FOLDER = Path(".nodepatch-demo")
SCENARIO = {
    "clusters": [
        {"name": "cluster1", "hosts": [{"name": f"hv0{i}", "memory_mb": 32768} for i in (1, 2, 3)]}
    ],
    "vms": [
        _vm(1, "hv01", mb=8192),
        _vm(2, "hv01"),
        _vm(3, "hv01", ha=False),
        _vm(4, "hv01", state="PowerOff"),
        _vm(5, "hv02", mb=8192),
        _vm(6, "hv02"),
        _vm(7, "hv03"),
        _vm(8, "hv03", ha=False),
    ],
}


@click.command("demo")
@click.option(
    "--speed",
    default=300.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Simulated seconds per real second.",
)
@click.option("--keep", type=click.Path(), help="Write the simulated cluster to this file.")
@click.pass_context
def demo_cmd(ctx: click.Context, speed: float, keep: str | None) -> None:
    """Patch one node of a fresh simulated cluster, end to end, in ./.nodepatch-demo/ (a fresh
    SQLite database of its own, never the configured one, unless --database is given)."""
    from workflows.backends.simulated import SimulatedCluster

    app: App = ctx.obj
    if ctx.find_root().get_parameter_source("database") is not ParameterSource.COMMANDLINE:
        app.database_url, app.creates_database = _fresh_database(DEMO_FOLDER.resolve()), True
    path = Path(keep).absolute() if keep else DEMO_FOLDER.resolve() / "cluster.json"
    cluster = SimulatedCluster.create(path, SCENARIO, speed=speed)
    before = {vm["id"]: vm for vm in cluster.snapshot()["vms"]}
    node = "hv01"
    click.echo(f"simulated cluster {path}: 3 nodes, {len(before)} VMs; patching {node}, which")
    click.echo(
        "runs 2 HA VMs, 1 non-HA VM (policy: migrate) and holds 1 HA VM that is off "
        "(policy: evacuate)"
    )
    app.sim_file = str(path)
    app.settings = replace(app.settings, runner=replace(app.settings.runner, poll_interval_s=0.05))
    app.progress = lambda message: click.echo(f"  {message}")
    params = Params(
        "cluster1",
        node,
        planning.Policies(planning.NonHaPolicy.MIGRATE, planning.StoppedHaPolicy.EVACUATE),
        "simulated",
        app.settings.concurrency,
    )
    database = shown_url(app.database_url)
    click.echo(f"policies: non_ha=migrate, stopped_ha=evacuate; database {database}")
    runner = app.runner()
    run = runner.create(subject("cluster1", node), params.to_json())
    click.echo(f"run {run.id}: patching {node}")
    try:
        stop = runner.drive(run.id)
    finally:
        terminal.settle()
    click.echo()
    click.echo(render.run_summary(stop.run))
    terminal.echo(render.vm_report(app.store.published(run.id)))
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
    _follow_ups(run.id, database, path)
    sys.exit(0 if stop.run.state == DONE and same else 1)


def _follow_ups(run_id: str, database: str, path: Path) -> None:
    """Commands that work exactly as printed, from anywhere, without an activated virtualenv."""
    prog = _program()
    click.echo(f"audit trail: {shlex.join([*prog, '--database', database, 'history', run_id])}")
    click.echo(f"every run:   {shlex.join([*prog, '--database', database, 'runs'])}")
    click.echo(f"the cluster: {shlex.join([*prog, 'sim', 'show', '--file', str(path)])}")


def _fresh_database(folder: Path) -> str:
    """A new, empty SQLite database in folder (the previous demo's is removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    database = folder / "nodepatch.db"
    for suffix in ("", "-wal", "-shm"):
        database.with_name(database.name + suffix).unlink(missing_ok=True)
    return f"sqlite:///{database}"


def _program() -> list[str]:
    """This nodepatch, runnable as printed from anywhere without activating its virtualenv."""
    script = Path(sys.argv[0])
    if script.name == "nodepatch" and script.is_file():
        return [str(script.resolve())]
    return [sys.executable, "-m", "workflows"]
