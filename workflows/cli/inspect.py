"""Looking at runs and the installation: status, runs, history, audit, doctor, db."""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any

import click

from engine import db, errors
from engine.model import utcnow
from workflows import render, terminal
from workflows.app import App
from workflows.cli.common import (
    EXIT_DONE,
    EXIT_FAILED,
    emit,
    json_option,
    pass_app,
)
from workflows.node_patch import STATES

# ---- database ----------------------------------------------------------------------------


@click.group("db")
def db_group() -> None:
    """Database schema management."""


@db_group.command("upgrade")
@pass_app
def db_upgrade(app: App) -> None:
    """Create or upgrade the schema to this version (alembic migrations)."""
    engine = db.connect(app.database_url, create=True)
    try:
        before = db.upgrade(engine)
        after = db.current_revision(engine)
    finally:
        engine.dispose()
    if before == after:
        click.echo(f"database already at revision {after}; nothing to do")
    else:
        click.echo(f"database upgraded from {before or '(empty)'} to {after}")


# ---- inspection --------------------------------------------------------------------------


@click.command("status")
@click.argument("run_ref", metavar="RUN")
@json_option
@pass_app
def status_cmd(app: App, run_ref: str, as_json: bool) -> None:
    """Show RUN: state, who holds it, time per state, the per-VM table and the journal."""
    run = app.store.resolve(run_ref)
    published = app.store.published(run.id)
    now = utcnow()
    final = run.state in app.registry.get(run.workflow, run.workflow_version).final
    stays = render.durations(app.store.events(run.id), now, final)
    journal = app.store.journal_entries(run.id)
    if as_json:
        doc = render.run_json(run, published)
        doc["locks"] = app.store.locks(run.id)
        doc["durations"] = stays
        doc["journal"] = [
            {
                "key": e.step_key,
                "attempt": e.attempt,
                "status": e.status,
                "external_ref": e.external_ref,
                "result": e.result,
                "started_at": e.created_at.isoformat() if e.created_at else None,
                "updated_at": e.updated_at.isoformat() if e.updated_at else None,
            }
            for e in journal
        ]
        emit(doc)
        return
    click.echo(render.run_summary(run))
    click.echo(render.lease_line(run, now, final))
    locks = app.store.locks(run.id)
    if locks:
        click.echo(f"holds: {', '.join(locks)}")
    terminal.echo(render.durations_table(stays))
    patched = render.patch_line(published)
    if patched:
        click.echo(patched)
    terminal.echo(render.vm_report(published))
    for line in render.warnings(published):
        click.echo(f"not put back: {line}")
    if journal:
        terminal.echo(render.journal_table(journal))


@click.command("runs")
@click.option("--cluster")
@click.option("--node")
@click.option("--state", type=click.Choice(STATES))
@click.option(
    "--since",
    metavar="DATE",
    help="Runs started at or after DATE (ISO 8601; UTC unless it has an offset), cycles "
    "included, with outcome and duration.",
)
@json_option
@pass_app
def runs_cmd(
    app: App,
    cluster: str | None,
    node: str | None,
    state: str | None,
    since: str | None,
    as_json: bool,
) -> None:
    """List runs, newest first."""
    if since is not None:
        past_runs(app, cluster, node, state, parse_since(since), as_json)
        return
    runs = app.store.runs(subject_prefix=f"{cluster}/" if cluster else None, state=state)
    if node:
        runs = [r for r in runs if str(r.params.get("node", "")).lower() == node.lower()]
    if as_json:
        emit([render.run_json(r, {}) | {"published": None} for r in runs])
    else:
        terminal.echo(render.runs_table(runs))


def past_runs(
    app: App,
    cluster: str | None,
    node: str | None,
    state: str | None,
    since: dt.datetime,
    as_json: bool,
) -> None:
    """`runs --since`: cycles and node runs of the cluster, with outcome and duration."""
    from workflows.report import past  # only for --since: status and runs never load it

    now = utcnow()
    runs = past.select(app.store.runs(state=state, limit=ALL), cluster, node, since)
    rows = [past.row(r, now) for r in runs]
    if as_json:
        emit(rows)
    else:
        click.echo(past.table(rows))


ALL = 1_000_000


def parse_since(text: str) -> dt.datetime:
    """An ISO 8601 date or time; UTC unless it names an offset."""
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise click.BadParameter(
            f"{text!r} is not a date: give an ISO 8601 date or time, such as 2026-11-01 or "
            "2026-11-28T22:00+01:00",
            param_hint="--since",
        ) from exc
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


@click.command("history")
@click.argument("run_ref", metavar="RUN")
@json_option
@pass_app
def history_cmd(app: App, run_ref: str, as_json: bool) -> None:
    """The audit trail of RUN: every transition, lease, signal and wait, with actor and time."""
    run = app.store.resolve(run_ref)
    app.registry.check(run.workflow, run.workflow_version)
    events = app.store.events(run.id)
    if as_json:
        emit(
            {
                "run_id": run.id,
                "state": run.state,
                "events": [e.to_json() for e in events],
                "published": app.store.published(run.id),
            }
        )
    else:
        click.echo(render.run_summary(run))
        terminal.echo(render.history_table(events))
        final = run.state in app.registry.get(run.workflow, run.workflow_version).final
        terminal.echo(render.durations_table(render.durations(events, utcnow(), final)))
        patched = render.patch_line(app.store.published(run.id))
        if patched:
            click.echo(patched)


@click.command("doctor")
@click.option("--cluster", help="Also check that this cluster and its nodes are visible.")
@click.option(
    "--survey",
    "survey_file",
    type=click.Path(dir_okay=False),
    help="Also record, read-only, what the site looks like (JSON) and name every mismatch.",
)
@json_option
@pass_app
def doctor_cmd(app: App, cluster: str | None, survey_file: str | None, as_json: bool) -> None:
    """Check the configured connection end to end and say what is wrong in plain words."""
    from workflows import doctor

    if app.sim_file or app.settings.backend == "simulated":
        if survey_file:
            raise errors.UsageError("doctor --survey: needs a vmm or failover backend")
        checks = doctor.diagnose_simulated(lambda: app.backend, cluster)
    else:
        checks = doctor.diagnose(
            app.connection(), kind=app.settings.backend, cluster=cluster, options=app.options()
        )
        if survey_file and all(c.ok for c in checks):
            checks += _survey(app, cluster, survey_file)
    ok = all(c.ok for c in checks)
    if as_json:
        emit({"ok": ok, "checks": [c.__dict__ for c in checks]})
    else:
        for c in checks:
            click.echo(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    sys.exit(EXIT_DONE if ok else EXIT_FAILED)


def _survey(app: App, cluster: str | None, path: str) -> list[Any]:
    import json
    from pathlib import Path

    from workflows import doctor, survey

    doc = survey.record(
        app.connection(),
        kind=app.settings.backend,
        cluster=cluster,
        options=app.options(),
        node_settings=app.node_settings(),
    )
    mismatches = survey.compare(doc)
    doc["mismatches"] = mismatches
    Path(path).write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    found = f"{len(mismatches)} mismatch(es) with what nodepatch expects"
    checks = [doctor.Check("survey", not mismatches, f"recorded in {path}; {found}")]
    return checks + [doctor.Check("survey", False, m) for m in mismatches]


@click.group("audit")
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
        emit(
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
