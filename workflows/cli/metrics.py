"""`nodepatch metrics`: the Prometheus exposition, computed from the database."""

from __future__ import annotations

import click

from workflows.app import App
from workflows.cli.common import pass_app


@click.command("metrics")
@pass_app
def metrics_cmd(app: App) -> None:
    """Print the metrics a worker serves on /metrics, computed from the database (for
    node_exporter's textfile collector when no worker runs)."""
    from workflows import metrics

    names = [w.name for w in app.settings.webhooks]
    click.echo(metrics.exposition(app.store, lambda: names), nl=False)
