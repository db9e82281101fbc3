"""`nodepatch report RUN`: the report of a past node run or cycle, as HTML, JSON or CSV."""

from __future__ import annotations

import json
from pathlib import Path

import click

from engine import errors
from engine.model import utcnow
from workflows.app import App
from workflows.cli.common import pass_app
from workflows.report import csv as csv_report
from workflows.report import data
from workflows.report import html as html_report


@click.command("report")
@click.argument("run_ref", metavar="RUN")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(("html", "json", "csv")),
    default="html",
    show_default=True,
    help="html: one self-contained page; json: the whole report; csv: one row per VM action.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Write to this file (default: json/csv to stdout, html to "
    "./nodepatch-report-<run_id>.html).",
)
@pass_app
def report_cmd(app: App, run_ref: str, fmt: str, output: str | None) -> None:
    """The report of RUN (a node run or a cycle): plan, per node its states, patch, gate and
    VM actions with their job IDs, and the audit chain's verification."""
    run = app.store.resolve(run_ref)
    report = data.build(data.collect(app.store, run.id), utcnow())
    if fmt == "json":
        text = json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n"
    elif fmt == "csv":
        text = csv_report.render(report)
    else:
        text = html_report.render(report)
    if output is None and fmt != "html":
        click.echo(text, nl=False)
        return
    path = Path(output or f"nodepatch-report-{run.id}.html")
    try:
        path.write_text(text, encoding="utf-8", newline="")
    except OSError as exc:
        raise errors.UsageError(f"cannot write {path}: {exc.strerror}") from exc
    click.echo(str(path.resolve()))
