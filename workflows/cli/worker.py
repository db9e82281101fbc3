"""`nodepatch worker`: drive detached runs unattended until stopped."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import click
from sqlalchemy import event

from engine.worker import Worker, WorkerSettings
from workflows import terminal
from workflows.app import App, actor
from workflows.cli import integrations
from workflows.cli.common import EXIT_DONE, pass_app

# For benchmarks: a file this worker rewrites every half second with the number of SQL
# statements it has sent so far (SQLAlchemy's before_cursor_execute; BEGIN not counted).
STATEMENTS_ENV = "NODEPATCH_BENCH_STATEMENTS"


def _count_statements(app: App, path: Path, stop: threading.Event) -> None:
    counted = [0]

    def statement(_conn: object, _cursor: object, text: str, *_args: object) -> None:
        if text.lstrip()[:5].upper() != "BEGIN":
            counted[0] += 1

    def write() -> None:
        while True:
            partial = path.with_name(f".{path.name}.part")
            partial.write_text(f"{counted[0]}\n", encoding="utf-8")
            partial.replace(path)
            if stop.wait(0.5):
                return

    event.listen(app.store.engine, "before_cursor_execute", statement)
    threading.Thread(target=write, name="statement-count", daemon=True).start()


@click.command("worker")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Runs driven at once by this process.",
)
@click.option("--until-idle", is_flag=True, help="Exit 0 once nothing is due or in flight.")
@click.option(
    "--poll",
    "poll_s",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds between looks for due runs (PostgreSQL also wakes workers at once).",
)
@click.option(
    "--yield-after",
    "yield_s",
    type=click.FloatRange(min=0, min_open=True),
    help="A step waiting on the cluster gives its slot back after this long, and is resumed "
    "[default: engine.yield_after_s, 30].",
)
@click.option(
    "--grace",
    "grace_s",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds SIGTERM/SIGINT waits for in-flight runs to reach a durable point.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    help="Serve Prometheus metrics on this port (/metrics).",
)
@click.option(
    "--metrics-addr",
    default="0.0.0.0",  # noqa: S104 - scraped from another machine (or a container's host)
    show_default=True,
    help="Address /metrics listens on.",
)
@pass_app
def worker_cmd(
    app: App,
    concurrency: int,
    until_idle: bool,
    poll_s: float,
    yield_s: float | None,
    grace_s: float,
    metrics_port: int | None,
    metrics_addr: str,
) -> None:
    """Claim due runs (started with --detach, woken by a signal or a timer) and drive each to its
    next stop. Run one or more per site; several workers share one PostgreSQL database."""
    settings = WorkerSettings(
        concurrency=concurrency,
        lease_ttl_s=app.settings.runner.lease_ttl_s,
        poll_interval_s=poll_s,
        yield_after_s=app.settings.yield_after_s if yield_s is None else yield_s,
    )
    app.progress = terminal.progress_sink(terminal.interactive(sys.stderr), live=False)
    worker = Worker(app.store, app.runner_for, settings, owner=actor())
    counts_to = os.environ.get(STATEMENTS_ENV)
    if counts_to:
        _count_statements(app, Path(counts_to), worker.stop)

    def stop(signum: int, _frame: FrameType | None) -> None:
        if worker.stop.is_set():
            sys.exit(EXIT_DONE)  # a second signal: leave at once; leases expire by themselves
        worker.request_stop()
        click.echo(
            f"nodepatch worker: {signal.Signals(signum).name}: no new runs; in-flight runs stop "
            f"at their next durable point (at most {grace_s:g} s)",
            err=True,
        )

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    integrations.log_to_stderr()
    integrations.serve_metrics(app, metrics_port, metrics_addr)
    deliveries = integrations.deliver_continuously(app, worker.stop, min(poll_s, 2.0))
    click.echo(f"nodepatch worker {actor()}: {concurrency} slot(s)", err=True)
    worker.run(until_idle=until_idle, grace_s=grace_s)
    integrations.last_delivery(app, deliveries, worker.stop)
    click.echo(f"nodepatch worker: stopped after driving {worker.driven} run(s)", err=True)
    sys.exit(EXIT_DONE)
