"""The `nodepatch` command line. Exit codes: 0 Done, 1 Failed, 2 usage/configuration/input
error, 3 stopped before the end (--until or waiting for a signal), 4 busy (another live process
holds the run)."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from engine import db, errors
from engine.runner import Stop
from workflows import plan as planning
from workflows import render, settings
from workflows.app import App
from workflows.backends.base import Inventory
from workflows.node_patch import ABORTED, DONE, EXTERNAL, STATES, NodePatch, Params, subject

EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_BUSY = 0, 1, 2, 3, 4
log = logging.getLogger("nodepatch")


class Cli(click.Group):
    """Turns every error into one clear line and a documented exit code."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        debug = "--debug" in sys.argv
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            _die("interrupted", EXIT_FAILED)
        except click.ClickException as exc:
            _die(exc.format_message(), EXIT_USAGE)
        except (errors.Busy, errors.StaleRun) as exc:
            _die(str(exc), EXIT_BUSY, exc if debug else None)
        except errors.UsageError as exc:
            _die(str(exc), EXIT_USAGE, exc if debug else None)
        except errors.EngineError as exc:
            _die(str(exc), EXIT_FAILED, exc if debug else None)
        except Exception as exc:  # noqa: BLE001 - the edge: no traceback unless --debug
            _die(
                f"internal error: {exc!r} (run with --debug for details)",
                EXIT_FAILED,
                exc if debug else None,
            )


def _die(message: str, code: int, exc: BaseException | None = None) -> NoReturn:
    if exc is not None:
        traceback.print_exception(exc, file=sys.stderr)
    click.echo(f"nodepatch: error: {message}", err=True)
    sys.exit(code)


def _progress_sink(enabled: bool) -> Callable[[str], None]:
    def sink(message: str) -> None:
        log.info(message, extra={"action": "progress"})
        if enabled:
            click.echo(f"  {message}", err=True)

    return sink


@click.group(cls=Cli)
@click.option(
    "--config",
    "config_path",
    envvar="NODEPATCH_CONFIG",
    type=click.Path(),
    help="YAML configuration file [env NODEPATCH_CONFIG].",
)
@click.option(
    "--database",
    envvar="NODEPATCH_DATABASE_URL",
    help="Database URL, overrides the config [env NODEPATCH_DATABASE_URL].",
)
@click.option(
    "--sim",
    "sim_file",
    envvar="NODEPATCH_SIM",
    type=click.Path(),
    help="Use the simulated cluster in FILE [env NODEPATCH_SIM].",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(
    ctx: click.Context,
    config_path: str | None,
    database: str | None,
    sim_file: str | None,
    debug: bool,
) -> None:
    """nodepatch: patch Hyper-V / VMM cluster nodes without cutting anyone off."""
    cfg = settings.load(config_path)
    _setup_logging(cfg.log_file, debug)
    app = App(cfg, database or cfg.database, sim_file, progress=_progress_sink(sys.stderr.isatty()))
    ctx.obj = app
    ctx.call_on_close(app.close)


def _setup_logging(path: str | None, debug: bool) -> None:
    root = logging.getLogger("nodepatch")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if path:
        handler = logging.FileHandler(Path(path).expanduser(), encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)


pass_app = click.make_pass_decorator(App)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
until_option = click.option(
    "--until", type=click.Choice(STATES), help="Stop on entering this state, before its step runs."
)


def _emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str, ensure_ascii=False))


# ---- database ----------------------------------------------------------------------------


@main.group("db")
def db_group() -> None:
    """Database schema management."""


@db_group.command("upgrade")
@pass_app
def db_upgrade(app: App) -> None:
    """Create or upgrade the schema to this version (alembic migrations)."""
    engine = db.connect(app.database_url)
    db.upgrade(engine)
    click.echo(f"database at revision {db.current_revision(engine)}")
    engine.dispose()


# ---- simulator ---------------------------------------------------------------------------


@main.group("sim")
def sim_group() -> None:
    """The simulated cluster (demo, dry runs, tests)."""


@sim_group.command("init")
@click.option("--file", "path", required=True, type=click.Path())
@click.option("--hosts", default=3, show_default=True, type=click.IntRange(1, 64))
@click.option("--vms", default=12, show_default=True, type=click.IntRange(0, 10_000))
@click.option("--non-ha", default=0, show_default=True, type=click.IntRange(0))
@click.option("--stopped-ha", default=0, show_default=True, type=click.IntRange(0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--speed",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Simulated seconds per real second; 0 = every job completes at once.",
)
@click.option(
    "--from",
    "scenario",
    type=click.Path(exists=True, dir_okay=False),
    help="A SCENARIO file (YAML or JSON) in the shape of `sim show --json`.",
)
def sim_init(
    path: str,
    hosts: int,
    vms: int,
    non_ha: int,
    stopped_ha: int,
    seed: int,
    speed: float,
    scenario: str | None,
) -> None:
    """Create a simulated cluster in FILE."""
    from workflows.backends.simulated import SimulatedCluster

    if scenario:
        SimulatedCluster.create(path, _read_scenario(scenario), speed=speed)
    else:
        if non_ha + stopped_ha > vms:
            raise errors.UsageError("--non-ha plus --stopped-ha cannot exceed --vms")
        SimulatedCluster.generate(
            path, hosts=hosts, vms=vms, non_ha=non_ha, stopped_ha=stopped_ha, seed=seed, speed=speed
        )
    click.echo(f"simulated cluster written to {path}")


def _read_scenario(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:  # noqa: PTH123
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise errors.UsageError(f"{path}: malformed YAML or JSON") from exc
    if not isinstance(data, dict):
        raise errors.UsageError(f"{path}: a scenario must be a mapping")
    return data


@sim_group.command("show")
@click.option("--file", "path", required=True, type=click.Path())
@json_option
def sim_show(path: str, as_json: bool) -> None:
    """Show the simulated cluster's hosts and VMs."""
    from workflows.backends.simulated import SimulatedCluster

    snap = SimulatedCluster(path).snapshot()
    if as_json:
        _emit(snap)
        return
    for cluster in snap["clusters"]:
        click.echo(f"cluster {cluster['name']}")
        click.echo(
            render.table(
                ("HOST", "MEMORY_MB", "MAINTENANCE", "STATE"),
                [
                    (
                        h["name"],
                        h["memory_mb"],
                        "yes" if h["maintenance"] else "no",
                        h.get("state", "Up"),
                    )
                    for h in cluster["hosts"]
                ],
            )
        )
    click.echo()
    click.echo(
        render.table(
            ("VM", "ID", "HOST", "HA", "STATE", "MEMORY_MB"),
            [
                (
                    v["name"],
                    v["id"],
                    v["host"],
                    "yes" if v["ha"] else "no",
                    v["state"],
                    v["memory_mb"],
                )
                for v in snap["vms"]
            ],
        )
    )


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


def _inventory(app: App, cluster: str) -> Inventory:
    """The cluster's inventory; a cluster that does not exist is the user's input error."""
    try:
        return app.backend.inventory(cluster)
    except errors.NotFound as exc:
        raise errors.UsageError(str(exc)) from exc


def _plan(app: App, params: Params) -> planning.Plan:
    inventory = _inventory(app, params.cluster)
    holder = app.store.lock_holder(f"cluster:{params.cluster.lower()}")
    return planning.make_plan(inventory, params.node, params.policies, lock_holder=holder)


@main.command("plan")
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
        _emit(result.to_json())
    else:
        click.echo(f"plan for {result.node} in {result.cluster}")
        click.echo(render.plan_table(result.to_json()))
        for problem in result.problems:
            click.echo(f"refused: {problem}")
        if result.ok:
            click.echo("preflight would pass")
    sys.exit(EXIT_DONE if result.ok else EXIT_FAILED)


@main.command("start")
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
    inventory = _inventory(app, cluster)
    host = inventory.host(node)
    if host is None:
        known = ", ".join(h.name for h in inventory.hosts)
        raise errors.UsageError(f"node {node!r} is not in cluster {cluster!r} (nodes: {known})")
    params = Params(
        inventory.cluster, host.name, params.policies, params.patcher, params.concurrency
    )
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


@main.command("resume")
@click.argument("run_ref", metavar="RUN")
@until_option
@json_option
@pass_app
def resume_cmd(app: App, run_ref: str, until: str | None, as_json: bool) -> None:
    """Continue RUN where it stopped; a Failed run retries its failed step."""
    run = app.store.resolve(run_ref)
    _finish(app, app.runner().drive(run.id, until=until, retry=True), as_json)


@main.command("signal")
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


@main.command("abort")
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
        _emit(render.run_json(stop.run, published, stop.reason))
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


# ---- inspection --------------------------------------------------------------------------


@main.command("status")
@click.argument("run_ref", metavar="RUN")
@json_option
@pass_app
def status_cmd(app: App, run_ref: str, as_json: bool) -> None:
    """Show RUN: state, error, published data and the per-VM table."""
    run = app.store.resolve(run_ref)
    published = app.store.published(run.id)
    if as_json:
        doc = render.run_json(run, published)
        doc["locks"] = app.store.locks(run.id)
        doc["journal"] = [
            {
                "key": e.step_key,
                "attempt": e.attempt,
                "status": e.status,
                "external_ref": e.external_ref,
                "result": e.result,
            }
            for e in app.store.journal_entries(run.id)
        ]
        _emit(doc)
        return
    click.echo(render.run_summary(run))
    locks = app.store.locks(run.id)
    if locks:
        click.echo(f"holds: {', '.join(locks)}")
    table = render.vm_report(published)
    if table:
        click.echo(table)


@main.command("runs")
@click.option("--cluster")
@click.option("--node")
@click.option("--state", type=click.Choice(STATES))
@json_option
@pass_app
def runs_cmd(
    app: App, cluster: str | None, node: str | None, state: str | None, as_json: bool
) -> None:
    """List runs, newest first."""
    runs = app.store.runs(subject_prefix=f"{cluster}/" if cluster else None, state=state)
    if node:
        runs = [r for r in runs if str(r.params.get("node", "")).lower() == node.lower()]
    if as_json:
        _emit([render.run_json(r, {}) | {"published": None} for r in runs])
    else:
        click.echo(render.runs_table(runs))


@main.command("history")
@click.argument("run_ref", metavar="RUN")
@json_option
@pass_app
def history_cmd(app: App, run_ref: str, as_json: bool) -> None:
    """The audit trail of RUN: every transition, lease, signal and wait, with actor and time."""
    run = app.store.resolve(run_ref)
    events = app.store.events(run.id)
    if as_json:
        _emit(
            {
                "run_id": run.id,
                "state": run.state,
                "events": [e.to_json() for e in events],
                "published": app.store.published(run.id),
            }
        )
    else:
        click.echo(render.run_summary(run))
        click.echo(render.history_table(events))


@main.command("doctor")
@click.option("--cluster", help="Also check that this cluster and its nodes are visible.")
@json_option
@pass_app
def doctor_cmd(app: App, cluster: str | None, as_json: bool) -> None:
    """Check the configured connection end to end and say what is wrong in plain words."""
    from workflows import doctor

    if app.sim_file or app.settings.backend == "simulated":
        checks = [doctor.Check("simulated", True, "the simulated backend needs no connection")]
        if cluster:
            names = [h.name for h in _inventory(app, cluster).hosts]
            checks.append(doctor.Check("cluster", True, f"{cluster}: {', '.join(names)}"))
    else:
        checks = doctor.diagnose(app.connection(), kind=app.settings.backend, cluster=cluster)
    ok = all(c.ok for c in checks)
    if as_json:
        _emit({"ok": ok, "checks": [c.__dict__ for c in checks]})
    else:
        for c in checks:
            click.echo(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    sys.exit(EXIT_DONE if ok else EXIT_FAILED)


@main.group("audit")
def audit_group() -> None:
    """Check the audit trail."""


@audit_group.command("verify")
@click.argument("run_ref", metavar="[RUN]", required=False)
@json_option
@pass_app
def audit_verify_cmd(app: App, run_ref: str | None, as_json: bool) -> None:
    """Verify the hash chain of RUN's audit trail (or of every run). Exit 1 if tampered."""
    from engine import audit

    runs = [app.store.resolve(run_ref)] if run_ref else app.store.runs(limit=1_000_000)
    findings = [f for run in runs for f in audit.verify(app.store, run.id)]
    if as_json:
        _emit(
            {
                "runs_checked": len(runs),
                "intact": not findings,
                "findings": [f.__dict__ for f in findings],
            }
        )
    else:
        for f in findings:
            where = f"event {f.event_id}" if f.event_id is not None else "end of trail"
            click.echo(f"run {f.run_id}, {where}: {f.problem}")
        click.echo(
            f"{len(runs)} run(s) checked: "
            + ("audit trail intact" if not findings else f"{len(findings)} problem(s)")
        )
    sys.exit(EXIT_FAILED if findings else EXIT_DONE)


from workflows import demo as _demo  # noqa: E402 - registers the demo command

main.add_command(_demo.demo_cmd)
