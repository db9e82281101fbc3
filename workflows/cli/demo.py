"""`nodepatch demo`: a whole simulated cluster patched as one cycle, from a fresh start."""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import click
from click.core import ParameterSource

from workflows import plan as planning
from workflows.app import App, shown_url
from workflows.cli.cycle import status_doc, status_text
from workflows.cycle.params import CLUSTER_CYCLE, CycleParams
from workflows.cycle.workflow import DONE, cycle_subject


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
        {
            "name": "cluster1",
            "hosts": [{"name": f"hv0{i}", "memory_mb": 32768} for i in (1, 2, 3, 4)],
        }
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
        _vm(9, "hv04"),
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
    """Patch a whole fresh simulated cluster as one cycle, end to end, in ./.nodepatch-demo/ (a
    fresh SQLite database of its own, never the configured one, unless --database is given)."""
    from engine.family import drive_family
    from workflows.backends.simulated import SimulatedCluster

    app: App = ctx.obj
    if ctx.find_root().get_parameter_source("database") is not ParameterSource.COMMANDLINE:
        app.database_url, app.creates_database = _fresh_database(DEMO_FOLDER.resolve()), True
    path = Path(keep).absolute() if keep else DEMO_FOLDER.resolve() / "cluster.json"
    cluster = SimulatedCluster.create(path, SCENARIO, speed=speed)
    before = {vm["id"]: vm for vm in cluster.snapshot()["vms"]}
    click.echo(f"simulated cluster {path}: 4 nodes, {len(before)} VMs, patched as one cycle;")
    click.echo(
        "hv01 runs 2 HA VMs, 1 non-HA VM (policy: migrate) and holds 1 HA VM that is off "
        "(policy: evacuate)"
    )
    app.sim_file = str(path)
    app.settings = replace(app.settings, runner=replace(app.settings.runner, poll_interval_s=0.05))
    app.progress = lambda message: click.echo(f"  {message}")
    params = CycleParams(
        cluster="cluster1",
        order=["hv01", "hv02", "hv03", "hv04"],
        max_parallel=None,
        non_ha=str(planning.NonHaPolicy.MIGRATE),
        stopped_ha=str(planning.StoppedHaPolicy.EVACUATE),
        patcher="simulated",
        concurrency=app.settings.concurrency,
        poll_s=0.2,
    )
    params = replace(params, order=sorted(params.order, key=lambda n: _vms_on(before, n)))
    database = shown_url(app.database_url)
    click.echo(f"policies: non_ha=migrate, stopped_ha=evacuate; waves: auto; database {database}")
    runner = app.runner(CLUSTER_CYCLE, 1)
    run = runner.create(cycle_subject("cluster1"), params.to_json())
    click.echo(f"cycle {run.id}: patching cluster1")
    stopped = drive_family(app.store, app.runner_for, run.id, sleep=time.sleep)
    doc = status_doc(app, stopped.stop.run)
    click.echo()
    click.echo(status_text(doc))
    after = {vm["id"]: vm for vm in cluster.snapshot()["vms"]}
    same = all(
        after[i]["host"] == v["host"] and after[i]["state"] == v["state"] for i, v in before.items()
    )
    click.echo()
    click.echo(
        "every VM is back on its host in its power state"
        if same
        else "some VMs are not where they started (see `nodepatch cycle status`)"
    )
    report = DEMO_FOLDER.resolve() / f"nodepatch-report-{run.id}.html"
    _write_report(app, run.id, report)
    click.echo(f"report:      {report}")
    _follow_ups(run.id, database, path)
    sys.exit(0 if stopped.stop.run.state == DONE and same else 1)


def _write_report(app: App, run_id: str, path: Path) -> None:
    from engine.model import utcnow
    from workflows.report import data, html

    path.write_text(html.render(data.build(data.collect(app.store, run_id), utcnow())), "utf-8")


def _vms_on(vms: dict[str, dict[str, object]], node: str) -> tuple[int, str]:
    return sum(1 for v in vms.values() if v["host"] == node), node


def _follow_ups(run_id: str, database: str, path: Path) -> None:
    """Commands that work exactly as printed, from anywhere, without an activated virtualenv."""
    prog = _program()
    click.echo(f"audit trail: {shlex.join([*prog, '--database', database, 'history', run_id])}")
    click.echo(
        f"report again: {shlex.join([*prog, '--database', database, 'report', run_id])}"
        " [--format html|json|csv]"
    )
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
