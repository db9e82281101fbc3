"""`nodepatch webhooks deliver | status | retry`, and the delivery a command makes of what its
run produced before it exits."""

from __future__ import annotations

import sys
from typing import Any

import click

from engine import errors
from workflows.app import App
from workflows.cli.common import EXIT_DONE, EXIT_FAILED, emit, json_option, pass_app


def _deliverer(app: App) -> Any:
    from workflows import webhooks

    if not app.settings.webhooks:
        raise errors.UsageError("no webhooks are configured (`webhooks:` in the configuration)")
    return webhooks.deliverer(app.store, app.settings.webhooks, app.environ)


def deliver_after(app: App) -> None:
    """Send what the command's run produced (and anything else due) before the command
    exits: one attempt each; what fails is retried by a worker or `nodepatch webhooks
    deliver`. Never changes the command's exit code: problems are one line on stderr."""
    if not app.settings.webhooks:
        return
    try:
        report = _deliverer(app).flush()
    except errors.EngineError as exc:
        click.echo(f"nodepatch: webhooks not delivered now: {exc}", err=True)
        return
    for line in report.errors:
        click.echo(f"nodepatch: webhook not delivered yet: {line}", err=True)


@click.group("webhooks")
def webhooks_group() -> None:
    """Deliver run events to the configured webhooks and look at their deliveries."""


@webhooks_group.command("deliver")
@json_option
@pass_app
def deliver_cmd(app: App, as_json: bool) -> None:
    """Send every due delivery now (the worker does this continuously). Exit 1 if some
    failed (they are retried later, or parked after too many failures)."""
    deliverer = _deliverer(app)
    sent, failed, parked, problems = 0, 0, 0, []
    while True:
        report = deliverer.flush()
        sent, failed, parked = sent + report.sent, failed + report.failed, parked + report.parked
        problems += report.errors
        if not report.sent:
            break
    if as_json:
        emit({"sent": sent, "failed": failed, "parked": parked, "errors": problems})
    else:
        for line in problems:
            click.echo(f"failed: {line}")
        click.echo(f"{sent} delivered, {failed} failed ({parked} parked)")
    sys.exit(EXIT_FAILED if failed else EXIT_DONE)


@webhooks_group.command("status")
@json_option
@pass_app
def status_cmd(app: App, as_json: bool) -> None:
    """Deliveries per webhook (pending, delivered, parked, failed attempts) and every parked
    delivery with its last error."""
    from engine.outbox import Outbox
    from workflows.webhooks import CONSUMER

    outbox = Outbox(app.store.engine, CONSUMER)
    summary = outbox.summary()
    configured = [w.name for w in app.settings.webhooks]
    for name in configured:
        summary["targets"].setdefault(
            name, {"pending": 0, "delivered": 0, "parked": 0, "failed_attempts": 0}
        )
    parked = [
        {
            "webhook": d.target,
            "event_id": d.event.id,
            "event": d.name,
            "run_id": d.event.run_id,
            "attempts": d.attempts,
            "last_error": d.last_error,
        }
        for d in outbox.parked()
    ]
    if as_json:
        emit({**summary, "configured": configured, "parked": parked})
        return
    click.echo(f"events read up to {summary['cursor']} (newest {summary['newest_event']})")
    for name, counts in sorted(summary["targets"].items()):
        note = "" if name in configured else " (no longer configured)"
        click.echo(
            f"{name}{note}: {counts['delivered']} delivered, {counts['pending']} pending, "
            f"{counts['parked']} parked, {counts['failed_attempts']} failed attempt(s)"
        )
    for p in parked:
        click.echo(
            f"parked: {p['webhook']} event {p['event_id']} ({p['event']}, run {p['run_id']}) "
            f"after {p['attempts']} attempt(s): {p['last_error']}"
        )


@webhooks_group.command("retry")
@click.option("--webhook", "target", help="Only this webhook's parked deliveries.")
@click.option("--event", "event_id", type=int, help="Only this event's parked deliveries.")
@json_option
@pass_app
def retry_cmd(app: App, target: str | None, event_id: int | None, as_json: bool) -> None:
    """Send parked deliveries again (with the same idempotency key). Exit 1 if some failed."""
    from engine.model import utcnow

    deliverer = _deliverer(app)
    requeued = deliverer.outbox.unpark(utcnow(), target=target, event_id=event_id)
    report = deliverer.flush()
    if as_json:
        emit(
            {
                "requeued": requeued,
                "sent": report.sent,
                "failed": report.failed,
                "parked": report.parked,
                "errors": report.errors,
            }
        )
    else:
        for line in report.errors:
            click.echo(f"failed: {line}")
        click.echo(f"{requeued} parked deliveries re-queued; {report.sent} delivered now")
    sys.exit(EXIT_FAILED if report.failed else EXIT_DONE)
