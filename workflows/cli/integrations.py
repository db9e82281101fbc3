"""What `nodepatch worker` runs beside its slots: log lines on stderr (text or JSON, for
journald, Docker or a collector), /metrics, and continuous webhook delivery."""

from __future__ import annotations

import logging
import sys
import threading

import click

from workflows.app import App


def log_to_stderr() -> None:
    """The worker's log lines go to stderr too, in the global --log-format."""
    from workflows import logs

    root = click.get_current_context().find_root()
    fmt = str(root.params.get("log_format") or "text")
    logging.getLogger("nodepatch").addHandler(logs.handler(logging.StreamHandler(sys.stderr), fmt))


def serve_metrics(app: App, port: int | None, addr: str) -> None:
    if port is None:
        return
    from workflows import metrics

    names = [w.name for w in app.settings.webhooks]
    metrics.serve(app.store, port, addr, lambda: names)
    click.echo(f"nodepatch worker: metrics on http://{addr}:{port}/metrics", err=True)


def deliver_continuously(
    app: App, stop: threading.Event, interval_s: float
) -> threading.Thread | None:
    """A thread delivering webhooks every `interval_s` until the worker stops."""
    if not app.settings.webhooks:
        return None
    from workflows import webhooks

    deliverer = webhooks.deliverer(app.store, app.settings.webhooks, app.environ)
    thread = threading.Thread(
        target=deliverer.run, args=(stop, interval_s), name="webhooks", daemon=True
    )
    thread.start()
    return thread


def last_delivery(app: App, thread: threading.Thread | None, stop: threading.Event) -> None:
    """After the slots stop: end the delivery thread, then deliver what the last runs
    produced (a worker run with --until-idle exits with everything sent that can be)."""
    if thread is None:
        return
    from workflows.cli.webhooks import deliver_after

    stop.set()
    thread.join(timeout=5)
    deliver_after(app)
